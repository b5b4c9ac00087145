"""Coverage-guided fuzzing of the payload decoder (atheris / libFuzzer).

The target and its three modes (raw bytes under a strict trust policy; frames
re-signed by the trusted key, to reach everything behind the signature; unsigned
development mode) are in ``benchmarks/fuzz_target.py``. The contract checked:
decoding returns a payload or raises a ``PladaError`` subtype; anything else
(another exception, a crash, a hang past ``-timeout``) is a finding. The seed
corpus is made by the real encoder (signed and unsigned; varint and block
codings; fixed and reference blocks). Statistics (inputs, typed rejections by
type, accepted, slowest decode, peak memory) are written as JSON every 10,000
inputs and at the end.

    python -m benchmarks.fuzz_payload --runs 1000000 --stats fuzz.json [--seed 1]

The link's parsers have campaigns of their own (``benchmarks/fuzz_link.py``):
``--mode frame`` (frame parsing, with and without the link key, and the RaptorQ
assembler), ``--mode frames-inbox`` (frame and stream files through a real frames
inbox pass) and ``--mode reply`` (reply files).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["protocol", "receiver", "benchmarks.fuzz_"]):
    from benchmarks.fuzz_link import LINK_MODES, link_input, seed_link_inputs
    from benchmarks.fuzz_target import (
        INTAKE_MODE,
        MODES,
        decode_input,
        intake_input,
        seed_inputs,
    )


class Stats:
    """What the run saw, written as JSON."""

    def __init__(self, path: Path, runs: int) -> None:
        self.path, self.runs = path, runs
        self.inputs = 0
        self.outcomes: Counter[str] = Counter()
        self.modes: Counter[str] = Counter()
        self.slowest = (0.0, "", 0)
        self.max_input = 0
        self.started = time.perf_counter()
        self.base_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def record(self, mode: str, outcome: str, seconds: float, size: int) -> None:
        self.inputs += 1
        self.modes[mode] += 1
        self.outcomes[outcome] += 1
        self.max_input = max(self.max_input, size)
        if seconds > self.slowest[0]:
            self.slowest = (seconds, f"{mode}:{outcome}", size)
        if self.inputs % 10_000 == 0 or self.inputs == self.runs:
            self.write()

    def write(self) -> None:
        elapsed = time.perf_counter() - self.started
        report = {
            "inputs": self.inputs,
            "mode": MODE or "all",
            "crashes": 0,  # a crash stops the run before this is written again
            "seconds": round(elapsed, 1),
            "inputs_per_second": round(self.inputs / max(elapsed, 1e-9), 1),
            "accepted": self.outcomes.get("accepted", 0),
            "rejections_by_type": dict(self.outcomes.most_common()),
            "modes": dict(self.modes),
            "max_decode_ms": round(self.slowest[0] * 1000, 3),
            "slowest": {"outcome": self.slowest[1], "bytes": self.slowest[2]},
            "largest_input_bytes": self.max_input,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "start_rss_mb": round(self.base_rss_mb, 1),
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, self.path)


STATS: Stats | None = None
MODE: str | None = None


def test_one_input(data: bytes) -> None:
    """The fuzz target: decode, and let anything but a ``PladaError`` escape."""
    started = time.perf_counter()
    if MODE == INTAKE_MODE:
        mode, outcome = MODE, intake_input(data)
    elif MODE in LINK_MODES:
        mode, outcome = MODE, link_input(data, MODE)
    else:
        mode, outcome = decode_input(data, MODE)
    if STATS is not None:
        STATS.record(mode, outcome, time.perf_counter() - started, len(data))


def main() -> None:
    global STATS, MODE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--stats", default="fuzz-stats.json")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=8192)
    parser.add_argument("--corpus", help="corpus directory (default: a temporary one)")
    parser.add_argument(
        "--mode",
        choices=["all", *MODES, INTAKE_MODE, *LINK_MODES],
        default="all",
        help="one mode for every input (all: the first byte of each input picks one of the "
        "decoder modes; intake: inbox entries through a real intake pass)",
    )
    args, extra = parser.parse_known_args()
    MODE = None if args.mode == "all" else args.mode
    corpus = Path(args.corpus or tempfile.mkdtemp(prefix="plada-fuzz-"))
    corpus.mkdir(parents=True, exist_ok=True)
    seeds = seed_link_inputs(MODE) if MODE in LINK_MODES else seed_inputs(MODE)
    for number, data in enumerate(seeds):
        (corpus / f"seed-{number}").write_bytes(data)
    STATS = Stats(Path(args.stats), args.runs)
    print(
        f"fuzzing {args.mode}: {args.runs} inputs, corpus {corpus}",
        file=sys.stderr,
    )
    libfuzzer = [
        sys.argv[0],
        f"-runs={args.runs}",
        f"-seed={args.seed}",
        f"-max_len={args.max_len}",
        "-timeout=10",
        "-rss_limit_mb=4096",
        "-print_final_stats=1",
        *extra,
        str(corpus),
    ]
    atheris.Setup(libfuzzer, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
