"""The README's quick start and every docs page's ``sh`` blocks, run as written.

Each block runs in bash (``set -e``) in one fresh folder that holds a link to this
checkout's ``.venv``, the README's quick start first, then each page's blocks, which
build on its files. Only :data:`REWRITES` change the commands: a smaller glyph world
and shorter teachers, proxies and students (one split teacher in the plan), so that
the suite stays short; the commands, their order and every other option are the
page's own. Blocks fenced as
``text`` show hardware a test machine lacks (GPUs, ImageNet-21K, Ray clusters) or
benchmarks (docs/reproducibility.md: ten fresh processes, a minute).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_forkserver import ENTRY_POINTS
from tests.conftest import ROOT, SMALL_SPEC
from tests.subprocess_cli import forkserved_bin

PAGES = (
    "sender.md",
    "production.md",
    "receiver.md",
    "trust.md",
    "link.md",
    "formats.md",
)
REWRITES = (
    ("--reference glyphs", f"--reference '{SMALL_SPEC}'"),
    ("plada-send world-clip ", "plada-send world-clip --samples 1024 "),
    ("plada-send score ", "plada-send score --teacher-epochs 3 "),
    # one split teacher: the second is tested in test_plan.py and by the demo's test
    ("plada-send plan ", "plada-send plan --screen-steps 5 --confirm-steps 10 --teacher-splits 1 "),
    ("plada-receive train ", "plada-receive train --min-steps 20 --max-steps 20 --no-export "),
    ("plada-receive daemon ", "plada-receive daemon --min-steps 20 --max-steps 20 --no-export "),
)
SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)


def sh_blocks(page: Path) -> list[str]:
    """The page's ``sh`` blocks, rewritten (:data:`REWRITES`)."""
    blocks = SH_BLOCK.findall(page.read_text())
    for old, new in REWRITES:
        blocks = [block.replace(old, new) for block in blocks]
    return blocks


def run_blocks(blocks: list[str], folder: Path) -> str:
    """Run ``blocks`` in bash in ``folder`` (with the suite's rendered pools); their
    output (a failure shows it all)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PLADA_CACHE=str(folder / "cache"))
    env.pop("VIRTUAL_ENV", None)
    script = "set -euo pipefail\n" + "\n".join(blocks)
    proc = subprocess.run(
        ["bash", "-c", _forkserved_commands() + script],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"{script}\n--- output:\n{proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def _forkserved_commands() -> str:
    """Shell functions that run ``plada-send`` and ``plada-receive`` through the fork
    server (the installed scripts' own calls, without their imports each time)."""
    shims = forkserved_bin()
    if shims is None:
        return ""
    return "".join(
        f'{name}() {{ {shlex.quote(str(shims / name))} "$@"; }}\n' for name in ENTRY_POINTS
    )


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The README's quick start, pasted into a shell in a fresh folder."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".venv").symlink_to(sys.prefix)  # the environment this suite runs in
    (folder / "cache").symlink_to(cache_dir)  # the suite's rendered pools
    (block,) = sh_blocks(ROOT / "README.md")
    output = run_blocks([block], folder)
    assert "holdout accuracy" in output
    return folder


def test_readme_quick_start_trains_a_student(quick_start: Path) -> None:
    import json

    report = json.loads((quick_start / "work/student/report.json").read_text())
    assert report["runs"] and (quick_start / "work/task.selection.png").stat().st_size > 5_000


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_commands_run(page: str, quick_start: Path) -> None:
    blocks = sh_blocks(ROOT / "docs" / page)
    assert blocks, f"docs/{page} has no command a test runs"
    # "after the README's quick start, in the same folder": its shell has the commands
    run_blocks(["source .venv/bin/activate", *blocks], quick_start)


def test_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in (*PAGES, "reproducibility.md", "layout.md", "fleet.md"):
        assert f"(docs/{page})" in readme, page
    # every fence opens and closes on a line of its own
    fences = [line for line in readme.splitlines() if line.lstrip().startswith("```")]
    assert len(fences) % 2 == 0 and all(re.fullmatch(r"\s*```\w*", f) for f in fences)
