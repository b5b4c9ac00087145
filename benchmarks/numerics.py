"""Pinned CPU numerics, so that a benchmark's table is the same on any x86 machine.

The same code, seeds and packages gave different student accuracies on an Intel
Xeon and on an AMD EPYC. `python -m benchmarks.reproducibility` finds why: the
numeric libraries pick their kernels by the CPU they run on, and each choice sums
in another order. On the EPYC that recorded ``benchmarks/RESULTS.md``, each of
these alone changes the teacher's weights: ATen's vector width
(``ATEN_CPU_CAPABILITY``, AVX-512 there), oneDNN's instruction set
(``ONEDNN_MAX_CPU_ISA``), MKL's code path (``MKL_CBWR``) and the number of threads.

:data:`PINNED_ENV` fixes them all at what every x86-64 machine of the last decade has
(AVX2) and at two threads; FAISS and OpenBLAS get the same treatment. The cost on
2 cores: the demo's teacher trains as fast, its students about 1.5x slower (oneDNN's
AVX2 convolutions against AVX-512 ones), so ``make demo`` takes ~10 minutes, not 7.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

THREADS = 2
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # torch's convolutions (oneDNN)
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility: one code path
    "FAISS_OPT_LEVEL": "avx2",  # faiss-cpu loads its AVX2 build, not the AVX-512 one
    "OPENBLAS_CORETYPE": "Haswell",  # numpy's OpenBLAS kernels
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "OPENBLAS_NUM_THREADS": str(THREADS),
}
PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "scipy",
    "scikit-learn",
    "faiss-cpu",
    "open_clip_torch",
    "matplotlib",
    "zstandard",
    "msgpack",
    "pillow",
)


def pinned() -> bool:
    """Whether this process started with :data:`PINNED_ENV`."""
    return all(os.environ.get(key) == value for key, value in PINNED_ENV.items())


def reexec_pinned() -> None:
    """Restart this Python process with :data:`PINNED_ENV` unless it already has it (the
    libraries read these variables once, when they load). ``PLADA_UNPINNED=1`` keeps
    the machine's own kernels."""
    if pinned() or os.environ.get("PLADA_UNPINNED") == "1":
        return
    os.environ.update(PINNED_ENV)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def numerics_report() -> dict[str, Any]:
    """What decides the numbers: package versions, CPU, kernels in use and threads."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "pinned": pinned(),
        "environment": {key: os.environ.get(key) for key in PINNED_ENV},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "packages": versions,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
