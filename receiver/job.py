"""One receiver job: verify a payload, rebuild its labeled subset locally, train, evaluate, save."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocol.errors import TaskDataError
from protocol.payload import Payload, read_payload
from protocol.reference.base import ReferenceSource
from protocol.task_data import LabeledImages
from receiver.training import TrainConfig, accuracy, train_classifier

REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.txt"


@dataclass
class JobSettings:
    """What to train and how many independent seeds to run."""

    train: TrainConfig = field(default_factory=TrainConfig)
    seeds: tuple[int, ...] = (0,)


def rebuild_subset(payload: Payload, reference: ReferenceSource) -> tuple[np.ndarray, np.ndarray]:
    """Check the payload targets this reference set, then load its kept images and labels."""
    payload.check_reference(reference.manifest)
    return reference.load(payload.indices), payload.labels


def _check_holdout(holdout: LabeledImages, payload: Payload, channels: int) -> None:
    if holdout.class_names != payload.class_names:
        raise TaskDataError(
            f"holdout classes {list(holdout.class_names)[:5]}... differ from the payload's "
            f"{list(payload.class_names)[:5]}...: use the holdout of this task"
        )
    if holdout.images.shape[1] != channels:
        raise TaskDataError(f"holdout images must have {channels} channels like the reference set")


def _save_state(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def run_job(
    payload_path: str | os.PathLike[str],
    reference: ReferenceSource,
    out_dir: str | os.PathLike[str],
    settings: JobSettings,
    holdout: LabeledImages | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one student per seed from a payload; write models, report.json and summary.txt."""
    started = time.perf_counter()
    payload = read_payload(payload_path, reference=reference.manifest)
    images, labels = rebuild_subset(payload, reference)
    if holdout is not None:
        _check_holdout(holdout, payload, reference.in_channels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    data = (torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))
    for seed in settings.seeds:
        config = replace(settings.train, seed=seed)
        result = train_classifier(
            data, len(payload.class_names), config, reference.in_channels, progress=progress
        )
        run: dict[str, Any] = {
            "seed": seed,
            "steps": result.steps,
            "seconds": round(result.seconds, 2),
            "images_per_second": round(result.images_per_second, 1),
            "final_loss": round(result.history[-1]["loss"], 4),
            "model_file": f"model-seed{seed}.pt",
        }
        if holdout is not None:
            run["holdout_accuracy"] = accuracy(
                result.model, torch.from_numpy(holdout.images), torch.from_numpy(holdout.labels)
            )
        _save_state(result.model, out / run["model_file"])
        runs.append(run)
    accuracies = [r["holdout_accuracy"] for r in runs if "holdout_accuracy" in r]
    report: dict[str, Any] = {
        "payload": str(payload_path),
        "payload_bytes": Path(payload_path).stat().st_size,
        "task": payload.task,
        "reference": {
            "name": reference.manifest.name,
            "size": len(reference),
            "fingerprint": reference.manifest.fingerprint_hex,
        },
        "selection": payload.selection,
        "kept": payload.count,
        "classes": list(payload.class_names),
        "class_histogram": payload.class_histogram(),
        "model": settings.train.model,
        "train_config": {k: v for k, v in asdict(settings.train).items() if k != "seed"},
        "runs": runs,
        "holdout_images": None if holdout is None else len(holdout),
        "accuracy_mean": float(np.mean(accuracies)) if accuracies else None,
        "accuracy_std": float(np.std(accuracies)) if accuracies else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    tmp = out / (REPORT_FILE + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / REPORT_FILE)
    (out / SUMMARY_FILE).write_text(summarize(report) + "\n")
    return report


def summarize(report: dict[str, Any]) -> str:
    """A few human-readable lines about a finished job."""
    lines = [
        f"task {report['task']}: {report['kept']} images from {report['reference']['name']} "
        f"({report['payload_bytes']} byte payload), model {report['model']}",
    ]
    for run in report["runs"]:
        acc = run.get("holdout_accuracy")
        shown = "" if acc is None else f", holdout accuracy {acc:.4f}"
        lines.append(
            f"  seed {run['seed']}: {run['steps']} steps in {run['seconds']}s "
            f"({run['images_per_second']:.0f} img/s){shown}"
        )
    if report["accuracy_mean"] is not None:
        lines.append(
            f"holdout accuracy {report['accuracy_mean']:.4f} +- {report['accuracy_std']:.4f} "
            f"over {len(report['runs'])} seed(s)"
        )
    return "\n".join(lines)
