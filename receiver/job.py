"""One receiver job: an accepted payload's labeled subset rebuilt locally, trained,
evaluated and saved.

A job is resumable. Its state lives in ``<out>/.job/``: one checkpoint per seed
while that seed trains, then a record of the finished seed. Run the same job again
after a crash and it continues from the last checkpoint; run it once more after it
finished and it returns the report it already wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from protocol.atomic_files import write_json_atomic
from protocol.availability import Availability
from protocol.errors import ConfigError, TaskDataError
from protocol.payload import Payload, selection_text
from protocol.reference.base import ReferenceSource
from protocol.reference.canonical import reference_availability
from protocol.reference.encoded import EncodedReference
from protocol.task_data import LabeledImages
from receiver.acceptance import AcceptedPayload, payload_coverage
from receiver.job_report import CURVE_FILE, REPORT_FILE, SUMMARY_FILE, JobReport, SeedRun
from receiver.outputs import export_program, plot_training_curves, save_state_dict
from trainer.batches import CachedBatches, EncodedBatches, Loading, TensorBatches
from trainer.decoded_cache import CacheOptions, DecodedCache, build_cache, cache_side
from trainer.faults import crash_point
from trainer.training import (
    CheckpointPolicy,
    StepHooks,
    StepReport,
    TrainConfig,
    accuracy,
    resolve_device,
    train_classifier,
)

STATE_DIR = ".job"


@dataclass
class JobSettings:
    """What to train, how many independent seeds, how to load data and how often to save."""

    train: TrainConfig = field(default_factory=TrainConfig)
    seeds: tuple[int, ...] = (0,)
    decode: str = "auto"  # encoded references: see trainer.batches.DECODE_CHOICES
    loader_threads: int = 8
    export: bool = True  # a torch.export program beside the state_dict
    checkpoint_seconds: float = 60.0
    checkpoint_steps: int = 0
    # image files: decode the kept subset once into a uint8 cache (off, or where it lives:
    # auto, cuda, memory, mmap; see trainer.decoded_cache) instead of in every epoch
    cache: str = "off"


@dataclass
class JobControl:
    """Hooks a supervisor passes to a job: a stop request and per-step progress."""

    should_stop: Callable[[], bool] | None = None
    on_step: Callable[[int, StepReport], None] | None = None  # (seed, report)


def class_difference(have: tuple[str, ...], want: tuple[str, ...]) -> str:
    """How two class lists differ, in words: what is missing, what is extra, or where
    the order first parts."""
    if set(have) == set(want):
        at = next(i for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b)
        return (
            f"the same {len(want)} classes in another order (position {at}: {have[at]!r} "
            f"where the payload has {want[at]!r})"
        )
    missing = [name for name in want if name not in set(have)]
    extra = [name for name in have if name not in set(want)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the payload's classes missing: {_names(missing)}")
    if extra:
        parts.append(f"{len(extra)} classes the payload does not have: {_names(extra)}")
    return "; ".join(parts)


def _names(names: list[str], shown: int = 6) -> str:
    listed = ", ".join(repr(n) for n in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_holdout(holdout: LabeledImages, payload: Payload, reference: ReferenceSource) -> None:
    """A holdout must have the payload's classes, in order, and the reference's image shape."""
    if holdout.class_names != payload.class_names:
        raise TaskDataError(
            f"holdout {holdout.name!r} does not match the payload's classes: "
            f"{class_difference(holdout.class_names, payload.class_names)}; use the holdout "
            "of this task"
        )
    shape = holdout.images.shape[1:]
    expected = (reference.in_channels, reference.image_size, reference.image_size)
    if tuple(shape) != expected:
        raise TaskDataError(
            f"holdout images are {'x'.join(map(str, shape))}, the reference set's "
            f"{'x'.join(map(str, expected))}: give the holdout in the reference set's shape"
        )


def check_trainable(
    payload: Payload,
    reference: ReferenceSource,
    settings: JobSettings,
    holdout: LabeledImages | None,
) -> None:
    """What this device checks of a payload beyond acceptance's own checks (which
    include the reference set's fingerprint), before anything trains: the holdout, the
    model and its weights. Acceptance runs it last, so that a local mistake never uses
    a payload up (:mod:`receiver.acceptance`)."""
    from trainer.models import build_model

    if holdout is not None:
        check_holdout(holdout, payload, reference)
    build_model(
        settings.train.model,
        len(payload.class_names),
        reference.in_channels,
        settings.train.weights,
    )


OUTPUT_GLOBS = ("model-seed*.pt", "model-seed*.pt2", REPORT_FILE, SUMMARY_FILE, CURVE_FILE)


@dataclass(frozen=True)
class JobIdentity:
    """What makes two runs the same job: the payload, the training settings, the seeds."""

    payload_sha256: str
    train: dict[str, object]  # the TrainConfig, its augmentation resolved
    seeds: list[int]
    cache: str | None = None  # a decoded cache crops otherwise than decoding on the fly

    def as_json(self) -> dict[str, object]:
        identity = {"payload_sha256": self.payload_sha256, "train": self.train, "seeds": self.seeds}
        return identity if self.cache is None else identity | {"cache": self.cache}

    def matches(self, recorded: object) -> bool:
        """Whether a recorded identity (JSON) is this one."""
        return recorded == self.as_json()


def job_identity(sha256: str, settings: JobSettings, reference: ReferenceSource) -> JobIdentity:
    """The identity of a job of the payload ``sha256`` with these settings."""
    train = replace(settings.train, augment=resolve_augment(settings.train.augment, reference))
    cache = None if settings.cache == "off" else settings.cache
    return JobIdentity(sha256, asdict(train), list(settings.seeds), cache)


def _recorded_identity(out: Path) -> dict[str, object] | None:
    for path in (out / REPORT_FILE, out / STATE_DIR / "identity.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        identity = record.get("job_identity", record) if isinstance(record, dict) else None
        if isinstance(identity, dict):
            return identity
    return None


def claim_output_dir(out: Path, identity: JobIdentity, overwrite: bool = False) -> None:
    """Make sure ``out`` holds nothing but this job's outputs: empty, or this job's own
    (finished or interrupted: it resumes). Another run's outputs are refused, or with
    ``overwrite`` removed first, so one directory never mixes two runs."""
    recorded = _recorded_identity(out)
    leftovers = [p for pattern in OUTPUT_GLOBS for p in out.glob(pattern)]
    if identity.matches(recorded) or (recorded is None and not leftovers):
        return
    if not overwrite:
        if recorded is None:
            what = f"outputs of another run ({', '.join(sorted(p.name for p in leftovers)[:3])})"
        elif recorded.get("payload_sha256") != identity.payload_sha256:
            what = f"a run of another payload ({str(recorded.get('payload_sha256'))[:12]}...)"
        else:
            what = "a run of this payload with other settings or seeds"
        raise ConfigError(
            f"--out {out} holds {what}: choose a new --out, or pass --overwrite to replace it"
        )
    for path in leftovers:
        path.unlink(missing_ok=True)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def resolve_augment(augment: str, reference: ReferenceSource) -> str:
    """``auto``: crop-flip for photos decoded on the fly, affine for in-memory glyphs."""
    if augment != "auto":
        return augment
    return "crop-flip" if isinstance(reference, EncodedReference) else "affine"


def _batch_source(
    payload: Payload,
    reference: ReferenceSource,
    settings: JobSettings,
    seed: int,
    images: torch.Tensor | DecodedCache | None,
):
    """Batches for one seed: from ``images`` in memory or a decoded cache, else decoded
    on the fly from files."""
    config = settings.train
    labels = torch.from_numpy(payload.labels)
    if isinstance(images, DecodedCache):
        return CachedBatches(images, labels, reference.image_size, config.augment, seed)
    if images is not None:
        return TensorBatches(images, labels, config.augment, seed)
    return EncodedBatches(
        reference,
        payload.indices,
        labels,
        reference.image_size,
        config.augment,
        seed,
        Loading(settings.decode, settings.loader_threads),
    )


def _step_hook(
    on_step: Callable[[int, StepReport], None] | None, seed: int
) -> Callable[[StepReport], None]:
    """After each training step: the supervisor's progress hook, then the
    ``training-step`` crash point of the fault tests."""

    def after_step(report: StepReport) -> None:
        if on_step is not None:
            on_step(seed, report)
        crash_point("training-step")

    return after_step


def _finished_report(out: Path, identity: JobIdentity) -> JobReport | None:
    try:
        report = json.loads((out / REPORT_FILE).read_text())
        if not identity.matches(report.get("job_identity")):
            return None
        return JobReport.from_json(report)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def started_with(out_dir: str | os.PathLike[str], sha256: str) -> bool:
    """Whether ``out_dir`` holds a job (finished or interrupted) for the payload ``sha256``."""
    recorded = _recorded_identity(Path(out_dir))
    return recorded is not None and recorded.get("payload_sha256") == sha256


def _job_state(out: Path, identity: JobIdentity) -> Path:
    """The job's state folder; emptied first if it belongs to another payload or settings."""
    state = out / STATE_DIR
    marker = state / "identity.json"
    try:
        same = identity.matches(json.loads(marker.read_text()))
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, identity.as_json(), durable=True)
    return state


@dataclass
class _Job:
    """What every seed of one job shares."""

    accepted: AcceptedPayload
    reference: ReferenceSource
    settings: JobSettings
    out: Path
    state: Path  # the job's state folder: checkpoints and finished seeds
    holdout: LabeledImages | None
    progress: bool
    control: JobControl
    images: torch.Tensor | DecodedCache | None  # loaded once for all seeds

    @property
    def payload(self) -> Payload:
        return self.accepted.payload


def run_job(
    accepted: AcceptedPayload,
    reference: ReferenceSource,
    out_dir: str | os.PathLike[str],
    settings: JobSettings,
    holdout: LabeledImages | None = None,
    progress: bool = True,
    control: JobControl | None = None,
) -> JobReport:
    """Train one student per seed from an accepted payload; write weights, an exported
    program, report.json, summary.txt and a training-curve plot. Resumes an interrupted
    run; a finished one returns the report it already wrote.

    Acceptance (:mod:`receiver.acceptance`) decoded and checked the payload, against this
    reference set and with the caller's checks of the holdout and the model: nothing is
    read, hashed or checked again here."""
    started = time.perf_counter()
    out = Path(out_dir)
    identity = job_identity(accepted.sha256, settings, reference)
    train = replace(settings.train, augment=str(identity.train["augment"]))
    settings = replace(settings, train=train)
    done = _finished_report(out, identity)
    if done is not None:  # this payload was already trained with these settings
        return done
    state = _job_state(out, identity)
    coverage = payload_coverage(accepted.payload, reference_availability(reference))
    accepted = held_part(accepted, reference_availability(reference))
    images = _loaded_subset(accepted.payload, reference, settings, state, progress)
    job = _Job(
        accepted,
        reference,
        settings,
        out,
        state,
        holdout,
        progress,
        control or JobControl(),
        images,
    )
    runs = [_train_seed(job, seed) for seed in settings.seeds]
    payload = accepted.payload
    title = f"{payload.task}: {selection_text(payload.selection)}, {settings.train.model}"
    plot_training_curves(runs, out / CURVE_FILE, title)
    report = _job_report(job, runs, identity, started)
    report.coverage = coverage.as_json()
    report.write(out)
    shutil.rmtree(job.state, ignore_errors=True)
    return report


def held_part(accepted: AcceptedPayload, availability: Availability | None) -> AcceptedPayload:
    """The payload with only the kept images this copy holds (acceptance judged that
    enough of them are here: :class:`receiver.acceptance.CoverageRule`)."""
    if availability is None:
        return accepted
    held = availability.present[accepted.payload.indices]
    if held.all():
        return accepted
    payload = accepted.payload
    part = replace(payload, indices=payload.indices[held], labels=payload.labels[held])
    return replace(accepted, payload=part)


def _loaded_subset(
    payload: Payload,
    reference: ReferenceSource,
    settings: JobSettings,
    state: Path,
    progress: bool,
) -> torch.Tensor | DecodedCache | None:
    """The kept images, loaded once for all seeds: an in-memory set's arrays, the decoded
    cache of image files (``settings.cache``), or None to decode files on the fly."""
    if not isinstance(reference, EncodedReference):
        return torch.from_numpy(np.ascontiguousarray(reference.load(payload.indices)))
    if settings.cache == "off":
        return None
    side = cache_side(reference.image_size)
    return build_cache(
        reference,
        payload.indices,
        side,
        resolve_device(settings.train.device),
        CacheOptions(
            settings.cache,
            state / f"decoded-{side}px.u8",
            settings.loader_threads,
            progress=progress,
        ),
    )


def _holdout_evaluator(holdout: LabeledImages | None) -> Callable[[torch.nn.Module], float] | None:
    """Accuracy on the holdout, for the training curve (None without a holdout)."""
    if holdout is None:
        return None
    images, labels = torch.from_numpy(holdout.images), torch.from_numpy(holdout.labels)
    return lambda model: accuracy(model, images, labels)


def _train_seed(job: _Job, seed: int) -> SeedRun:
    """Train (or resume, or recall) the student of one seed and save its outputs; returns
    the seed's record for the report."""
    record_path = job.state / f"seed{seed}.json"
    if record_path.is_file():  # finished before an interruption
        return SeedRun(**json.loads(record_path.read_text()))
    settings = job.settings
    config = replace(settings.train, seed=seed)
    source = _batch_source(
        job.payload, job.reference, replace(settings, train=config), seed, job.images
    )
    policy = CheckpointPolicy(
        job.state / f"seed{seed}.ckpt", settings.checkpoint_seconds, settings.checkpoint_steps
    )
    evaluate = _holdout_evaluator(job.holdout)
    result = train_classifier(
        source,
        len(job.payload.class_names),
        config,
        job.reference.in_channels,
        hooks=StepHooks(
            progress=job.progress,
            checkpoint=policy,
            should_stop=job.control.should_stop,
            on_step=_step_hook(job.control.on_step, seed),
            evaluate=evaluate,
        ),
        data_id=job.accepted.sha256,
    )
    run = SeedRun(
        seed=seed,
        steps=result.steps,
        epochs=result.config["epochs_run"],
        resumed_from_step=result.resumed_from,
        seconds=round(result.seconds, 2),
        images_per_second=round(result.images_per_second, 1),
        final_loss=round(result.history[-1]["loss"], 4),
        unreadable_images=result.unreadable_images,
        model_file=f"model-seed{seed}.pt",
        history=result.history,
        curve=result.curve,
    )
    if evaluate is not None:
        last = result.history[-1] if result.history else {}
        if "holdout_accuracy" not in last:  # e.g. a run resumed after its last epoch
            last = {"holdout_accuracy": evaluate(result.model)}
        run.holdout_accuracy = last["holdout_accuracy"]
    crash_point("outputs-saving")
    save_state_dict(result.model, job.out / run.model_file)
    if settings.export:
        run.exported = export_program(
            result.model, source.image_shape, job.out / f"model-seed{seed}.pt2"
        )
    write_json_atomic(record_path, asdict(run), durable=True)
    crash_point("outputs-saved")
    return run


def _job_report(job: _Job, runs: list[SeedRun], identity: JobIdentity, started: float) -> JobReport:
    """The job's report; ``started``: the job's start (``time.perf_counter()``)."""
    payload, train = job.payload, job.settings.train
    accuracies = [r.holdout_accuracy for r in runs if r.holdout_accuracy is not None]
    return JobReport(
        payload=job.accepted.received.source,
        payload_bytes=len(job.accepted.received.data),
        payload_sha256=job.accepted.sha256,
        job_identity=identity.as_json(),
        task=payload.task,
        reference=job.reference.manifest.summary(),
        selection=payload.selection,
        kept=payload.count,
        classes=list(payload.class_names),
        class_histogram=payload.class_histogram(),
        model=train.model,
        device=str(resolve_device(train.device)),
        train_config={k: v for k, v in asdict(train).items() if k != "seed"},
        runs=runs,
        holdout_images=None if job.holdout is None else len(job.holdout),
        holdout_unreadable=0 if job.holdout is None else len(job.holdout.unreadable),
        accuracy_mean=float(np.mean(accuracies)) if accuracies else None,
        accuracy_std=float(np.std(accuracies)) if accuracies else None,
        training_seconds=round(sum(r.seconds for r in runs), 2),
        seconds=round(time.perf_counter() - started, 2),
    )
