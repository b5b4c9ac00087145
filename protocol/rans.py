"""Static interleaved rANS with integer arithmetic only (payload format v2).

Parameters, fixed by the format (``protocol/FORMAT.md``, section "Entropy coder"):

* state ``x`` is 32 bits and lives in ``[2**16, 2**32)`` between symbols;
* frequencies are 16-bit: every table sums to ``M = 2**16``;
* the coder emits and reads 16-bit words, little-endian, at most one per symbol.

A *section* is coded by ``W`` lanes, each a separate rANS state working through
its own contiguous run of symbols. The decoder advances all lanes in lock-step:
at step ``t`` it decodes the ``t``-th symbol of every lane that still has one, in
ascending lane order, and a lane that needs a word takes the next one from the
section's single word stream. Lanes turn a Python-level loop over symbols into
a NumPy loop over steps, which is what makes pure-NumPy decoding fast; they cost
4 bytes each (the final states).

The encoder starts every lane at ``x = 2**16``, so a decoder that ends a section
with every lane back at ``2**16`` and every word consumed has checked the whole
section: an altered word or state is caught here, before any digest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protocol.errors import CorruptPayloadError, TruncatedPayloadError

SCALE_BITS = 16
TOTAL = 1 << SCALE_BITS  # every frequency table sums to this
STATE_LOW = 1 << 16  # states live in [STATE_LOW, 2**32)
MAX_WEIGHT = 1 << 40  # bound on a transmitted table weight


def normalize_weights(weights: np.ndarray) -> np.ndarray:
    """Turn non-negative integer weights into frequencies summing to ``TOTAL``.

    The rule is part of the format, so both sides compute identical tables from
    the same weights: with ``P`` positive weights summing to ``S``, symbol ``i``
    gets ``1 + floor(w_i * (TOTAL - P) / S)`` if ``w_i > 0`` (else 0), and the
    ``D`` units still missing go one each to the first ``D`` positive symbols.
    """
    w = np.asarray(weights, dtype=np.int64)
    positive = w > 0
    count = int(positive.sum())
    if w.ndim != 1 or count == 0 or count > TOTAL or int(w.min()) < 0:
        raise ValueError("weights need 1..65536 positive entries and none negative")
    if int(w.max()) > MAX_WEIGHT:
        raise ValueError(f"a weight exceeds {MAX_WEIGHT}")
    total = int(w.sum())
    freqs = np.zeros(w.size, dtype=np.int64)
    if total <= (1 << 62) // TOTAL:
        freqs[positive] = 1 + (w[positive] * (TOTAL - count)) // total
    else:  # exact integer arithmetic for very large sums
        freqs[positive] = [1 + (int(v) * (TOTAL - count)) // total for v in w[positive]]
    missing = TOTAL - int(freqs.sum())
    freqs[np.flatnonzero(positive)[:missing]] += 1
    return freqs


@dataclass(frozen=True)
class FrequencyTable:
    """A static model: ``freq[s]`` slots of the ``TOTAL`` slots belong to symbol ``s``."""

    freq: np.ndarray  # int64, sums to TOTAL

    @classmethod
    def from_weights(cls, weights: np.ndarray) -> FrequencyTable:
        return cls(normalize_weights(weights))

    @property
    def size(self) -> int:
        return int(self.freq.size)

    @property
    def cum(self) -> np.ndarray:
        """Start slot of each symbol (length ``size + 1``)."""
        out = np.zeros(self.freq.size + 1, dtype=np.int64)
        np.cumsum(self.freq, out=out[1:])
        return out

    def symbol_of_slot(self) -> np.ndarray:
        """Lookup array: the symbol owning each of the ``TOTAL`` slots."""
        return np.repeat(np.arange(self.freq.size, dtype=np.int32), self.freq)

    def cost_bits(self, counts: np.ndarray) -> float:
        """Exact code length of a message with ``counts[s]`` copies of each symbol ``s``."""
        counts = np.asarray(counts, dtype=np.int64)
        used = np.flatnonzero(counts)
        f = self.freq[used] if used.size else np.zeros(0, np.int64)
        if f.size and int(f.min()) == 0:
            raise ValueError("a symbol with frequency 0 cannot be coded")
        return float((counts[used] * (SCALE_BITS - np.log2(f))).sum())


# --- lanes --------------------------------------------------------------------------------


def split_lanes(count: int, lanes: int) -> np.ndarray:
    """Lane starts: lane ``j`` gets ``count // lanes`` symbols, +1 if ``j < count % lanes``."""
    base, extra = divmod(count, lanes)
    j = np.arange(lanes + 1, dtype=np.int64)
    return j * base + np.minimum(j, extra)


def lanes_for(count: int, steps: int = 2048, max_lanes: int = 1024) -> int:
    """Smallest power of two ``W`` with ``W * steps >= count`` (at most ``max_lanes``)."""
    lanes = 1
    while lanes * steps < count and lanes < max_lanes:
        lanes *= 2
    return lanes


def encode_lanes(cum: np.ndarray, freq: np.ndarray, lane_starts: np.ndarray) -> bytes:
    """Encode a section: symbol ``i`` is the interval ``[cum[i], cum[i] + freq[i])``.

    ``lane_starts`` (length ``W + 1``, non-decreasing, from 0 to the symbol count)
    gives each lane its contiguous run. Returns the section bytes: ``W`` u32
    final states, then the 16-bit words in decoding order.
    """
    cum = np.asarray(cum, dtype=np.int64)
    freq = np.asarray(freq, dtype=np.int64)
    starts = np.asarray(lane_starts, dtype=np.int64)
    lanes = starts.size - 1
    lengths = np.diff(starts)
    steps = int(lengths.max()) if lanes else 0
    x = np.full(lanes, STATE_LOW, dtype=np.int64)
    pushed: list[np.ndarray] = []
    for t in range(steps - 1, -1, -1):
        active = np.flatnonzero(lengths > t)
        position = starts[active] + t
        f = freq[position]
        xa = x[active]
        emit = xa >= (f << 16)
        pushed.append((xa[emit] & 0xFFFF)[::-1])
        xa = np.where(emit, xa >> 16, xa)
        quotient, remainder = np.divmod(xa, f)
        x[active] = (quotient << 16) + remainder + cum[position]
    words = np.concatenate(pushed)[::-1] if pushed else np.zeros(0, dtype=np.int64)
    return x.astype("<u4").tobytes() + words.astype("<u2").tobytes()


class LaneDecoder:
    """Decodes one section in lock-step over its lanes (see the module docstring)."""

    def __init__(self, section: bytes | memoryview, lanes: int, what: str) -> None:
        raw = memoryview(section)
        if len(raw) < 4 * lanes or (len(raw) - 4 * lanes) % 2:
            raise TruncatedPayloadError(f"{what}: section too short for {lanes} lane states")
        self.what = what
        self.x = np.frombuffer(raw[: 4 * lanes], dtype="<u4").astype(np.int64)
        if int(self.x.min(initial=STATE_LOW)) < STATE_LOW:
            raise CorruptPayloadError(f"{what}: a lane state is below 2**16")
        self.words = np.frombuffer(raw[4 * lanes :], dtype="<u2").astype(np.int64)
        self.read = 0

    def slots(self, lanes: np.ndarray | slice) -> np.ndarray:
        """The current slot (low 16 bits of the state) of each listed lane."""
        return self.x[lanes] & 0xFFFF

    def advance(self, lanes: np.ndarray | slice, cum: np.ndarray, freq: np.ndarray) -> None:
        """Consume one symbol per listed lane (ascending), given its interval."""
        xa = self.x[lanes]
        xa = freq * (xa >> 16) + (xa & 0xFFFF) - cum
        need = xa < STATE_LOW
        taken = int(np.count_nonzero(need))
        if taken:
            end = self.read + taken
            if end > self.words.size:
                raise TruncatedPayloadError(f"{self.what}: the coded words end early")
            xa[need] = (xa[need] << 16) | self.words[self.read : end]
            self.read = end
        self.x[lanes] = xa

    def finish(self) -> None:
        """Check the section was consumed exactly and every lane is back at its start."""
        if self.read != self.words.size:
            raise CorruptPayloadError(f"{self.what}: {self.words.size - self.read} unused words")
        if self.x.size and bool(np.any(self.x != STATE_LOW)):
            raise CorruptPayloadError(f"{self.what}: the coded data does not decode consistently")


def decode_lanes(
    section: bytes | memoryview,
    count: int,
    lanes: int,
    table_of: Callable[
        [np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]
    ],
    what: str,
) -> np.ndarray:
    """Decode ``count`` symbols split over ``lanes`` by :func:`split_lanes`.

    ``table_of(positions, slots, decoded)`` returns ``(symbols, cum, freq)`` for the
    symbols at ``positions`` given their lanes' slots; it may look at ``decoded``,
    which holds every symbol of earlier steps (e.g. a lane's previous symbol).
    """
    starts = split_lanes(count, lanes)
    base, extra = divmod(count, lanes)
    decoder = LaneDecoder(section, lanes, what)
    symbols = np.zeros(count, dtype=np.int64)
    heads = starts[:-1]
    every = slice(None)
    for t in range(base + (extra > 0)):
        active = every if t < base else slice(0, extra)
        position = heads[active] + t
        sym, c, f = table_of(position, decoder.slots(active), symbols)
        symbols[position] = sym
        decoder.advance(active, c, f)
    decoder.finish()
    return symbols
