"""A plain supervised training loop, shared by the receiver's student and the sender's teacher.

Batches come from a source in :mod:`trainer.batches` (uint8 images in memory, or
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protocol.errors import ConfigError, ReferenceSetError
from trainer.batches import AUGMENTATIONS, Batch, TensorBatches, normalize
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.choices import AMP_MODES
from trainer.models import SMALL_CNN, FeatureClassifier, build_model

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
    # progressive resizing (FFCV-style): train at this fraction of the image side at
    # first, growing linearly to full size by 75% of the steps; 0: off
    progressive: float = 0.0

    def __post_init__(self) -> None:
        if self.augment not in ("auto", *AUGMENTATIONS):
            raise ConfigError(
                f"augment must be auto or one of {AUGMENTATIONS}, not {self.augment!r}"
            )
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {AMP_MODES}, not {self.amp!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs and batch size must be >= 1 and the learning rate > 0")
        if self.progressive and not 0.25 <= self.progressive < 1:
            raise ConfigError(
                f"progressive must be 0 (off) or a start fraction in [0.25, 1), "
                f"not {self.progressive}"
            )


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
    loss: float  # the mean over the last curve window (read then, not at every step)
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


PROGRESSIVE_RAMP = 0.75  # progressive resizing reaches full size at this share of the steps


def progressive_side(full: int, start: float, step: int, total_steps: int) -> int:
    """The image side for ``step`` under progressive resizing from ``start`` x ``full``:
    linear to ``full`` at :data:`PROGRESSIVE_RAMP` of the steps, in multiples of 8 px
    (4 px below 64 px), never under 8 px."""
    ramp = max(1, int(PROGRESSIVE_RAMP * total_steps))
    if not start or step >= ramp:
        return full
    side = full * (start + (1.0 - start) * step / ramp)
    multiple = 8 if full >= 64 else 4
    return max(8, min(full, int(side) // multiple * multiple))


def _identity(config: TrainConfig, count: int, num_classes: int, data_id: str) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(config).items() if k not in ("device", "compile")}
    return {"config": settings, "count": count, "num_classes": num_classes, "data": data_id}


Sum = float | torch.Tensor  # a running sum, kept on the training device between reads


@dataclass
class RunningStats:
    """Running sums of the current epoch and of the training curve's current window.

    Loss and accuracy sums stay on the training device (float64) and are read, which
    waits for the device, only for a curve point or an epoch record: no step waits for
    its own loss. Saved in checkpoints as plain numbers (:meth:`state`), so a resumed
    epoch reports what an unbroken one would.
    """

    seen: int = 0
    loss_sum: Sum = 0.0
    correct: Sum = 0
    epoch_seconds: float = 0.0
    elapsed: float = 0.0
    window_loss: Sum = 0.0
    window_images: int = 0
    unreadable: int = 0
    last_loss: float = float("nan")  # the mean loss of the last curve window read

    def add_batch(self, loss: torch.Tensor, images: int, correct: torch.Tensor) -> None:
        weighted = loss.detach().double() * images
        self.seen += images
        self.loss_sum = self.loss_sum + weighted
        self.correct = self.correct + correct
        self.window_loss = self.window_loss + weighted
        self.window_images += images

    def state(self) -> dict[str, float | int]:
        """The sums as numbers, for a checkpoint."""
        values = asdict(self)
        for name in ("loss_sum", "window_loss", "correct"):
            values[name] = _number(values[name])
        return values

    def epoch_record(self, epoch: int) -> dict[str, float]:
        """The finished epoch's history entry; starts the next epoch's sums."""
        seen = max(1, self.seen)
        record = {
            "epoch": float(epoch + 1),
            "images": float(self.seen),
            "loss": float(self.loss_sum) / seen,
            "train_accuracy": float(self.correct) / seen,
            "images_per_second": self.seen / max(self.epoch_seconds, 1e-9),
        }
        self.seen, self.loss_sum, self.correct, self.epoch_seconds = 0, 0.0, 0, 0.0
        return record

    def curve_point(self, step: int, lr: float) -> dict[str, float]:
        """The curve's point for the window ending at ``step``; starts the next window."""
        mean = float(self.window_loss) / max(1, self.window_images)  # waits for the device
        if self.window_images:
            self.last_loss = mean
        point = {"step": float(step), "loss": mean, "lr": lr}
        self.window_loss, self.window_images = 0.0, 0
        return point


def _number(value: Sum) -> float | int:
    return value.item() if isinstance(value, torch.Tensor) else value


def _warmup_cosine(warmup: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup over ``warmup`` steps, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return factor


class _ProgressBar:
    """A tqdm bar over the run's steps, or nothing."""

    def __init__(self, show: bool, total: int, initial: int, model: str) -> None:
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc=f"train {model}", unit="step", leave=False
            )

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def epoch(self, record: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.3f}", ips=f"{record['images_per_second']:.0f}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TrainingRun:
    """One training run: the model, its optimizer and schedule, the data and the statistics.

    :func:`train_classifier` drives it: ``resume`` from a checkpoint, then
    ``train_one_step`` per batch and ``end_epoch`` after the last step of each epoch.
    """

    def __init__(
        self,
        source: Any,
        num_classes: int,
        config: TrainConfig,
        in_channels: int,
        data_id: str,
    ) -> None:
        count = len(source)
        if count == 0:
            raise ConfigError("nothing to train on: the labeled set is empty")
        self.source = source
        self.config = config
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)
        model = build_model(config.model, num_classes, in_channels, config.weights)
        # channels-last: ~20% faster convs, CPU and GPU
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.steps_per_epoch = math.ceil(count / config.batch_size)
        total_steps = max(config.epochs * self.steps_per_epoch, config.min_steps)
        if config.max_steps:
            total_steps = min(total_steps, config.max_steps)
        self.total_steps = total_steps
        self.epochs = math.ceil(total_steps / self.steps_per_epoch)
        warmup = max(1, int(config.warmup_fraction * total_steps))
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_cosine(warmup, total_steps)
        )
        self.result = TrainResult(
            model=self.model, config=asdict(config) | {"epochs_run": self.epochs}
        )
        self.identity = _identity(config, count, num_classes, data_id)
        self.stats = RunningStats()
        self.start_step = 0
        self.order = EpochOrder(source.labels, config.seed, config.balanced)
        self.forward = torch.compile(self.model) if config.compile else self.model

    # --- checkpoints -------------------------------------------------------------------
    def resume(self, path: Path) -> None:
        """Continue from the newest checkpoint of this run at ``path``, if there is one."""
        saved = load_checkpoint(path, self.identity)
        if saved is None:
            return
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["scheduler"])
        self.source.load_state_dict(saved["source"])
        torch.set_rng_state(saved["torch_rng"])
        if self.device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
        self.stats = RunningStats(**saved["run"])
        self.result.history, self.result.curve = list(saved["history"]), list(saved["curve"])
        self.start_step = self.result.resumed_from = int(saved["step"])

    def save(self, path: Path, step: int) -> None:
        """Checkpoint everything a resumed run needs to continue after ``step``."""
        cuda = self.device.type == "cuda"
        save_checkpoint(
            path,
            {
                "identity": self.identity,
                "step": step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(),
                "source": self.source.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
                "run": self.stats.state(),
                "history": self.result.history,
                "curve": self.result.curve,
            },
        )

    # --- steps and epochs ----------------------------------------------------------------
    def plan(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(step, rows)`` for every remaining step: the batch each step trains on."""
        size = self.config.batch_size
        for step in range(self.start_step, self.total_steps):
            epoch, position = divmod(step, self.steps_per_epoch)
            yield step, self.order(epoch)[position * size : (position + 1) * size]

    def check_readable(self, batch: Batch, step: int) -> None:
        """Fail the run once more than ``UNREADABLE_LIMIT`` of its images were unreadable."""
        self.stats.unreadable += len(batch.problems)
        unreadable = self.stats.unreadable
        if unreadable > max(10, UNREADABLE_LIMIT * (step + 1) * self.config.batch_size):
            example = batch.problems[0] if batch.problems else "see the log"
            raise ReferenceSetError(
                f"{unreadable} reference images could not be read, e.g. {example}: restore "
                "the reference set and run the job again (it resumes from its last checkpoint)"
            )

    def train_one_step(self, batch: Batch, step: int) -> None:
        """One optimizer step on ``batch`` (none when all its images were unreadable)."""
        y = batch.labels
        if y.numel():
            images = batch.images
            full = int(images.shape[-1])
            side = progressive_side(full, self.config.progressive, step, self.total_steps)
            if side < full:
                images = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True)
            with autocast_for(self.config, self.device):
                logits = self.forward(images)
                loss = F.cross_entropy(
                    logits.float(), y, label_smoothing=self.config.label_smoothing
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.stats.add_batch(loss, y.numel(), (logits.argmax(1) == y).sum())
        self.schedule.step()

    def end_epoch(self, epoch: int) -> dict[str, float]:
        record = self.stats.epoch_record(epoch)
        self.result.history.append(record)
        return record

    def step_report(self, epoch: int) -> StepReport:
        """Progress after the latest step; its loss is the last curve window's."""
        done = sum(r["images"] for r in self.result.history) + self.stats.seen
        rate = done / max(self.stats.elapsed, 1e-9)
        return StepReport(
            self.result.steps,
            self.total_steps,
            epoch + 1,
            self.stats.last_loss,
            rate,
            self.start_step,
        )

    def finish(self) -> TrainResult:
        result = self.result
        result.seconds = self.stats.elapsed
        total_seen = sum(int(r["images"]) for r in result.history)
        result.images_per_second = total_seen / max(result.seconds, 1e-9)
        result.unreadable_images = int(self.stats.unreadable)
        self.model.eval()
        return result


@dataclass
class StepHooks:
    """What a run does besides optimizing: progress, callbacks and checkpoints."""

    progress: bool = True
    on_epoch: Callable[[dict[str, float]], None] | None = None
    on_step: Callable[[StepReport], None] | None = None
    should_stop: Callable[[], bool] | None = None
    checkpoint: CheckpointPolicy | None = None
    # held-out accuracy of the model, measured at about ``evaluations`` epoch ends
    # (always the last) and kept in the epoch's history entry
    evaluate: Callable[[nn.Module], float] | None = None
    evaluations: int = 12


class _StepLog:
    """Per-step bookkeeping of a training session: wall time, the training curve, epoch
    records, progress display, callbacks and checkpoints."""

    def __init__(self, run: TrainingRun, hooks: StepHooks) -> None:
        self.run, self.hooks = run, hooks
        self.curve_every = max(1, run.total_steps // 200)
        self.bar = _ProgressBar(hooks.progress, run.total_steps, run.start_step, run.config.model)
        self.started = self.last_save = self.step_start = time.perf_counter()
        self.elapsed_before = run.stats.elapsed  # a resumed run's earlier sessions

    def after_step(self, step: int, epoch: int, epoch_done: bool) -> None:
        run, hooks, stats = self.run, self.hooks, self.run.stats
        now = time.perf_counter()
        stats.epoch_seconds += now - self.step_start
        self.step_start = now
        stats.elapsed = self.elapsed_before + (now - self.started)
        run.result.steps = done = step + 1
        self.bar.step()
        if done % self.curve_every == 0 or done == run.total_steps:
            run.result.curve.append(stats.curve_point(done, float(run.schedule.get_last_lr()[0])))
        if epoch_done:
            record = run.end_epoch(epoch)
            record["step"] = float(done)
            if self._evaluated(epoch, done):
                record["holdout_accuracy"] = hooks.evaluate(run.model)
                run.model.train()
                self.step_start = time.perf_counter()  # evaluating is not training time
            self.bar.epoch(record)
            if hooks.on_epoch is not None:
                hooks.on_epoch(record)
        if hooks.on_step is not None:
            hooks.on_step(run.step_report(epoch))
        checkpoint = hooks.checkpoint
        if checkpoint is None or done == run.total_steps:
            return
        stop = hooks.should_stop is not None and hooks.should_stop()
        due = (checkpoint.every_steps and done % checkpoint.every_steps == 0) or (
            now - self.last_save >= checkpoint.every_seconds
        )
        if stop or due:
            run.save(checkpoint.path, done)
            self.last_save = time.perf_counter()
        if stop:
            self.bar.close()
            raise TrainingInterrupted(done)

    def _evaluated(self, epoch: int, done: int) -> bool:
        """Whether this epoch's end is one of the held-out evaluation points."""
        if self.hooks.evaluate is None:
            return False
        every = max(1, math.ceil(self.run.epochs / max(1, self.hooks.evaluations)))
        return (epoch + 1) % every == 0 or done == self.run.total_steps

    def close(self) -> None:
        self.bar.close()


def train_one_epoch(run: TrainingRun, epoch: int, batches: Iterator[Batch], log: _StepLog) -> None:
    """The steps of ``epoch`` that remain to be run (all of them unless resuming)."""
    first = max(run.start_step, epoch * run.steps_per_epoch)
    last = min((epoch + 1) * run.steps_per_epoch, run.total_steps)
    # range first: zip stops before taking a batch of the next epoch from the stream
    for step, batch in zip(range(first, last), batches, strict=False):
        run.check_readable(batch, step)
        run.train_one_step(batch, step)
        log.after_step(step, epoch, epoch_done=step + 1 == last)


def train_classifier(
    data: Any,
    num_classes: int,
    config: TrainConfig,
    in_channels: int = 1,
    hooks: StepHooks | None = None,
    data_id: str = "",
) -> TrainResult:
    """Train ``config.model`` from scratch (or local weights).

    ``data``: ``(uint8 images, labels)`` or a batch source from :mod:`trainer.batches`.
    ``hooks`` (:class:`StepHooks`): progress, callbacks, checkpoints. With a checkpoint
    policy, state is saved periodically, on ``should_stop()`` (which then raises
    :class:`TrainingInterrupted`) and at the end, and a saved run is resumed; the caller
    deletes the file once it has stored the model. ``evaluate(model)`` measures held-out
    accuracy at up to a dozen epoch ends. ``data_id`` names the data a checkpoint was
    made on, so that one of other data is never resumed.
    """
    hooks = hooks or StepHooks()
    checkpoint = hooks.checkpoint
    if isinstance(data, tuple):
        augment = "affine" if config.augment == "auto" else config.augment
        source = TensorBatches(*data, augment, config.seed)
    else:
        source = data
    run = TrainingRun(source, num_classes, config, in_channels, data_id)
    if checkpoint is not None and checkpoint.resume:
        run.resume(checkpoint.path)
    log = _StepLog(run, hooks)
    run.result.steps = run.start_step
    run.model.train()
    batches = iter(source.batches(run.plan(), run.device))  # one stream: prefetch spans epochs
    for epoch in range(run.start_step // run.steps_per_epoch, run.epochs):
        train_one_epoch(run, epoch, batches, log)
    log.close()
    if next(batches, None) is not None:  # also lets the source shut its decoders down
        raise RuntimeError("the batch source yielded more batches than the plan has steps")
    if checkpoint is not None and run.start_step < run.total_steps:
        run.save(checkpoint.path, run.total_steps)  # the caller removes it once outputs are saved
    return run.finish()


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 1024,
    with_features: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (float32, CPU) for uint8 images, and penultimate features if asked
    (``with_features`` needs a :class:`~trainer.models.FeatureClassifier`)."""
    if with_features and not isinstance(model, FeatureClassifier):
        raise ConfigError(f"{type(model).__name__} does not expose penultimate features")
    model.eval()
    device = next(model.parameters()).device
    logits_out: list[torch.Tensor] = []
    features_out: list[torch.Tensor] = []
    from tqdm import tqdm

    bar = tqdm(
        total=images.shape[0], desc="scoring", unit="img", unit_scale=True, disable=not progress
    )
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start : start + batch_size].to(device))
        if isinstance(model, FeatureClassifier) and with_features:
            feats = model.features(x)
            logits = model.classify(feats)
            features_out.append(feats.float().cpu())
        else:
            logits = model(x)
        logits_out.append(logits.float().cpu())
        bar.update(min(batch_size, images.shape[0] - start))
    bar.close()
    features = torch.cat(features_out) if with_features else None
    return torch.cat(logits_out), features


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on uint8 images."""
    logits, _ = predict(model, images)
    return float((logits.argmax(1) == labels).float().mean())
