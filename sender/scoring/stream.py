"""Score every reference embedding against a teacher head, streaming from disk.

At ImageNet-21K scale (14.2M x 512) this is one pass over the embedding file in
fixed-size chunks: fp16 -> fp32 into a reused buffer, one fp32 GEMM against the
head, then per row the predicted class, the energy -T logsumexp(z / T) and the
softmax entropy at the same temperature. Only the per-row results (a few bytes
per row) are kept, so resident memory is one chunk plus O(n) outputs.

What makes it fast on a small CPU: the class dimension is padded to a multiple
of 8 (a 365-wide GEMM runs ~1.5x slower than a 368-wide one; padded classes get a
bias of -1e4 so they never win and add exp(.) = 0), denormals are flushed (exp of
very negative logits otherwise takes a slow path), and nothing else in the process
uses a BLAS thread pool while torch's runs. On glibc, the GEMM's per-call packing
buffers (~16 MB) would each be a fresh ``mmap`` (page faults on every chunk: 1.5x
slower end to end), so large blocks are kept on the heap for the pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from protocol.errors import ConfigError

PAD_MULTIPLE = 8
PAD_BIAS = -1.0e4

LogitFn = Callable[[torch.Tensor], torch.Tensor]
_M_MMAP_THRESHOLD = -3


def keep_large_blocks_on_heap(threshold: int = 64 << 20) -> bool:
    """Ask glibc to serve blocks below ``threshold`` from the heap, not fresh mmaps.

    glibc raises its mmap threshold only after the first large free; until then each
    GEMM packing buffer is mapped and faulted anew. Returns False off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


@dataclass
class LinearHead:
    """Logits = x @ weight.T + bias for L2-normalised embeddings x."""

    weight: np.ndarray  # [k, d] float32
    bias: np.ndarray  # [k] float32

    def __post_init__(self) -> None:
        self.weight = np.ascontiguousarray(self.weight, dtype=np.float32)
        self.bias = np.ascontiguousarray(self.bias, dtype=np.float32)
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ConfigError("a linear head needs weight [k, d] and bias [k]")

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for a small in-memory batch (float32 numpy)."""
        with torch.no_grad():
            out = torch.from_numpy(np.ascontiguousarray(x, np.float32)) @ torch.from_numpy(
                self.weight
            ).T + torch.from_numpy(self.bias)
        return out.numpy()

    def padded(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight^T [d, k_pad], bias [k_pad]) with 1/T folded in and padding classes."""
        k, d = self.weight.shape
        k_pad = -(-k // PAD_MULTIPLE) * PAD_MULTIPLE
        weight = torch.zeros((d, k_pad), dtype=torch.float32)
        weight[:, :k] = torch.from_numpy(self.weight).T / temperature
        bias = torch.full((k_pad,), PAD_BIAS, dtype=torch.float32)
        bias[:k] = torch.from_numpy(self.bias) / temperature
        return weight.contiguous(), bias


@dataclass
class StreamScores:
    """Per-row outputs of a streaming pass, plus how long it took."""

    energy: np.ndarray  # float32 [n]
    entropy: np.ndarray | None  # float32 [n]
    predicted: np.ndarray  # int32 [n]
    seconds: float
    stats: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def score_chunks(
    chunks: Iterator[tuple[int, torch.Tensor]],
    n: int,
    head: LinearHead | None,
    temperature: float = 1.0,
    chunk_rows: int = 8192,
    with_entropy: bool = True,
    logit_fn: LogitFn | None = None,
    num_classes: int | None = None,
    progress: bool = True,
) -> StreamScores:
    """Run the per-row reductions over ``chunks`` of float32 embeddings.

    Give a ``head`` (probe, zero-shot: one GEMM) or a ``logit_fn`` mapping a chunk to
    float32 logits [rows, k] (kNN teacher) together with ``num_classes``.

    It stays one long function on purpose: every buffer is allocated once, before the
    loop, and each reduction writes into it in place (``out=``), which is what keeps a
    14.2M-row pass within its time and memory budget (see the module docstring).
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, not {temperature}")
    if (head is None) == (logit_fn is None):
        raise ConfigError("give exactly one of a linear head or a logit function")
    from tqdm import tqdm

    keep_large_blocks_on_heap()
    torch.set_flush_denormal(True)  # process-wide CPU state: switched off again below
    try:
        if head is not None:
            weight, bias = head.padded(temperature)
            k_pad = weight.shape[1]
        else:
            assert num_classes is not None
            k_pad = num_classes
        energy = np.empty(n, dtype=np.float32)
        entropy = np.empty(n, dtype=np.float32) if with_entropy else None
        predicted = np.empty(n, dtype=np.int32)
        logits = torch.empty((chunk_rows, k_pad), dtype=torch.float32)
        work = torch.empty_like(logits)
        peak = torch.empty(chunk_rows)
        arg = torch.empty(chunk_rows, dtype=torch.long)
        total = torch.empty(chunk_rows)
        weighted = torch.empty(chunk_rows)
        log_totals = torch.empty(chunk_rows)
        started = time.perf_counter()
        bar = tqdm(total=n, unit="img", unit_scale=True, disable=not progress, desc="scoring")
        for start, x in chunks:
            rows = x.shape[0]
            z, e = logits[:rows], work[:rows]
            if head is not None:
                torch.addmm(bias, x, weight, out=z)
            else:
                assert logit_fn is not None
                z.copy_(logit_fn(x)).div_(temperature)
            m, a, s, w = peak[:rows], arg[:rows], total[:rows], weighted[:rows]
            log_s = log_totals[:rows]
            torch.max(z, 1, out=(m, a))
            z.sub_(m.unsqueeze(1))
            torch.exp(z, out=e)
            torch.sum(e, 1, out=s)
            stop = start + rows
            torch.log(s, out=log_s)
            energy[start:stop] = (-(m + log_s) * temperature).numpy()
            predicted[start:stop] = a.numpy()
            if entropy is not None:
                # H = log S - sum(e * z) / S with z = logits - max, e = exp(z), S = sum(e)
                e.mul_(z)
                torch.sum(e, 1, out=w)
                entropy[start:stop] = (log_s - w / s).numpy()
            bar.update(rows)
        bar.close()
        seconds = time.perf_counter() - started
        return StreamScores(energy, entropy, predicted, seconds, {"rows_per_second": n / seconds})
    finally:
        torch.set_flush_denormal(False)
