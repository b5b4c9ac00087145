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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from protocol.errors import ConfigError
from sender.scoring.scores import ROW_SCORES, ScoreRows, row_scores

PAD_MULTIPLE = 8
PAD_BIAS = -1.0e4

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


@dataclass(frozen=True)
class StreamOptions:
    """How the streamed pass runs."""

    temperature: float = 1.0
    chunk_rows: int = 8192
    progress: bool = True


class ChunkTeacher(Protocol):
    """A teacher that maps a chunk of float32 embeddings to float32 logits (the kNN
    teacher); a :class:`LinearHead` is applied as one fused GEMM instead."""

    num_classes: int

    def logits(self, chunk: torch.Tensor) -> torch.Tensor: ...


@dataclass
class StreamScores:
    """Per-row outputs of a streaming pass, plus how long it took."""

    scores: dict[str, np.ndarray]  # every registered row score, float32 [n]
    predicted: np.ndarray  # int32 [n]
    seconds: float

    @property
    def energy(self) -> np.ndarray:
        return self.scores["energy"]

    @property
    def entropy(self) -> np.ndarray:
        return self.scores["entropy"]

    @property
    def rows_per_second(self) -> float:
        return self.predicted.size / max(self.seconds, 1e-9)


FUSED = ("energy", "entropy")  # computed in place from the same exponentials


@torch.no_grad()
def score_chunks(
    chunks: Iterator[tuple[int, torch.Tensor]],
    n: int,
    teacher: LinearHead | ChunkTeacher,
    options: StreamOptions | None = None,
) -> StreamScores:
    """Every registered row score of ``chunks`` of float32 embeddings, and the teacher's
    label of each row.

    A :class:`LinearHead` (probe, zero-shot) is one GEMM per chunk with 1/T folded in;
    any other teacher's ``logits`` map a chunk to float32 logits [rows, k] (kNN).
    ``energy`` and ``entropy`` are reduced in place (:func:`_fused_reductions`); other
    registered row scores get the chunk's logits and embeddings (:mod:`.scores`).
    """
    options = options or StreamOptions()
    if options.temperature <= 0:
        raise ConfigError(f"temperature must be positive, not {options.temperature}")
    from tqdm import tqdm

    keep_large_blocks_on_heap()
    torch.set_flush_denormal(True)  # process-wide CPU state: switched off again below
    try:
        pass_ = _FusedPass(n, teacher, options)
        started = time.perf_counter()
        bar = tqdm(
            total=n, unit="img", unit_scale=True, disable=not options.progress, desc="scoring"
        )
        for start, x in chunks:
            pass_.add(start, x)
            bar.update(x.shape[0])
        bar.close()
        return StreamScores(pass_.scores, pass_.predicted, time.perf_counter() - started)
    finally:
        torch.set_flush_denormal(False)


class _FusedPass:
    """The buffers of one streamed pass, allocated once: each chunk's logits and every
    reduction are written into them in place (``out=``), which is what keeps a 14.2M-row
    pass within its time and memory budget (see the module docstring)."""

    def __init__(self, n: int, teacher: LinearHead | ChunkTeacher, options: StreamOptions) -> None:
        self.teacher, self.temperature = teacher, options.temperature
        rows = options.chunk_rows
        if isinstance(teacher, LinearHead):
            self.weight, self.bias = teacher.padded(options.temperature)
            width = self.weight.shape[1]
        else:
            width = teacher.num_classes
        self.num_classes = teacher.num_classes
        self.extra = tuple(name for name in ROW_SCORES if name not in FUSED)
        self.scores = {name: np.empty(n, dtype=np.float32) for name in (*FUSED, *self.extra)}
        self.predicted = np.empty(n, dtype=np.int32)
        self.logits = torch.empty((rows, width), dtype=torch.float32)
        self.work = torch.empty_like(self.logits)
        self.peak, self.total = torch.empty(rows), torch.empty(rows)
        self.arg = torch.empty(rows, dtype=torch.long)
        self.weighted, self.log_totals = torch.empty(rows), torch.empty(rows)

    def add(self, start: int, x: torch.Tensor) -> None:
        """Score one chunk of rows ``start, start + len(x)``."""
        rows = x.shape[0]
        z = self.logits[:rows]
        if isinstance(self.teacher, LinearHead):
            torch.addmm(self.bias, x, self.weight, out=z)
        else:
            z.copy_(self.teacher.logits(x)).div_(self.temperature)
        stop = start + rows
        if self.extra:  # before the reductions change z in place
            logits = (z[:, : self.num_classes] * self.temperature).numpy()
            block = ScoreRows(logits, x.numpy(), self.temperature)
            for name, values in row_scores(block, self.extra).items():
                self.scores[name][start:stop] = values
        energy, entropy, predicted = self._fused_reductions(z)
        self.scores["energy"][start:stop] = energy
        self.scores["entropy"][start:stop] = entropy
        self.predicted[start:stop] = predicted

    def _fused_reductions(self, z: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(energy, entropy, argmax) of logits ``z`` (already divided by T), in place."""
        rows = z.shape[0]
        e, m, a = self.work[:rows], self.peak[:rows], self.arg[:rows]
        s, w, log_s = self.total[:rows], self.weighted[:rows], self.log_totals[:rows]
        torch.max(z, 1, out=(m, a))
        z.sub_(m.unsqueeze(1))
        torch.exp(z, out=e)
        torch.sum(e, 1, out=s)
        torch.log(s, out=log_s)
        energy = (-(m + log_s) * self.temperature).numpy()
        # H = log S - sum(e * z) / S with z = logits - max, e = exp(z), S = sum(e)
        e.mul_(z)
        torch.sum(e, 1, out=w)
        return energy, (log_s - w / s).numpy(), a.numpy()
