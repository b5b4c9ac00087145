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
    refused = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--bogus"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert refused.returncode == 2 and "unknown option --bogus" in refused.stderr
