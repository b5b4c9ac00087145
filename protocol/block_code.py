"""Body coding ``blocks/rans`` (payload format v2): a two-level, block-aware code.

Kept images cluster in related blocks (synset folders) and the images kept from
one block mostly share a label. The code therefore describes each *coding block*
first and its images second:

* **membership**: per block a *type* (none kept / all kept / partial at density
  level ``l``, with polarity "kept are the ones" or "dropped are the ones"), then,
  for partial blocks, the positions of the ones as runs of a geometric law with the
  level's probability ``P1 / 2**16``; a block's end is coded as the event "the
  remaining ``r`` images are all zeros", which costs exactly what ``r`` zero bits do;
* **labels**: per non-empty block a majority label (or "same as the previous
  block's"), a purity class, then per image "majority / second / other", the
  second label of blocks that use one, and the other labels explicitly.

Every symbol is coded with static rANS (``protocol/rans.py``) from tables carried
in the body; the run tables are computed from ``P1`` with integer arithmetic.
``protocol/FORMAT.md`` specifies the layout bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from protocol.errors import CorruptPayloadError, InvalidSelectionError, TruncatedPayloadError
from protocol.rans import (
    TOTAL,
    FrequencyTable,
    LaneDecoder,
    decode_lanes,
    encode_lanes,
    lanes_for,
    split_lanes,
)
from protocol.varint import encode_uvarints

MAX_CODING_BLOCK = 4096  # larger reference folders are split into blocks of this size
FIXED_BLOCK_SIZES = (256, 1024, 4096)
MAX_LEVELS = 128
MAX_LABEL_ALPHABET = 4096  # larger class counts use the v1 coding
LEVEL_GRIDS = (1, 2, 3, 4, 6, 8)  # density levels per octave the encoder tries
MAX_RUN_BITS = 10

NONE, FULL = 0, 1  # type symbols; 2 + 2l: sparse at level l, 3 + 2l: dense at level l
TYPE_CONTEXTS = 4  # previous block was none / full / sparse / dense
PURITY_CLASSES = 8  # 0: every image has the majority label; u: non-majority share ~ 2**-u
PURITY_CONTEXTS = 8  # min(7, floor(log2(images kept in the block)))
MAJ, SEC, OTHER = 0, 1, 2
LABELS_FLAT, LABELS_GROUPED = 0, 1  # label modes


class UnplannableError(ValueError):
    """This selection cannot use the ``blocks/rans`` coding; the encoder uses another."""


# --- block layouts ---------------------------------------------------------------------------


def coding_block_starts(block_starts: np.ndarray, n: int) -> np.ndarray:
    """Split reference blocks (folder starts plus ``n``) into coding blocks of <= 4096 images."""
    starts = np.asarray(block_starts, dtype=np.int64)
    if starts.ndim != 1 or starts.size < 2 or starts[0] != 0 or starts[-1] != n:
        raise ValueError("block starts must run from 0 to n")
    sizes = np.diff(starts)
    if int(sizes.min()) <= 0:
        raise ValueError("blocks must be non-empty")
    pieces = -(-sizes // MAX_CODING_BLOCK)
    if int(pieces.max()) == 1:
        return starts
    first = np.repeat(starts[:-1], pieces)
    within = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    return np.append(first + within * MAX_CODING_BLOCK, n)


def fixed_block_starts(n: int, size: int) -> np.ndarray:
    """Blocks of ``size`` images (the last one shorter), for sets without folders."""
    return np.append(np.arange(0, n, size, dtype=np.int64), n)


# --- integer tables ------------------------------------------------------------------------


def run_bits(p1: int) -> int:
    """``log2`` of the run alphabet's continuation symbol ``R`` for level ``p1``."""
    e = 0
    while (p1 << e) < TOTAL:
        e += 1
    return min(MAX_RUN_BITS, max(2, e + 1))


def run_table(p1: int) -> FrequencyTable:
    """Run symbols ``j < R``: ``j`` zeros then a one; ``R``: ``R`` zeros. Integer-exact."""
    r = 1 << run_bits(p1)
    weights = np.empty(r + 1, dtype=np.int64)
    z = 1 << 32
    for j in range(r):
        weights[j] = (z * p1) >> 16
        z = (z * (TOTAL - p1)) >> 16
    weights[r] = z
    return FrequencyTable.from_weights(weights)


def level_grid(per_octave: int) -> np.ndarray:
    """Candidate ``P1`` values ``round(2**15 * 2**(-i/g))``, decreasing, >= 1."""
    values = np.round(32768.0 * 2.0 ** (-np.arange(0, 15 * per_octave + 1) / per_octave))
    return np.unique(np.maximum(values, 1).astype(np.int64))[::-1]


def quantized_weights(counts: np.ndarray) -> list[tuple[np.ndarray, FrequencyTable, float]]:
    """Weight vectors at several precisions for ``counts``, with tables and header bytes."""
    counts = np.asarray(counts, dtype=np.int64)
    top = int(counts.max())
    options = []
    for bits in (2, 4, 6, 8, 10, 12, 16, 40):
        scale = (1 << bits) - 1
        if bits == 40 or top <= scale:
            weights = counts.copy()
        else:
            weights = np.where(counts > 0, np.maximum(1, (counts * scale + top // 2) // top), 0)
        table = FrequencyTable.from_weights(weights)
        size = len(encode_uvarints(np.append(weights.size, weights)))
        options.append((weights, table, float(size)))
        if bits == 40 or top <= scale:
            break
    return options


def best_table(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, FrequencyTable, float]:
    """The weights minimizing table bytes plus coded bytes of ``symbols``; and that total."""
    counts = np.bincount(symbols, minlength=alphabet)
    last = int(np.flatnonzero(counts).max()) + 1
    best = None
    for weights, table, size in quantized_weights(counts[:last]):
        cost = size + table.cost_bits(counts[:last]) / 8
        if best is None or cost < best[2]:
            best = (weights, table, cost)
    assert best is not None
    return best


# --- the plan: every symbol and table, before entropy coding -----------------------------------


@dataclass
class _Section:
    symbols: np.ndarray
    tables: list[FrequencyTable | None]
    contexts: np.ndarray | None = None  # per symbol; None: table 0
    lane_starts: np.ndarray | None = None  # None: split evenly over lanes_for(count)
    cum: np.ndarray | None = None  # explicit intervals (runs)
    freq: np.ndarray | None = None

    def intervals(self) -> tuple[np.ndarray, np.ndarray]:
        """Each symbol's slot interval (start, width)."""
        if self.cum is not None and self.freq is not None:
            return self.cum, self.freq
        ctx = np.zeros(self.symbols.size, np.int64) if self.contexts is None else self.contexts
        cums = _stack([None if t is None else t.cum for t in self.tables])
        freqs = _stack([None if t is None else t.freq for t in self.tables])
        return cums[ctx, self.symbols], freqs[ctx, self.symbols]

    def lanes(self) -> np.ndarray:
        if self.lane_starts is not None:
            return self.lane_starts
        count = int(self.symbols.size)
        return split_lanes(count, lanes_for(count))

    def estimated_bytes(self) -> float:
        """Coded size: exact entropy under the tables, plus lane states and the length."""
        if self.cum is not None and self.freq is not None:
            widths, counts = np.unique(self.freq, return_counts=True)
            bits = float((counts * (16 - np.log2(widths))).sum()) if widths.size else 0.0
        else:
            ctx = np.zeros(self.symbols.size, np.int64) if self.contexts is None else self.contexts
            bits = 0.0
            for c, table in enumerate(self.tables):
                if table is not None:
                    bits += table.cost_bits(
                        np.bincount(self.symbols[ctx == c], minlength=table.size)
                    )
        return bits / 8 + 4 * (self.lanes().size - 1) + 3


def _stack(rows: list[np.ndarray | None]) -> np.ndarray:
    width = max((r.size for r in rows if r is not None), default=1)
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        if row is not None:
            out[i, : row.size] = row
    return out


@dataclass
class BlockPlan:
    """Everything the ``blocks/rans`` coder writes, for one block layout."""

    params: list[np.ndarray] = field(default_factory=list)  # uvarint groups, in order
    sections: list[_Section] = field(default_factory=list)

    def estimated_bytes(self) -> float:
        params = sum(len(encode_uvarints(p)) for p in self.params)
        return params + sum(s.estimated_bytes() for s in self.sections)

    def encode(self) -> bytes:
        out = [encode_uvarints(p) for p in self.params]
        for section in self.sections:
            cum, freq = section.intervals()
            data = encode_lanes(cum, freq, section.lanes())
            out.append(encode_uvarints(np.array([len(data)])))
            out.append(data)
        return b"".join(out)


def _type_context(types: np.ndarray) -> np.ndarray:
    return np.where(types < 2, types, 2 + (types & 1))


def _chunk_previous(values: np.ndarray, starts: np.ndarray, first: int) -> np.ndarray:
    """Each position's predecessor within its lane (``first`` at a lane's start)."""
    prev = np.empty_like(values)
    prev[1:] = values[:-1]
    if values.size:
        prev[starts[:-1][starts[:-1] < values.size]] = first
    return prev


def _bernoulli_bits(ones: np.ndarray, sizes: np.ndarray, q: np.ndarray) -> np.ndarray:
    return -(ones * np.log2(q) + (sizes - ones) * np.log2(1 - q))


def _choose_levels(sizes: np.ndarray, ones: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pick a density grid and a level per partial block; return (levels P1, level index)."""
    best = None
    density = ones / sizes
    for per_octave in LEVEL_GRIDS:
        grid = level_grid(per_octave)
        q = grid / TOTAL
        ideal = np.searchsorted(-q, -density)  # first grid value <= density
        lo = np.clip(ideal - 1, 0, grid.size - 1)
        hi = np.clip(ideal, 0, grid.size - 1)
        c_lo, c_hi = _bernoulli_bits(ones, sizes, q[lo]), _bernoulli_bits(ones, sizes, q[hi])
        pick = np.where(c_lo <= c_hi, lo, hi)
        used, index = np.unique(pick, return_inverse=True)
        if used.size > MAX_LEVELS:
            continue
        counts = np.bincount(index)
        total = float(np.minimum(c_lo, c_hi).sum()) + 2 * used.size
        total += float(-(counts * np.log2(counts / counts.sum())).sum())  # level symbols
        if best is None or total < best[0]:
            best = (total, grid[used], index)
    assert best is not None
    return best[1], best[2]


def _run_events(
    starts: np.ndarray,
    sizes: np.ndarray,
    level: np.ndarray,
    one_pos: np.ndarray,
    ones_per: np.ndarray,
    tables: list[FrequencyTable],
    bits: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run-code every partial block; return per-event (cum, freq) and events per block.

    ``one_pos`` are sorted positions in the concatenation of the partial blocks
    (``starts``/``sizes``), ``ones_per`` their count per block (each >= 1).
    """
    blocks = sizes.size
    block = np.repeat(np.arange(blocks), ones_per)
    offset = one_pos - starts[block]
    first_one = np.cumsum(ones_per) - ones_per
    previous = np.empty_like(offset)
    previous[1:] = offset[:-1]
    previous[first_one] = -1
    gap = offset - previous - 1
    tail = sizes - 1 - offset[first_one + ones_per - 1]  # zeros after each block's last one
    has_tail = (tail > 0).astype(np.int64)
    # segments in coding order: per block its ones (conts, then the one), then its tail
    seg_count = ones_per + has_tail
    seg_start = np.cumsum(seg_count) - seg_count
    one_at = np.arange(one_pos.size) + (np.cumsum(has_tail) - has_tail)[block]
    tail_at = (seg_start + ones_per)[has_tail > 0]
    total_segments = int(seg_count.sum())
    seg_block = np.repeat(np.arange(blocks), seg_count)
    is_tail = np.zeros(total_segments, bool)
    is_tail[tail_at] = True
    value = np.empty(total_segments, np.int64)
    value[one_at] = gap
    value[tail_at] = tail[has_tail > 0]
    r = 1 << bits[level]  # per block
    seg_r = r[seg_block]
    conts = np.where(is_tail, (value - 1) // seg_r, value // seg_r)
    final = value - conts * seg_r  # one: symbol gap % R; tail: remaining in [1, R]
    lvl = level[seg_block]
    cums = _stack([t.cum for t in tables])
    freqs = _stack([t.freq for t in tables])
    length = conts + 1
    ends = np.cumsum(length)
    ev_lvl = np.repeat(lvl, length)
    ev_r = np.repeat(seg_r, length)
    cum = cums[ev_lvl, ev_r]  # continuation symbol R by default
    freq = freqs[ev_lvl, ev_r]
    at = ends - 1
    cum[at] = cums[lvl, final]
    freq[at] = np.where(is_tail, TOTAL - cums[lvl, final], freqs[lvl, final])
    per_block = np.bincount(seg_block, weights=length, minlength=blocks).astype(np.int64)
    return cum, freq, per_block


def run_lane_of_block(estimates: np.ndarray, lanes: int) -> np.ndarray:
    """Lane of each partial block: contiguous runs balanced by estimated events."""
    before = np.cumsum(estimates) - estimates
    total = max(int(estimates.sum()), 1)
    return (before * lanes) // total


def run_estimates(sizes: np.ndarray, p1: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Expected run events of a partial block (integer): ones + continuations + 1."""
    return ((sizes * p1) >> 16) + (sizes >> bits) + 1


def min_run_lanes(partial_images: int) -> int:
    """Fewest lanes the runs section may use, bounding a forged payload's decode steps."""
    return lanes_for(partial_images, steps=1 << 18)


def plan_blocks(
    indices: np.ndarray, labels: np.ndarray, n: int, k: int, starts: np.ndarray
) -> BlockPlan:
    """Compute every symbol and table of the ``blocks/rans`` coding for one layout."""
    starts = np.asarray(starts, dtype=np.int64)
    sizes = np.diff(starts)
    block = np.searchsorted(starts, indices, side="right") - 1
    kept = np.bincount(block, minlength=sizes.size)
    dense = 2 * kept > sizes
    partial = (kept > 0) & (kept < sizes)
    ones_count = np.where(dense, sizes - kept, kept)

    # membership: levels and block types
    p_idx = np.flatnonzero(partial)
    levels, lvl = (
        _choose_levels(sizes[p_idx], ones_count[p_idx])
        if p_idx.size
        else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    )
    bits = np.array([run_bits(int(p)) for p in levels], dtype=np.int64)
    types = np.where(kept == 0, NONE, FULL).astype(np.int64)
    types[p_idx] = 2 + 2 * lvl + dense[p_idx]
    type_lanes = split_lanes(types.size, lanes_for(types.size))
    type_ctx = _type_context(_chunk_previous(types, type_lanes, NONE))
    params: list[np.ndarray] = [np.append(levels.size, levels)]
    type_tables = _context_tables(types, type_ctx, TYPE_CONTEXTS, 2 + 2 * levels.size, params)
    sections = [_Section(types, type_tables, type_ctx, type_lanes)]

    # membership: runs
    run_tables = [run_table(int(p)) for p in levels]
    est = run_estimates(sizes[p_idx], levels[lvl], bits[lvl]) if p_idx.size else np.zeros(0)
    kept_mask_partial = np.zeros(int(sizes[p_idx].sum()), dtype=bool)
    sub_starts = np.append(0, np.cumsum(sizes[p_idx]))
    in_partial = partial[block]
    pos_in_sub = indices[in_partial] - starts[block[in_partial]]
    sub_of = np.searchsorted(p_idx, block[in_partial])
    kept_mask_partial[sub_starts[sub_of] + pos_in_sub] = True
    kept_mask_partial ^= np.repeat(dense[p_idx], sizes[p_idx])  # dense: ones are the dropped
    one_pos = np.flatnonzero(kept_mask_partial)
    if p_idx.size:
        cum, freq, per_block = _run_events(
            sub_starts, sizes[p_idx], lvl, one_pos, ones_count[p_idx], run_tables, bits
        )
        lanes, lane_starts = _choose_run_lanes(est, per_block, int(sub_starts[-1]))
    else:
        cum = freq = np.zeros(0, np.int64)
        lanes, lane_starts = 1, np.zeros(2, np.int64)
    params.append(np.array([lanes.bit_length() - 1]))
    sections.append(_Section(np.zeros(0, np.int64), [], None, lane_starts, cum, freq))

    label_params, label_sections = _plan_labels(block, labels, kept, k)
    params += label_params
    sections += label_sections
    return BlockPlan(params=params, sections=sections)


def _choose_run_lanes(est: np.ndarray, per_block: np.ndarray, partial_images: int):
    """Fewest lanes (>= the minimum) keeping the longest lane within 2048 events."""
    if bool(np.any(per_block > 2 * est + 16)):
        raise UnplannableError("a block's run events exceed the cap of its density level")
    lanes = min_run_lanes(partial_images)
    while True:
        lane = run_lane_of_block(est, lanes)
        load = np.bincount(lane, weights=per_block, minlength=lanes)
        if load.max() <= 2048 or lanes >= 1024:
            break
        lanes *= 2
    first_block = np.searchsorted(lane, np.arange(lanes + 1))
    event_starts = np.append(0, np.cumsum(per_block))
    return lanes, event_starts[first_block]


def _plan_labels(
    block: np.ndarray, labels: np.ndarray, kept: np.ndarray, k: int
) -> tuple[list[np.ndarray], list[_Section]]:
    """The cheaper of the flat and the grouped label codings: (params, sections)."""
    label_w, label_t, _ = best_table(labels, k)
    flat_params = [np.array([LABELS_FLAT]), np.append(label_w.size, label_w)]
    flat = (flat_params, [_Section(labels, [label_t])])
    grouped = _plan_grouped_labels(block, labels, kept, k)
    return min(flat, grouped, key=_estimated_bytes)


def _estimated_bytes(option: tuple[list[np.ndarray], list[_Section]]) -> float:
    params, sections = option
    return sum(len(encode_uvarints(p)) for p in params) + sum(s.estimated_bytes() for s in sections)


def _plan_grouped_labels(
    block: np.ndarray, labels: np.ndarray, kept: np.ndarray, k: int
) -> tuple[list[np.ndarray], list[_Section]]:
    groups = np.flatnonzero(kept)  # non-empty blocks, in order
    unique, counts = _pair_counts(block * k + labels, kept.size * k)
    u_block, u_label = unique // k, unique % k
    # by block, then count descending, then label: the pairs come by block and label, so
    # a stable sort on (block, count descending) keeps the labels' order within a tie
    most = int(counts.max())
    order = np.argsort(u_block * (most + 1) + (most - counts), kind="stable")
    u_block, u_label, counts = u_block[order], u_label[order], counts[order]
    first = np.r_[True, u_block[1:] != u_block[:-1]]
    maj = np.zeros(kept.size, np.int64)
    maj[u_block[first]] = u_label[first]
    second_pos = np.flatnonzero(~first & np.r_[False, first[:-1]])  # rank-2 entries
    sec = np.full(kept.size, -1, np.int64)
    use = counts[second_pos] >= 2
    sec[u_block[second_pos[use]]] = u_label[second_pos[use]]

    g_maj = maj[groups]
    same = (g_maj[1:] == g_maj[:-1]).astype(np.int64)
    explicit_maj = np.append(g_maj[0], g_maj[1:][same == 0])
    image_maj = maj[block]
    flag = np.where(labels == image_maj, MAJ, np.where(labels == sec[block], SEC, OTHER))
    nonmaj = np.bincount(block, weights=flag != MAJ, minlength=kept.size).astype(np.int64)
    multi = groups[kept[groups] >= 2]
    e = nonmaj[multi] / kept[multi]
    purity = np.where(
        e == 0, 0, 1 + np.minimum(6, np.floor(-np.log2(np.maximum(e, 1e-12)))).astype(np.int64)
    )
    block_purity = np.zeros(kept.size, np.int64)
    block_purity[multi] = purity
    purity_ctx = purity_context(kept[multi])
    flagged = block_purity[block] > 0
    image_flags = flag[flagged]
    flag_ctx = block_purity[block][flagged]
    sec_blocks = np.unique(block[flag == SEC])
    sec_labels = sec[sec_blocks]
    other_labels = labels[flag == OTHER]

    explicit = np.concatenate([explicit_maj, sec_labels, other_labels])
    label_w, label_t, _ = best_table(explicit, k)
    params = [np.array([LABELS_GROUPED]), np.append(label_w.size, label_w)]
    (same_t,) = _context_tables(same, np.zeros(same.size, np.int64), 1, 2, params)
    purity_tables = _context_tables(purity, purity_ctx, PURITY_CONTEXTS, PURITY_CLASSES, params)
    flag_tables = _context_tables(image_flags, flag_ctx, PURITY_CLASSES, 3, params)
    sections = [
        _Section(same, [same_t]),
        _Section(explicit_maj, [label_t]),
        _Section(purity, purity_tables, purity_ctx),
        _Section(image_flags, flag_tables, flag_ctx),
        _Section(sec_labels, [label_t]),
        _Section(other_labels, [label_t]),
    ]
    return params, sections


def _pair_counts(keys: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_counts=True)`` for keys in [0, span): a count per key
    where the span is small against the keys (no sort, memory of the sort's order), else
    the sort."""
    if span <= 2 * keys.size + 65536:
        counts = np.bincount(keys, minlength=span)
        unique = np.flatnonzero(counts)
        return unique, counts[unique]
    return np.unique(keys, return_counts=True)


def purity_context(kept: np.ndarray) -> np.ndarray:
    """Context of a block's purity symbol: ``min(7, floor(log2(kept)))``, for ``kept >= 2``."""
    bits = np.zeros(kept.size, np.int64)
    rest = kept.copy()
    for _ in range(PURITY_CONTEXTS - 1):
        rest >>= 1
        bits += rest > 0
    return bits


def _context_tables(
    symbols: np.ndarray, ctx: np.ndarray, contexts: int, alphabet: int, params: list[np.ndarray]
) -> list[FrequencyTable | None]:
    """One best table per context (None where unused), appending each to ``params``."""
    tables: list[FrequencyTable | None] = []
    for c in range(contexts):
        sel = symbols[ctx == c]
        if sel.size == 0:
            tables.append(None)
            params.append(np.array([0]))
            continue
        weights, table, _ = best_table(sel, alphabet)
        tables.append(table)
        params.append(np.append(weights.size, weights))
    return tables


# --- decoding --------------------------------------------------------------------------------


class _Reader:
    """Bounded reads of uvarints and sections from the body."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def uvarint(self, limit: int, what: str) -> int:
        value, shift = 0, 0
        while True:
            if self.pos >= len(self.data):
                raise TruncatedPayloadError(f"body ends inside {what}")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if byte == 0 and shift:
                    raise CorruptPayloadError(f"{what} is not minimally encoded")
                break
            shift += 7
            if shift > 63:
                raise CorruptPayloadError(f"{what} is an over-long varint")
        if value > limit:
            raise CorruptPayloadError(f"{what} = {value} exceeds its limit {limit}")
        return value

    def table(self, alphabet: int, what: str) -> FrequencyTable | None:
        size = self.uvarint(alphabet, f"{what} size")
        if size == 0:
            return None
        weights = np.array(
            [self.uvarint(1 << 40, f"{what} weight") for _ in range(size)], dtype=np.int64
        )
        if weights[-1] == 0:
            raise CorruptPayloadError(f"{what} ends with a zero weight")
        return FrequencyTable.from_weights(weights)

    def section(self, what: str) -> memoryview:
        length = self.uvarint(len(self.data), f"{what} length")
        if self.pos + length > len(self.data):
            raise TruncatedPayloadError(f"{what} section runs past the body")
        out = memoryview(self.data)[self.pos : self.pos + length]
        self.pos += length
        return out


class _TableSet:
    """Tables stacked for vectorized lookup; contexts without a table are refused."""

    def __init__(self, tables: list[FrequencyTable | None], what: str) -> None:
        self.what = what
        self.present = np.array([t is not None for t in tables])
        self.lut = np.zeros((len(tables), TOTAL), dtype=np.int64)
        for i, t in enumerate(tables):
            if t is not None:
                self.lut[i] = t.symbol_of_slot()
        self.cum = _stack([None if t is None else t.cum for t in tables])
        self.freq = _stack([None if t is None else t.freq for t in tables])

    def lookup(self, ctx: np.ndarray, slots: np.ndarray):
        if not bool(self.present[ctx].all()):
            raise CorruptPayloadError(f"{self.what}: a symbol needs a table the body lacks")
        sym = self.lut[ctx, slots]
        return sym, self.cum[ctx, sym], self.freq[ctx, sym]

    def decode(self, section: memoryview, count: int, ctx: np.ndarray | None) -> np.ndarray:
        contexts = np.zeros(count, np.int64) if ctx is None else ctx
        if count and not bool(self.present[contexts].all()):
            raise CorruptPayloadError(f"{self.what}: a symbol needs a table the body lacks")
        lut, cum, freq = self.lut, self.cum, self.freq

        def table_of(pos: np.ndarray, slots: np.ndarray, _: np.ndarray):
            ctx = contexts[pos]
            sym = lut[ctx, slots]
            return sym, cum[ctx, sym], freq[ctx, sym]

        return decode_lanes(section, count, lanes_for(count), table_of, self.what)


@dataclass
class _BodyTables:
    """The tables a ``blocks/rans`` body opens with."""

    levels: np.ndarray  # density levels, decreasing
    types: _TableSet
    run_lanes_log2: int
    label_mode: int
    labels: object  # the label table
    same: object = None  # grouped labels only: the same-flag table
    purity: _TableSet | None = None
    flags: _TableSet | None = None


def _read_tables(reader: _Reader, k: int) -> _BodyTables:
    level_count = reader.uvarint(MAX_LEVELS, "level count")
    levels = np.array(
        [reader.uvarint(32768, "density level") for _ in range(level_count)], dtype=np.int64
    )
    if level_count and (int(levels.min()) < 1 or bool(np.any(np.diff(levels) >= 0))):
        raise CorruptPayloadError("density levels must be decreasing values in [1, 32768]")
    type_alphabet = 2 + 2 * level_count
    type_set = _TableSet(
        [reader.table(type_alphabet, f"type table {c}") for c in range(TYPE_CONTEXTS)], "types"
    )
    run_lanes_log2 = reader.uvarint(10, "run lane count")
    label_mode = reader.uvarint(LABELS_GROUPED, "label mode")
    label_t = reader.table(min(k, MAX_LABEL_ALPHABET), "label table")
    if label_t is None:
        raise CorruptPayloadError("the body has no label table")
    tables = _BodyTables(levels, type_set, run_lanes_log2, label_mode, label_t)
    if label_mode == LABELS_GROUPED:
        tables.same = reader.table(2, "same-flag table")
        tables.purity = _TableSet(
            [reader.table(PURITY_CLASSES, f"purity table {c}") for c in range(PURITY_CONTEXTS)],
            "purity",
        )
        tables.flags = _TableSet(
            [reader.table(3, f"image-flag table {c}") for c in range(PURITY_CLASSES)],
            "image flags",
        )
    return tables


def _decode_types(reader: _Reader, tables: _BodyTables, sizes: np.ndarray) -> np.ndarray:
    """Each coding block's type (empty, full, or partial at a density level)."""
    blocks = sizes.size
    type_lanes = split_lanes(blocks, lanes_for(blocks))
    lane_start = np.zeros(blocks, bool)
    lane_start[type_lanes[:-1][type_lanes[:-1] < blocks]] = True

    def type_of(pos: np.ndarray, slots: np.ndarray, decoded: np.ndarray):
        prev = np.where(lane_start[pos], NONE, decoded[np.maximum(pos - 1, 0)])
        return tables.types.lookup(_type_context(prev), slots)

    types = decode_lanes(reader.section("types"), blocks, lanes_for(blocks), type_of, "types")
    if bool(np.any((types >= 2) & (sizes < 2))):
        raise CorruptPayloadError("a one-image block cannot be partially kept")
    return types


def _kept_indices(
    n: int, starts: np.ndarray, switched_on: np.ndarray, flipped: np.ndarray
) -> np.ndarray:
    """The kept set: the blocks ``switched_on`` whole, then every ``flipped`` row flipped."""
    delta = np.zeros(n + 1, dtype=np.int8)
    delta[starts[switched_on]] = 1
    delta[starts[switched_on + 1]] -= 1
    mask = np.cumsum(delta[:n], dtype=np.int8).view(bool)
    mask[flipped] = ~mask[flipped]
    return np.flatnonzero(mask)


def decode_blocks(body: bytes, n: int, k: int, count: int, starts: np.ndarray):
    """Decode a ``blocks/rans`` body into (indices, labels); typed errors on bad input."""
    starts = np.asarray(starts, dtype=np.int64)
    sizes = np.diff(starts)
    reader = _Reader(body)
    tables = _read_tables(reader, k)
    types = _decode_types(reader, tables, sizes)
    p_idx = np.flatnonzero(types >= 2)  # the partial blocks
    lvl = (types[p_idx] - 2) >> 1
    dense = (types[p_idx] & 1).astype(bool)
    partial_images = int(sizes[p_idx].sum())
    lanes = 1 << tables.run_lanes_log2
    if lanes < min_run_lanes(partial_images):
        raise CorruptPayloadError("the runs section uses fewer lanes than the format allows")
    s_p = sizes[p_idx]
    runs = reader.section("runs")
    one_pos, ones_per = _decode_runs(runs, starts[p_idx], s_p, tables.levels, lvl, lanes)
    if bool(np.any(ones_per == 0)) or bool(np.any(2 * ones_per > s_p)):
        raise CorruptPayloadError("a partial block's runs contradict its type")
    if bool(np.any(dense & (2 * ones_per == s_p))):
        raise CorruptPayloadError("a dense block's runs contradict its type")
    # the kept set: full and dense blocks switched on, then every run "one" flipped
    kept_per = np.where(types == FULL, sizes, 0)
    kept_per[p_idx] = np.where(dense, s_p - ones_per, ones_per)
    if int(kept_per.sum()) != count:
        raise CorruptPayloadError(
            f"the body keeps {int(kept_per.sum())} images but the header says {count}"
        )
    on = np.sort(np.concatenate([np.flatnonzero(types == FULL), p_idx[dense]]))
    indices = _kept_indices(n, starts, on, one_pos)
    block = np.repeat(np.arange(sizes.size, dtype=np.int64), kept_per)
    if tables.label_mode == LABELS_FLAT:
        labels = _TableSet([tables.labels], "labels").decode(reader.section("labels"), count, None)
    else:
        labels = _decode_grouped_labels(
            reader, block, kept_per, tables.same, tables.labels, tables.purity, tables.flags
        )
    if labels.size and int(labels.max()) >= k:
        raise InvalidSelectionError(f"a label lies outside [0, {k})")
    if reader.pos != len(body):
        raise CorruptPayloadError(f"{len(body) - reader.pos} unexpected bytes after the body")
    return indices, labels


def _decode_runs(
    section: memoryview,
    starts: np.ndarray,
    sizes: np.ndarray,
    levels: np.ndarray,
    lvl: np.ndarray,
    lanes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the run "ones" (absolute) and their count per partial block."""
    decoder = LaneDecoder(section, lanes, "runs")
    ones_per = np.zeros(sizes.size, np.int64)
    if sizes.size == 0:
        decoder.finish()
        return np.zeros(0, np.int64), ones_per
    tables = [run_table(int(p)) for p in levels]
    bits = np.array([run_bits(int(p)) for p in levels], dtype=np.int64)
    lut = np.stack([t.symbol_of_slot() for t in tables]).astype(np.int64)
    cums = _stack([t.cum for t in tables])
    freqs = _stack([t.freq for t in tables])
    est = run_estimates(sizes, levels[lvl], bits[lvl])
    cap = 2 * est + 16
    lane_of = run_lane_of_block(est, lanes)
    first = np.searchsorted(lane_of, np.arange(lanes + 1))
    blk = first[:-1].copy()  # current block of each lane
    end = first[1:]
    active = np.flatnonzero(blk < end)
    cur = np.zeros(lanes, np.int64)  # position within the block
    events = np.zeros(lanes, np.int64)
    found: list[np.ndarray] = []
    r_of = 1 << bits
    while active.size:
        b = blk[active]
        level = lvl[b]
        r = r_of[level]
        remaining = sizes[b] - cur[active]
        sym = lut[level, decoder.slots(active)]
        tail = (remaining <= r) & (sym >= remaining)
        cont = ~tail & (sym == r)
        one = ~tail & ~cont
        c = np.where(tail, cums[level, np.minimum(remaining, r)], cums[level, sym])
        f = np.where(tail, TOTAL - c, freqs[level, sym])
        decoder.advance(active, c, f)
        found.append(starts[b[one]] + cur[active[one]] + sym[one])
        ones_per[b[one]] += 1
        cur[active] += np.where(one, sym + 1, np.where(cont, r, 0))
        events[active] += 1
        if bool(np.any(events[active] > cap[b])):
            raise CorruptPayloadError("runs: a block holds more events than its level allows")
        done = tail | (cur[active] >= sizes[b])
        finished = active[done]
        blk[finished] += 1
        cur[finished] = 0
        events[finished] = 0
        active = active[blk[active] < end[active]]
    decoder.finish()
    return np.concatenate(found), ones_per


def _decode_grouped_labels(
    reader: _Reader,
    block: np.ndarray,
    kept: np.ndarray,
    same_t: FrequencyTable | None,
    label_t: FrequencyTable,
    purity_set: _TableSet,
    flag_set: _TableSet,
) -> np.ndarray:
    groups = np.flatnonzero(kept)
    same = _TableSet([same_t], "same-flags").decode(
        reader.section("same-flags"), groups.size - 1, None
    )
    label_set = _TableSet([label_t], "labels")
    explicit_count = 1 + int((same == 0).sum())
    explicit_maj = label_set.decode(reader.section("majority labels"), explicit_count, None)
    maj = np.zeros(kept.size, np.int64)
    maj[groups] = explicit_maj[np.cumsum(np.append(1, 1 - same)) - 1]
    multi = groups[kept[groups] >= 2]
    purity = purity_set.decode(reader.section("purity"), multi.size, purity_context(kept[multi]))
    block_purity = np.zeros(kept.size, np.int64)
    block_purity[multi] = purity
    image_purity = block_purity[block]
    flagged = image_purity > 0
    flags = np.full(block.size, MAJ, np.int64)
    flags[flagged] = flag_set.decode(
        reader.section("image flags"), int(flagged.sum()), image_purity[flagged]
    )
    nonmaj = np.bincount(block, weights=flags != MAJ, minlength=kept.size)[multi]
    if bool(np.any((nonmaj == 0) & (purity > 0))):
        raise CorruptPayloadError("a mixed-purity block has no non-majority image")
    sec_blocks = np.unique(block[flags == SEC])
    sec = np.full(kept.size, -1, np.int64)
    sec[sec_blocks] = label_set.decode(reader.section("second labels"), sec_blocks.size, None)
    if bool(np.any(sec[sec_blocks] == maj[sec_blocks])):
        raise CorruptPayloadError("a block's second label equals its majority label")
    other = flags == OTHER
    labels = np.where(flags == MAJ, maj[block], sec[block])
    labels[other] = label_set.decode(reader.section("other labels"), int(other.sum()), None)
    if bool(np.any(labels[other] == maj[block[other]])) or bool(
        np.any(labels[other] == sec[block[other]])
    ):
        raise CorruptPayloadError("an explicit label repeats its block's majority or second label")
    return labels
