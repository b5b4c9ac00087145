"""A plain supervised training loop, shared by the receiver's student and the sender's teacher.

Batches come from a source in :mod:`receiver.batches` (uint8 images in memory, or
reference images decoded on the fly). AdamW with linear warmup and cosine decay, as
in torchvision's classification reference; bf16 autocast on CUDA; channels-last;
``torch.compile`` on request; uniform or class-balanced sampling.

A run can checkpoint and resume exactly: the model, optimizer and scheduler, the
position in the epoch order, the running epoch statistics and every random state
are saved, so a run killed at any point and resumed ends with the same weights as
one that never stopped (on CPU; CUDA kernels may differ in the last bits).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protocol.errors import ConfigError, ReferenceSetError
from receiver.batches import AUGMENTATIONS, TensorBatches, normalize
from receiver.models import SMALL_CNN, build_model

AMP_MODES = ("auto", "bf16", "off")
UNREADABLE_LIMIT = 0.01  # fail a run when more than this share of its images cannot be read


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run."""

    model: str = SMALL_CNN
    epochs: int = 30
    min_steps: int = 0  # small sets train at least this many optimizer steps
    max_steps: int = 0  # large sets stop after this many (0: no limit)
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.0
    augment: str = "affine"  # or "auto": crop-flip for image files, affine for in-memory sets
    seed: int = 0
    device: str = "auto"
    weights: str | None = None
    balanced: bool = False  # draw each class equally often (with replacement)
    amp: str = "auto"  # auto: bf16 autocast on CUDA, none on CPU
    compile: bool = False

    def __post_init__(self) -> None:
        if self.augment not in ("auto", *AUGMENTATIONS):
            raise ConfigError(
                f"augment must be auto or one of {AUGMENTATIONS}, not {self.augment!r}"
            )
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {AMP_MODES}, not {self.amp!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs and batch size must be >= 1 and the learning rate > 0")


@dataclass
class CheckpointPolicy:
    """Where and how often a run saves its state; ``resume`` continues from that file."""

    path: Path
    every_seconds: float = 60.0
    every_steps: int = 0  # 0: by time only
    resume: bool = True


@dataclass
class StepReport:
    """Progress after one optimizer step, for progress displays and health files."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    images_per_second: float
    resumed_from: int


class TrainingInterrupted(Exception):  # a control-flow signal, not a failure
    """Training stopped on request; its state was checkpointed first."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training stopped at step {step} (checkpoint saved)")
        self.step = step


@dataclass
class TrainResult:
    """The trained model and what happened while training it."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    resumed_from: int = 0
    unreadable_images: int = 0
    config: dict[str, object] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class EpochOrder:
    """The rows each epoch visits, reproducible from the seed alone.

    Uniform: the same draws as a ``DataLoader(shuffle=True)`` seeded with ``seed``
    (one seed draw and one permutation per epoch, one trailing permutation when an
    epoch runs to its end). Balanced: ``n`` rows drawn with replacement, each class
    equally likely.
    """

    def __init__(self, labels: torch.Tensor, seed: int, balanced: bool) -> None:
        self.count = int(labels.shape[0])
        self.seed = seed
        self.weights = None
        if balanced:
            counts = torch.bincount(labels.cpu())
            self.weights = 1.0 / counts[labels.cpu()].double()
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)
        self._generator = torch.Generator()

    def __call__(self, epoch: int) -> torch.Tensor:
        if epoch == self._epoch:
            return self._order
        if self.weights is not None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.multinomial(self.weights, self.count, True, generator=generator)
        else:
            if epoch < self._epoch or self._epoch < 0:
                self._generator.manual_seed(self.seed)
                self._epoch = -1
            while self._epoch < epoch:
                if self._epoch >= 0:  # the sampler's draw when the previous epoch ran out
                    torch.randperm(self.count, generator=self._generator)
                torch.empty((), dtype=torch.int64).random_(generator=self._generator)
                self._order = torch.randperm(self.count, generator=self._generator)
                self._epoch += 1
        self._epoch = epoch
        return self._order


def autocast_for(config: TrainConfig, device: torch.device):
    """bf16 autocast when ``config.amp`` asks for it (auto: on CUDA), else nothing."""
    use = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _identity(config: TrainConfig, count: int, num_classes: int, data_id: str) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(config).items() if k not in ("device", "compile")}
    return {"config": settings, "count": count, "num_classes": num_classes, "data": data_id}


def train_classifier(
    data: Any,
    num_classes: int,
    config: TrainConfig,
    in_channels: int = 1,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
    checkpoint: CheckpointPolicy | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    data_id: str = "",
) -> TrainResult:
    """Train ``config.model`` from scratch (or local weights).

    ``data``: ``(uint8 images, labels)`` or a batch source from :mod:`receiver.batches`.
    With ``checkpoint``, state is saved periodically, on ``should_stop()`` (which then
    raises :class:`TrainingInterrupted`) and at the end, and a saved run is resumed;
    the caller deletes the file once it has stored the model.
    """
    from receiver.checkpoint import load_checkpoint, save_checkpoint
    from receiver.faults import crash_point

    if isinstance(data, tuple):
        augment = "affine" if config.augment == "auto" else config.augment
        source = TensorBatches(*data, augment, config.seed)
    else:
        source = data
    count = len(source)
    if count == 0:
        raise ConfigError("nothing to train on: the labeled set is empty")
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    model = build_model(config.model, num_classes, in_channels, config.weights)
    model = model.to(device, memory_format=torch.channels_last)  # ~20% faster convs, CPU and GPU
    steps_per_epoch = math.ceil(count / config.batch_size)
    total_steps = max(config.epochs * steps_per_epoch, config.min_steps)
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    warmup = max(1, int(config.warmup_fraction * total_steps))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
        ),
    )
    result = TrainResult(model=model, config=asdict(config) | {"epochs_run": epochs})
    identity = _identity(config, count, num_classes, data_id)
    # running statistics of the current epoch and of the curve's current window
    run = {
        "seen": 0,
        "loss_sum": 0.0,
        "correct": 0,
        "epoch_seconds": 0.0,
        "elapsed": 0.0,
        "window_loss": 0.0,
        "window_images": 0,
        "unreadable": 0,
    }
    start_step = 0
    saved = load_checkpoint(checkpoint.path, identity) if checkpoint and checkpoint.resume else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["scheduler"])
        source.load_state_dict(saved["source"])
        torch.set_rng_state(saved["torch_rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        run.update(saved["run"])
        result.history, result.curve = list(saved["history"]), list(saved["curve"])
        start_step = result.resumed_from = int(saved["step"])

    def save_state(step: int) -> None:
        assert checkpoint is not None
        save_checkpoint(
            checkpoint.path,
            {
                "identity": identity,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": schedule.state_dict(),
                "source": source.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "run": dict(run),
                "history": result.history,
                "curve": result.curve,
            },
        )

    train_model = torch.compile(model) if config.compile else model
    order = EpochOrder(source.labels, config.seed, config.balanced)
    curve_every = max(1, total_steps // 200)

    def plan():
        for step in range(start_step, total_steps):
            epoch, position = divmod(step, steps_per_epoch)
            rows = order(epoch)[position * config.batch_size : (position + 1) * config.batch_size]
            yield step, rows

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=f"train {config.model}",
            unit="step",
            leave=False,
        )
    result.steps = start_step
    last_save = session_start = time.perf_counter()
    step_start = session_start
    elapsed_before = run["elapsed"]
    model.train()
    batches = source.batches(plan(), device)
    for step, batch in zip(range(start_step, total_steps), batches, strict=True):
        epoch = step // steps_per_epoch
        run["unreadable"] += len(batch.problems)
        if run["unreadable"] > max(10, UNREADABLE_LIMIT * (step + 1) * config.batch_size):
            raise ReferenceSetError(
                f"{run['unreadable']} reference images could not be read, e.g. "
                f"{batch.problems[0] if batch.problems else 'see the log'}: restore the "
                "reference set and run the job again (it resumes from its last checkpoint)"
            )
        y = batch.labels
        if y.numel():
            with autocast_for(config, device):
                logits = train_model(batch.images)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
            run["seen"] += y.numel()
            run["loss_sum"] += loss_value * y.numel()
            run["correct"] += int((logits.argmax(1) == y).sum())
            run["window_loss"] += loss_value * y.numel()
            run["window_images"] += y.numel()
        schedule.step()
        now = time.perf_counter()
        run["epoch_seconds"] += now - step_start
        step_start = now
        run["elapsed"] = elapsed_before + (now - session_start)
        result.steps = step + 1
        if bar is not None:
            bar.update(1)
        if result.steps % curve_every == 0 or result.steps == total_steps:
            images = max(1, run["window_images"])
            result.curve.append(
                {
                    "step": float(result.steps),
                    "loss": run["window_loss"] / images,
                    "lr": float(schedule.get_last_lr()[0]),
                }
            )
            run["window_loss"], run["window_images"] = 0.0, 0
        if (step + 1) % steps_per_epoch == 0 or result.steps == total_steps:
            seen = max(1, run["seen"])
            record = {
                "epoch": float(epoch + 1),
                "images": float(run["seen"]),
                "loss": run["loss_sum"] / seen,
                "train_accuracy": run["correct"] / seen,
                "images_per_second": run["seen"] / max(run["epoch_seconds"], 1e-9),
            }
            result.history.append(record)
            run.update(seen=0, loss_sum=0.0, correct=0, epoch_seconds=0.0)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", ips=f"{record['images_per_second']:.0f}"
                )
            if on_epoch is not None:
                on_epoch(record)
        if on_step is not None:
            done = sum(r["images"] for r in result.history) + run["seen"]
            shown_loss = loss_value if y.numel() else float("nan")
            rate = done / max(run["elapsed"], 1e-9)
            on_step(StepReport(result.steps, total_steps, epoch + 1, shown_loss, rate, start_step))
        crash_point("training-step")
        if checkpoint is not None and result.steps < total_steps:
            stop = should_stop is not None and should_stop()
            due = (checkpoint.every_steps and result.steps % checkpoint.every_steps == 0) or (
                now - last_save >= checkpoint.every_seconds
            )
            if stop or due:
                save_state(result.steps)
                last_save = time.perf_counter()
            if stop:
                if bar is not None:
                    bar.close()
                raise TrainingInterrupted(result.steps)
    if bar is not None:
        bar.close()
    result.seconds = run["elapsed"]
    total_seen = sum(int(r["images"]) for r in result.history)
    result.images_per_second = total_seen / max(result.seconds, 1e-9)
    result.unreadable_images = int(run["unreadable"])
    if checkpoint is not None and start_step < total_steps:
        save_state(total_steps)  # the caller removes it once the outputs are saved
    model.eval()
    return result


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 1024,
    with_features: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (float32, CPU) for uint8 images, and penultimate features if asked."""
    model.eval()
    device = next(model.parameters()).device
    logits_out: list[torch.Tensor] = []
    features_out: list[torch.Tensor] = []
    starts = range(0, images.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="score", unit="batch", leave=False)
    for start in starts:
        x = normalize(images[start : start + batch_size].to(device))
        if with_features:
            feats = model.features(x)  # type: ignore[operator]
            logits = model.head(feats)  # type: ignore[operator]
            features_out.append(feats.float().cpu())
        else:
            logits = model(x)
        logits_out.append(logits.float().cpu())
    features = torch.cat(features_out) if with_features else None
    return torch.cat(logits_out), features


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on uint8 images."""
    logits, _ = predict(model, images)
    return float((logits.argmax(1) == labels).float().mean())
