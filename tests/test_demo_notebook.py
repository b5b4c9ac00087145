"""The demo driver on a reduced world, then the notebook executed on its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.demo_steps import CLI_DIR
from tests.conftest import ROOT, SMALL_SPEC
from tests.subprocess_cli import forkserved_bin

SCHEMES_RUN = ("vanilla-1", "safety-1")
SMALL_RUN = [
    "--reference",
    SMALL_SPEC,
    "--seeds",
    "0",
    "--steps",
    "40",
    "--plan-keeps",
    "1%",
    "--screen-steps",  # each candidate's first proxy; the confirmed ones train all 40
    "10",
    "--clip-samples",  # the world's CLIP, trained on a few batches: the path, not
    "2048",  # its accuracy, is what this test checks
    "--no-export",  # the export is tested with the receiver's own tests
]


def _run(module: str, work, *extra: str) -> str:
    # the machine's own kernels, which are faster: the pinned ones are checked by
    # test_the_demo_restarts_itself_with_pinned_numerics, and their tables in RESULTS.md
    env = dict(os.environ, PYTHONPATH=str(ROOT), PLADA_UNPINNED="1", PLADA_DEMO_QUIET="1")
    shims = forkserved_bin()  # each step's CLI forked from one that has imported torch
    if shims is not None:
        env[CLI_DIR] = str(shims)
    proc = subprocess.run(
        [sys.executable, "-m", module, "--work", str(work), *SMALL_RUN, *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    """`make demo`'s driver, then `make compare`'s in the same folder (its caches warm)."""
    work = tmp_path_factory.mktemp("demo")
    demo = _run("benchmarks.demo", work)
    # a paper scheme and ours; each scheme's select and train are tested on their own
    # elsewhere, so the rest would only repeat those steps
    compare = _run("benchmarks.compare", work, "--teacher-epochs", "5", "--schemes", *SCHEMES_RUN)
    return work, demo, compare


@pytest.fixture(scope="module")
def demo_report(demo_run):
    work, _, compare = demo_run
    return work / "compare.json", compare


def test_demo_runs_the_main_job_once(demo_run) -> None:
    work, stdout, _ = demo_run
    assert stdout.strip().splitlines()[-1] == f"report: {work / 'report.json'}"
    report = json.loads((work / "report.json").read_text())
    plan_json = json.loads((work / "plan" / "plan.json").read_text())
    chosen = next(r for r in plan_json["candidates"] if r["name"] == plan_json["chosen"])
    assert report["plan"]["candidate"] == plan_json["chosen"] and chosen["stage"] == "final"
    assert abs(report["payload"]["bytes"] - chosen["payload_bytes"]) <= 4  # sequence, time
    link = report["link"]
    assert link["frames"] * 51 >= link["bytes_on_air"] > report["payload"]["bytes"]
    assert link["seconds"] == pytest.approx(link["bytes_on_air"] * 8 / 980, abs=0.1)
    for picture in report["pictures"].values():
        assert Path(picture).stat().st_size > 5_000, picture
    (accuracy,) = report["student_accuracies"]
    assert f"{accuracy:.1%}; the plan predicted" in stdout
    # task, reference, world-clip, embed, merge, index, score, keygen, plan, select,
    # frames; the device's reference, trust, verify, train
    assert "[15/15] receiver train plan ..." in stdout
    assert set(report["steps"]) >= {"world-clip", "embed", "plan", "frames", "train-plan"}


def test_compare_report_has_every_row(demo_report) -> None:
    path, stdout = demo_report
    report = json.loads(path.read_text())
    schemes = [row["scheme"] for row in report["rows"]]
    assert schemes == [*SCHEMES_RUN, "demo-plan", "plan", "pixels"]
    # make demo's own plan, as the demo left it: its payload trained with the compare's seeds
    demo_plan = next(r for r in report["rows"] if r["scheme"] == "demo-plan")
    demo_json = json.loads((path.parent / "plan" / "plan.json").read_text())
    assert demo_plan["candidate"] == demo_json["chosen"]
    assert "plan's choice, make demo's grid" in stdout
    plan = next(r for r in report["rows"] if r["scheme"] == "plan")
    plan_json = json.loads((path.parent / "compare-plan" / "plan.json").read_text())
    chosen = next(r for r in plan_json["candidates"] if r["name"] == plan_json["chosen"])
    assert plan["candidate"] == plan_json["chosen"] and chosen["stage"] == "final"
    assert plan["predicted_accuracy"] == chosen["predicted_accuracy"]
    assert abs(plan["payload_bytes"] - chosen["payload_bytes"]) <= 4  # sequence number, time
    assert (
        len(plan_json["candidates"]) == 18 and (path.parent / "compare-plan" / "plan.png").is_file()
    )
    assert "plan's choice" in stdout
    budget = next(r for r in report["rows"] if r["scheme"] == "safety-1")["payload_bytes"]
    pixels = next(r for r in report["rows"] if r["scheme"] == "pixels")
    assert pixels["payload_bytes"] <= budget
    assert report["reference"]["fingerprint"] == report["reference_fingerprint_receiver"]
    numerics = report["numerics"]  # what decides the numbers (benchmarks/numerics.py)
    assert not numerics["pinned"] and numerics["packages"]["torch"] and numerics["cpu"]
    assert "teacher" in stdout and "student accuracy" in stdout
    # task, reference, world-clip, embed, merge, index, two scores (the key is there
    # from the demo), a select per scheme, plan + select, receiver reference, trust; a
    # train per scheme and both plans' (the demo's plan is the demo's own)
    steps = 14 + 2 * len(SCHEMES_RUN)
    assert f"[{steps}/{steps}] receiver train compare-plan ..." in stdout  # each step numbered


def test_notebook_executes_on_the_report(demo_report) -> None:
    import nbformat
    from nbclient import NotebookClient

    path, _ = demo_report
    notebook = nbformat.read(ROOT / "notebooks" / "demo_report.ipynb", as_version=4)
    os.environ["PLADA_REPORT"] = str(path)
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    finally:
        del os.environ["PLADA_REPORT"]
    assert (path.parent / "accuracy_vs_bytes.png").stat().st_size > 10_000


def test_the_demo_restarts_itself_with_pinned_numerics(tmp_path) -> None:
    """reexec_pinned() restarts the process with PINNED_ENV, which torch then uses."""
    from benchmarks.numerics import PINNED_ENV

    script = tmp_path / "pinned.py"
    script.write_text(
        "import json, os, sys\n"
        "from benchmarks.numerics import numerics_report, reexec_pinned\n"
        "reexec_pinned()\n"
        "print(json.dumps([sys.argv[1:], numerics_report()]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in PINNED_ENV and k != "PLADA_UNPINNED"}
    proc = subprocess.run(
        [sys.executable, str(script), "--an", "argument"],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    argv, numerics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert argv == ["--an", "argument"] and numerics["pinned"]
    assert numerics["torch_cpu_capability"] == "AVX2" and numerics["torch_threads"] == 2
