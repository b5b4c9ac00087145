"""Student architectures: a small CNN for the embedded glyph world, or any torchvision model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from protocol.errors import ConfigError, WeightsError, exception_summary

SMALL_CNN = "small-cnn"


@runtime_checkable
class FeatureClassifier(Protocol):
    """A classifier that exposes its penultimate embedding (teachers label and embed
    the reference set with one forward pass)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding, [N, embedding_dim]."""
        ...

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from :meth:`features` (in eval mode: the same as ``forward``)."""
        ...


class SmallCNN(nn.Module):
    """A compact CNN for small grayscale images (the glyph world): ~60k parameters.

    A 2x2 average-pool stem halves the resolution first, which keeps CPU training
    and full-pool scoring fast; ``features`` exposes the penultimate embedding.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            nn.AvgPool2d(2),
            *block(in_channels, width),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.MaxPool2d(2),
            *block(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(4 * width, num_classes)
        self.embedding_dim = 4 * width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding, [N, embedding_dim]."""
        return self.body(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from :meth:`features` (dropout is active in training mode only)."""
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.body(x))


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 1,
    weights: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Build ``small-cnn`` or a torchvision classification model by name.

    ``weights`` is an optional local state_dict file (no downloads); entries whose
    shapes do not fit (e.g. a 1000-class head) are left at their initial values.
    """
    if name == SMALL_CNN:
        model: nn.Module = SmallCNN(num_classes=num_classes, in_channels=in_channels)
    else:
        import torchvision

        available = set(torchvision.models.list_models(module=torchvision.models))
        if name not in available:
            raise ConfigError(
                f"unknown model {name!r}: use {SMALL_CNN!r} or a torchvision classification "
                f"model such as resnet18, mobilenet_v3_small, efficientnet_b0"
            )
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> list[str]:
    """Load matching tensors from a local state_dict file; returns the skipped keys."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist: copy the model weights to this device "
            "(no download is attempted) or omit the weights option to train from scratch"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable files
        raise WeightsError(
            f"weights file {path} is unreadable ({exception_summary(exc)}); re-copy it"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} does not hold a state_dict")
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise WeightsError(f"no tensor in {path} fits this model: wrong architecture?")
    model.load_state_dict(fitting, strict=False)
    return sorted(set(own) - set(fitting))
