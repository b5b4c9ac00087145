"""A plain supervised training loop, shared by the receiver's student and the sender's teacher.

Images arrive as uint8 tensors [N, C, H, W] (or a Dataset yielding such tensors);
augmentation runs batched on the training device; AdamW with linear warmup and
cosine decay, as in torchvision's classification reference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from protocol.errors import ConfigError
from receiver.models import SMALL_CNN, build_model

AUGMENTATIONS = ("none", "affine", "affine-flip")


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
    augment: str = "affine"
    seed: int = 0
    device: str = "auto"
    weights: str | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {AUGMENTATIONS}, not {self.augment!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs and batch size must be >= 1 and the learning rate > 0")


@dataclass
class TrainResult:
    """The trained model and what happened while training it."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    config: dict[str, object] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float (channels-last), roughly zero-mean unit-range per channel."""
    x = images.float().div_(255.0).contiguous(memory_format=torch.channels_last)
    if x.shape[1] == 3:
        mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return (x - mean) / std
    return (x - 0.5) / 0.5


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random affine (rotation, scale, shift) per image, optionally a horizontal flip."""
    if kind == "none":
        return x
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator).mul_(high - low).add_(low).to(x.device)

    angle = uniform(-0.17, 0.17)
    scale = uniform(0.9, 1.1)
    tx, ty = uniform(-0.1, 0.1), uniform(-0.1, 0.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    flip = torch.ones(n, device=x.device)
    if kind == "affine-flip":
        flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    background = x.amin(dim=(2, 3), keepdim=True)
    return F.grid_sample(x - background, grid, align_corners=False) + background


def _loader(data: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        data,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        drop_last=False,
    )


def train_classifier(
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    config: TrainConfig,
    in_channels: int = 1,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``config.model`` from scratch (or local weights) on uint8 images and labels."""
    if isinstance(data, tuple):
        data = TensorDataset(*data)
    count = len(data)  # type: ignore[arg-type]
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
    augment_rng = torch.Generator().manual_seed(config.seed + 1)
    loader = _loader(data, config.batch_size, True, config.seed, config.num_workers)
    result = TrainResult(model=model, config=asdict(config) | {"epochs_run": epochs})
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc=f"train {config.model}", unit="step", leave=False)
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        seen, loss_sum, correct, epoch_start = 0, 0.0, 0, time.perf_counter()
        for images, labels in loader:
            x = augment_batch(normalize(images.to(device)), config.augment, augment_rng)
            y = labels.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += y.numel()
            loss_sum += loss.item() * y.numel()
            correct += int((logits.argmax(1) == y).sum())
            result.steps += 1
            if bar is not None:
                bar.update(1)
            if result.steps == total_steps:
                break
        elapsed = time.perf_counter() - epoch_start
        record = {
            "epoch": float(epoch + 1),
            "images": float(seen),
            "loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "images_per_second": seen / max(elapsed, 1e-9),
        }
        result.history.append(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", ips=f"{record['images_per_second']:.0f}")
        if on_epoch is not None:
            on_epoch(record)
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - started
    total_seen = sum(int(r["images"]) for r in result.history)
    result.images_per_second = total_seen / max(result.seconds, 1e-9)
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
