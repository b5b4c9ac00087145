"""What a finished job leaves behind besides its report: weights, an exported model, a plot."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import torch
from torch import nn

from protocol.atomic_files import write_atomic, write_bytes_atomic
from receiver.job_report import SeedRun
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


def export_program(model: nn.Module, image_shape: tuple[int, ...], path: Path) -> dict[str, str]:
    """Export the model with its input normalisation (``torch.export``, any batch size) and
    check the exported program against the trained model on CPU.

    The ``.pt2`` file runs without this package: ``torch.export.load(path).module()(pixels)``,
    or compiled ahead of time for C++ with AOTInductor. Returns a description for the report.
    """
    # training keeps conv weights channels-last; the archive stores only contiguous
    # tensors whole (a non-contiguous one is taken for a slice of a shared storage and
    # torch warns "No complete tensor found in the group!"), so export a contiguous copy
    model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format)
    module = PixelClassifier(model).eval()
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


# the lower panel: (history key, legend name, line style)
ACCURACY_LINES = (
    ("train_accuracy", "training", {"ls": ":"}),
    ("holdout_accuracy", "holdout", {"marker": "o", "ms": 3}),
)


def plot_training_curves(runs: list[SeedRun], path: Path, title: str) -> None:
    """Per seed: training loss by step with the learning rate (top); training accuracy
    per epoch and, with a holdout, held-out accuracy (bottom). To a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(
        2, 1, figsize=(7.5, 6.5), sharex=True, height_ratios=(3, 2)
    )
    rate_axis = loss_axis.twinx()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, run in enumerate(runs):
        colour = colours[number % len(colours)]
        curve = run.curve
        if curve:
            steps = [point["step"] for point in curve]
            loss_axis.plot(
                steps, [p["loss"] for p in curve], color=colour, label=f"seed {run.seed}"
            )
            rate_axis.plot(steps, [p["lr"] for p in curve], color="grey", lw=0.8, ls="--")
        history = [r for r in run.history if "step" in r]
        for key, name, style in ACCURACY_LINES:
            points = [r for r in history if key in r]
            if points:
                accuracy_axis.plot(
                    [r["step"] for r in points],
                    [100 * r[key] for r in points],
                    color=colour,
                    label=f"{name}, seed {run.seed}",
                    **style,
                )
    loss_axis.set_ylabel("training loss")
    rate_axis.set_ylabel("learning rate (dashed)")
    loss_axis.set_title(title)
    loss_axis.legend(loc="upper right", fontsize=8)
    accuracy_axis.set_xlabel("optimizer step")
    accuracy_axis.set_ylabel("accuracy (%)")
    accuracy_axis.set_ylim(0, 100)
    accuracy_axis.grid(alpha=0.3)
    if accuracy_axis.lines:
        accuracy_axis.legend(loc="lower right", fontsize=8, ncol=2)
    figure.tight_layout()
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    plt.close(figure)
