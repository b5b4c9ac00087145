"""Which CPU settings change the numbers? The demo's teacher, trained under each.

Each row trains the CNN teacher of ``make demo`` (sklearn digits, seed 0) in a fresh
process with one setting changed and prints a digest of its weights, its test
accuracy and its time. Rows whose digest differs from the machine's default show a
setting that makes results machine-dependent; the pinned rows (see
:mod:`benchmarks.numerics`) must agree with each other, including the one that
pretends the CPU has no AVX-512 for MKL.

    python -m benchmarks.reproducibility [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.numerics import PINNED_ENV

# (row name, environment changes; None: leave unset)
ROWS: tuple[tuple[str, dict[str, str]], ...] = (
    ("machine default", {}),
    ("ATen kernels AVX2 (ATEN_CPU_CAPABILITY=avx2)", {"ATEN_CPU_CAPABILITY": "avx2"}),
    ("ATen kernels scalar (ATEN_CPU_CAPABILITY=default)", {"ATEN_CPU_CAPABILITY": "default"}),
    ("oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA)", {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    ("MKL one code path (MKL_CBWR=AVX2)", {"MKL_CBWR": "AVX2"}),
    ("one thread (OMP_NUM_THREADS=1)", {"OMP_NUM_THREADS": "1"}),
    ("pinned (benchmarks.numerics)", dict(PINNED_ENV)),
    ("pinned, again", dict(PINNED_ENV)),
    ("pinned, MKL told the CPU has AVX2 only", {**PINNED_ENV, "MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    ("pinned, one thread", {**PINNED_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
)


def child(epochs: int) -> None:
    """Train the teacher once and print one JSON line."""
    import hashlib

    import numpy as np
    import torch

    from protocol.world.digits import load_digits_split
    from sender.scoring.image_teachers import CnnTeacher

    train, test = load_digits_split()
    started = time.perf_counter()
    teacher = CnnTeacher(epochs=epochs, seed=0)
    teacher.fit(train, progress=False)
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for tensor in teacher.model.state_dict().values():
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    logits, _ = teacher.logits(test.images)
    print(
        json.dumps(
            {
                "digest": digest.hexdigest()[:16],
                "accuracy": float(np.mean(logits.argmax(1) == test.labels)),
                "seconds": seconds,
                "capability": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="teacher epochs per row")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.epochs)
    base = {k: v for k, v in os.environ.items() if k not in PINNED_ENV and k != "PLADA_UNPINNED"}
    print(f"{'setting':52s} {'weights':16s} {'accuracy':>8s} {'seconds':>7s}  kernels")
    default_digest = None
    epochs = str(args.epochs)
    for name, changes in ROWS:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.reproducibility", "--child", "--epochs", epochs],
            env={**base, **changes},
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        default_digest = default_digest or row["digest"]
        same = "=" if row["digest"] == default_digest else " "
        print(
            f"{name:52s} {row['digest']}{same} {100 * row['accuracy']:7.2f}% "
            f"{row['seconds']:7.2f}  {row['capability']}, {row['threads']} threads"
        )
    print("(= : the same weights as the machine's default)")


if __name__ == "__main__":
    main()
