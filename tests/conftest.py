"""Shared fixtures: a reduced glyph world cached once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One compute thread per test process, and for every CLI it starts (they inherit the
# environment): `make test` runs two processes on two cores, and two processes of two
# OpenMP threads each spin-wait on each other's cores. A 10-second plan took 62 s beside
# a second one with the default threads, 14 s with one thread each (benchmarks/RESULTS.md,
# "Test suite"). Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
SMALL_CONCEPTS = (
    *(f"digit-{d}" for d in range(10)),
    "latin-upper-O",
    "latin-upper-S",
    "latin-upper-Z",
    "latin-lower-l",
    "latin-lower-g",
    "latin-lower-b",
    "symbol-at",
    "symbol-equals",
    "symbol-hash",
    "shape-star",
    "shape-circle",
    "greek-lower-alpha",
    "greek-upper-sigma",
    "symbol-plus",
)
SMALL_PER = 120
SMALL_SPEC = f"glyphs:per={SMALL_PER},concepts={'+'.join(SMALL_CONCEPTS)}"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plada-cache")


@pytest.fixture(scope="session")
def small_pool(cache_dir: Path):
    from protocol.reference.factory import open_reference

    return open_reference(SMALL_SPEC, cache_dir)


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for running the real CLIs in subprocesses."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable


# `make test` runs two pytest-xdist processes with --dist loadfile: each test file goes,
# whole, to the next free process, in collection order. The longest files go first, so
# that none of them starts last and leaves one process working alone at the end.
LONGEST_FILES_FIRST = (
    "test_receiver_daemon.py",
    "test_demo_notebook.py",  # one module fixture of ~2 minutes: start it early
    "test_docs.py",  # the README's quick start, then each docs page: ~2 minutes
    "test_embed_ray.py",  # three Ray instances, one after another
    "test_production_sender.py",
    "test_cli_end_to_end.py",
    "test_link_daemon.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
