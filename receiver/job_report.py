"""What a finished job reports (``report.json``, ``summary.txt``): one record per student
seed and the job's totals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from protocol.atomic_files import write_json_atomic, write_text_atomic

REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.txt"
CURVE_FILE = "training-curve.png"


@dataclass
class SeedRun:
    """One student of a job: how it trained and where its weights are."""

    seed: int
    steps: int
    epochs: int
    resumed_from_step: int
    seconds: float
    images_per_second: float
    final_loss: float
    unreadable_images: int
    model_file: str
    history: list[dict[str, float]]  # one record per epoch
    curve: list[dict[str, float]]  # the training curve's points
    holdout_accuracy: float | None = None
    exported: dict[str, str] | None = None  # the torch.export program, when written


@dataclass
class JobReport:
    """What a finished job did (``report.json``)."""

    payload: str
    payload_bytes: int
    payload_sha256: str
    job_identity: dict[str, object]
    task: str
    reference: dict[str, str | int]
    selection: dict[str, str | float]
    kept: int
    classes: list[str]
    class_histogram: dict[str, int]
    model: str
    device: str
    train_config: dict[str, object]
    runs: list[SeedRun]
    holdout_images: int | None
    accuracy_mean: float | None
    accuracy_std: float | None
    training_seconds: float
    seconds: float
    curve_plot: str = CURVE_FILE
    holdout_unreadable: int = 0  # holdout files skipped as unreadable
    coverage: dict[str, object] | None = None  # kept images this copy holds (Coverage)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> JobReport:
        runs = [SeedRun(**run) for run in data["runs"]]  # type: ignore[arg-type, union-attr]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known} | {"runs": runs})

    def write(self, out: Path) -> None:
        """summary.txt, then report.json, which marks the job complete."""
        write_text_atomic(out / SUMMARY_FILE, summarize(self) + "\n")
        write_json_atomic(out / REPORT_FILE, asdict(self), durable=True)


def summarize(report: JobReport) -> str:
    """A few human-readable lines about a finished job."""
    lines = [
        f"task {report.task}: {report.kept} images from {report.reference['name']} "
        f"({report.payload_bytes} byte payload), model {report.model}",
    ]
    for run in report.runs:
        acc = run.holdout_accuracy
        shown = "" if acc is None else f", holdout accuracy {acc:.4f}"
        resumed = run.resumed_from_step
        resumed = f", resumed at step {resumed}" if resumed else ""
        lines.append(
            f"  seed {run.seed}: {run.steps} steps in {run.seconds}s "
            f"({run.images_per_second:.0f} img/s){resumed}{shown}"
        )
    coverage = report.coverage
    if coverage is not None and coverage["present"] != coverage["kept"]:
        lines.append(
            f"coverage: trained on the {coverage['present']} of {coverage['kept']} kept images "
            f"this device holds ({100 * coverage['overall']:.1f}%; least, class "
            f"{coverage['worst_class']!r} {100 * coverage['worst_class_share']:.1f}%)"
        )
    if report.accuracy_mean is not None:
        lines.append(
            f"holdout accuracy {report.accuracy_mean:.4f} +- {report.accuracy_std:.4f} "
            f"over {len(report.runs)} seed(s)"
        )
    if report.holdout_unreadable:
        lines.append(
            f"holdout: {report.holdout_images} images; {report.holdout_unreadable} unreadable "
            "file(s) skipped"
        )
    return "\n".join(lines)
