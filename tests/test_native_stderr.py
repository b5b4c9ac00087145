"""The filter on descriptor 2 that drops Ray's C++ notice about actor arguments."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = r"""
import os, sys
from sender.embedding.native_stderr import dropping_native_lines

os.write(2, b"before\n")
with dropping_native_lines("has constructor arguments in the object store"):
    os.write(2, b"native one\n[core_worker.cc:2170] Actor X has constructor arguments ")
    os.write(2, b"in the object store and max_restarts > 0.\nnative ")
    print("python line", file=sys.stderr)
    os.write(2, b"two\n" + b"x" * 200000 + b"\n")
    os.write(2, b"a tail without a newline")
os.write(2, b"\nafter\n")
print("python after", file=sys.stderr)
"""


def test_only_the_named_native_lines_are_dropped() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    lines = proc.stderr.decode().splitlines()
    assert "constructor arguments" not in proc.stderr.decode()
    # native lines in their order, split writes joined, long lines whole; Python's own
    # writes go straight through (so they may come before native lines still in the pipe)
    native = [line for line in lines if not line.startswith("python")]
    assert native == [
        "before",
        "native one",
        "native two",
        "x" * 200000,
        "a tail without a newline",
        "after",
    ]
    assert lines.count("python line") == 1 and lines[-1] == "python after"


def test_stderr_that_is_not_descriptor_2_is_left_alone() -> None:
    script = (
        "import io, os, sys\n"
        "from sender.embedding.native_stderr import dropping_native_lines\n"
        "buffer = sys.stderr = io.StringIO()\n"
        "with dropping_native_lines('drop me'):\n"
        "    print('kept in the buffer', file=sys.stderr)\n"
        "    os.write(2, b'drop me\\nnative kept\\n')\n"
        "assert sys.stderr is buffer\n"
        "os.write(1, buffer.getvalue().encode())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, cwd=ROOT, timeout=120, check=True
    )
    assert proc.stdout.decode() == "kept in the buffer\n"
    assert proc.stderr.decode() == "native kept\n"
