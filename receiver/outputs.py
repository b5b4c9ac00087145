"""What a finished job leaves behind besides its report: weights, an exported model, a plot."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from protocol.atomic_files import write_atomic, write_bytes_atomic
from trainer.batches import normalize


class PixelClassifier(nn.Module):
    """A trained model that takes pixel values in [0, 255] (float, NCHW) and normalises them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(pixels))


def save_state_dict(model: nn.Module, path: Path) -> None:
    """The weights as a state_dict file (durable, atomic)."""
    write_atomic(path, lambda handle: torch.save(model.state_dict(), handle), durable=True)


def export_program(model: nn.Module, image_shape: tuple[int, ...], path: Path) -> dict[str, Any]:
    """Export the model with its input normalisation (``torch.export``, any batch size) and
    check the exported program against the trained model on CPU.

    The ``.pt2`` file runs without this package: ``torch.export.load(path).module()(pixels)``,
    or compiled ahead of time for C++ with AOTInductor. Returns a description for the report.
    """
    module = PixelClassifier(copy.deepcopy(model).float().cpu()).eval()
    example = torch.rand(2, *image_shape) * 255
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        check = torch.rand(3, *image_shape) * 255
        expected = module(check)
        error = float((program.module()(check) - expected).abs().max())
    if error > 1e-4 * max(1.0, float(expected.abs().max())):
        raise RuntimeError(f"exported model differs from the trained one by {error}")
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    write_bytes_atomic(path, buffer.getvalue(), durable=True)
    return {
        "file": path.name,
        "format": "torch.export",
        "input": f"float pixels in [0, 255], shape [N, {', '.join(map(str, image_shape))}]",
        "output": "logits [N, classes]",
    }


def plot_training_curves(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss per step for each seed, learning rate on a second axis, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(7, 4))
    rate_axis = loss_axis.twinx()
    for run in runs:
        curve = run.get("curve") or []
        if not curve:
            continue
        steps = [point["step"] for point in curve]
        loss_axis.plot(steps, [point["loss"] for point in curve], label=f"loss, seed {run['seed']}")
        rate_axis.plot(steps, [point["lr"] for point in curve], color="grey", lw=0.8, ls="--")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss")
    rate_axis.set_ylabel("learning rate (dashed)")
    loss_axis.set_title(title)
    loss_axis.legend(loc="upper right")
    figure.tight_layout()
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    plt.close(figure)
