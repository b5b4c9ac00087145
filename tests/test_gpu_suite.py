"""``benchmarks/gpu_suite.sh`` in smoke mode: the prepared GPU run works end to end on
the CPU, so it is ready whenever a GPU machine is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_suite_smoke_mode_writes_its_table(tmp_path) -> None:
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (tmp_path / "gpu_suite.md").read_text()
    for row in (
        "embed: embed --decode pil",
        "embed: embed --decode torchvision",
        "embed: embed --decode torchcodec",
        "embed: model only, tensors on device",
        "train: end to end",
        "train: cached: epoch 1",
        "train: cached: later epochs",
        "train: compute only",
    ):
        assert f"| {row} |" in table, (row, table)
    embed = json.loads((tmp_path / "embed.json").read_text())
    assert all(c["min"] >= 0.999 for c in embed["cosine_vs_pil"].values()), embed
    receiver = json.loads((tmp_path / "receiver.json").read_text())
    assert receiver["cache"] == "memory" and receiver["images_per_second"]["end to end"] > 0
    _check_ray_rows(tmp_path)
    refused = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--bogus"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert refused.returncode == 2 and "unknown option --bogus" in refused.stderr


def _check_ray_rows(folder) -> None:
    """The full run's embed_distributed rows (measured on the GPU only) reach the table."""
    from benchmarks.embed_distributed import _row
    from benchmarks.gpu_report import report
    from sender.embedding.local import EmbedSummary

    def summary(seconds: float) -> EmbedSummary:
        return EmbedSummary(4, 4, 0, 4, 1024, 0, seconds, {}, seconds / 4, 256)

    local, ray = (
        _row("ViT-B-32", "local", 1, summary(2.0), 4),
        _row("ViT-B-32", "ray", 2, summary(4.0), 4),
    )
    ray |= {"vs_local": 0.5, "overhead_ms_per_batch": 500.0, "identical_to_local": True}
    (folder / "embed-distributed.json").write_text(json.dumps({"runs": [local, ray]}))
    table = report(folder, "full")
    assert "| ViT-B-32 ray | 2 | 1.0 | 256 | 0.50x | +500.0 | yes |" in table, table
