"""Where a plan's misranking comes from: its proxy's pixels, its split teacher, or its
validation images.

For one target of a ``plan_validation --path embeddings`` work directory (its plan, its
payloads' real students), each evaluated candidate's payload as sent (the full
teacher's selection and labels) gets one proxy run of the confirmation's length on the
store's thumbnails and one on the pool's own images, each scored on the plan's
validation split in that form. They are printed beside the plan's prediction (split
teacher's selection and labels, thumbnails) and the real students' accuracy on the same
validation split and on the test set, with Spearman and decision accuracy of each
column against the students::

    python -m benchmarks.proxy_fidelity --work work/pv --target font-letters
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks.plan_validation import decision_accuracy, spearman
from trainer.choices import STUDENT_BATCH, STUDENT_STEPS

if TYPE_CHECKING:
    from protocol.task_data import LabeledImages
    from sender.embedding.thumbnails import ThumbnailStore
    from sender.selection.scored_work import ScoredWork


@dataclass(frozen=True)
class Inputs:
    """What the proxies learn from and are scored on, in both forms."""

    work: ScoredWork  # the target's scoring
    thumbnails: ThumbnailStore  # the store's
    pool: np.ndarray  # the reference images themselves
    validation_thumbnails: LabeledImages
    validation_native: LabeledImages


def load_inputs(pv: Path, target: str, plan: dict) -> Inputs:
    """The target's scoring, the store's thumbnails, the pool, and the plan's validation
    split as thumbnails (made as the plan makes them) and as the task's own images."""
    from benchmarks.plan_validation import plan_validation_split
    from protocol.reference.factory import open_reference
    from protocol.task_data import LabeledImages
    from sender.embedding.embedders import OpenClipEmbedder
    from sender.scoring.images import reference_images
    from sender.selection.embedding_plan import PlannedStore, embed_plan_task
    from sender.selection.plan import split_rows

    flags = (pv / "logs" / "world-clip.log").read_text().strip().splitlines()[-1].split()
    model = flags[flags.index("--clip-model") + 1]
    weights = flags[flags.index("--clip-weights") + 1]
    planned = PlannedStore.open(pv / target / "sender")
    train_file = pv / target / "task" / "train.npz"
    embedded = embed_plan_task(OpenClipEmbedder(model, weights, "cpu"), str(train_file), planned)
    names = tuple(embedded.class_names)
    fraction, seed = plan["settings"]["validation_fraction"], plan["settings"]["seed"]
    _, held = split_rows(embedded.labels, names, fraction, seed)
    shown = LabeledImages(embedded.thumbnails[held], embedded.labels[held], names, "validation")
    native = plan_validation_split(train_file, plan)
    pool = reference_images(open_reference("glyphs", pv / "cache"), native.images.shape[1])
    return Inputs(planned.work, planned.thumbnails, pool, shown, native)


def proxy_pair(inputs: Inputs, candidate: dict, seeds: list[int]) -> tuple[float, float]:
    """The candidate's payload as sent, learnt from thumbnails and from the pool's images."""
    from sender.selection.deployment import Validation
    from sender.selection.plan import ProxyRun, proxy_accuracy
    from sender.selection.plan_file import Candidate

    wanted = Candidate(**candidate)
    config, score = inputs.work.resolve(wanted.config(), wanted.score)
    kept = inputs.work.ranked().select(config, score)
    labels = inputs.work.scored.predicted[kept].astype(np.int64)
    runs = [ProxyRun(STUDENT_STEPS, STUDENT_BATCH, seed) for seed in seeds]
    small = Validation.equal(inputs.validation_thumbnails)
    native = Validation.equal(inputs.validation_native)
    rows = inputs.thumbnails.read_rows(kept)
    thumbs = np.mean([proxy_accuracy(rows, labels, small, run) for run in runs])
    own = np.mean([proxy_accuracy(inputs.pool[kept], labels, native, run) for run in runs])
    return float(thumbs), float(own)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="work/plan-validation", help="plan_validation's --work")
    parser.add_argument("--target", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="proxy seeds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pv = Path(args.work)
    plan = json.loads((pv / args.target / "plan" / "plan.json").read_text())
    report = json.loads((pv / "report.json").read_text())
    result = next(t for t in report["targets"] if t["target"] == args.target)
    inputs = load_inputs(pv, args.target, plan)
    rows = {r["name"]: r for r in plan["candidates"]}
    heads = ("plan", "thumbs", "native", "student", "test")
    print(f"{'candidate':36s} " + " ".join(f"{head:>6s}" for head in heads))
    table = []
    for entry in result["rows"]:
        thumbs, own = proxy_pair(inputs, rows[entry["name"]]["candidate"], args.seeds)
        line = (entry["predicted_accuracy"], thumbs, own, entry["real_validation_accuracy"])
        table.append((*line, entry["real_accuracy"]))
        shown = " ".join(f"{100 * v:6.1f}" for v in table[-1])
        print(f"{entry['name']:36s} {shown}", flush=True)
    columns = [list(c) for c in zip(*table, strict=True)]
    student, test = columns[3], columns[4]
    for label, column in zip(("plan", "thumbs", "native"), columns[:3], strict=True):
        print(
            f"{label:7s} vs student-on-validation: spearman {spearman(column, student):.3f} "
            f"decision {decision_accuracy(column, student):.3f}; vs test: spearman "
            f"{spearman(column, test):.3f} decision {decision_accuracy(column, test):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
