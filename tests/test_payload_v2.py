"""Payload format v2: rANS, the block coding, test vectors, and hostile input."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.payload_size import paper_body_bytes
from protocol import block_code
from protocol.errors import (
    CorruptPayloadError,
    MalformedHeaderError,
    PayloadError,
    PayloadLimitError,
    ReferenceMismatchError,
    ReferenceRequiredError,
)
from protocol.manifest import BlockLayout, ReferenceManifest
from protocol.payload import (
    BLOCK_CODING,
    BODY_CODING,
    Payload,
    decode_header,
    decode_payload,
    encode_payload,
)
from protocol.rans import (
    TOTAL,
    FrequencyTable,
    decode_lanes,
    encode_lanes,
    normalize_weights,
    split_lanes,
)
from protocol.signing import SenderKey
from protocol.trust import TrustPolicy, TrustStore
from tests.vectors.generate import encode_vector, vectors

VECTORS = Path(__file__).parent / "vectors"
FP = bytes(range(32))


# --- rANS -------------------------------------------------------------------------------------


@given(st.lists(st.integers(0, 1 << 40), min_size=1, max_size=300).filter(any))
def test_normalized_tables_are_valid(weights: list[int]) -> None:
    freq = normalize_weights(np.asarray(weights))
    assert int(freq.sum()) == TOTAL
    assert np.array_equal(freq > 0, np.asarray(weights) > 0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 1000), min_size=2, max_size=40),
    st.lists(st.integers(0, 39), min_size=0, max_size=3000),
    st.integers(1, 64),
)
def test_lanes_round_trip(weights: list[int], raw: list[int], lanes: int) -> None:
    table = FrequencyTable.from_weights(np.asarray(weights))
    symbols = np.asarray([s % len(weights) for s in raw], dtype=np.int64)
    starts = split_lanes(symbols.size, lanes)
    data = encode_lanes(table.cum[symbols], table.freq[symbols], starts)
    lut, cum, freq = table.symbol_of_slot(), table.cum, table.freq

    def table_of(pos, slots, _):
        sym = lut[slots]
        return sym, cum[sym], freq[sym]

    decoded = decode_lanes(data, symbols.size, lanes, table_of, "test")
    assert np.array_equal(decoded, symbols)
    expected_bits = table.cost_bits(np.bincount(symbols, minlength=table.size))
    assert len(data) <= expected_bits / 8 + 4 * lanes + 2 * lanes + 2


def _spec_run_table(p1: int) -> list[int]:
    """FORMAT.md's run-table rule in plain integers, independent of the NumPy code."""
    e = 0
    while (p1 << e) < 65536:
        e += 1
    r = 1 << min(10, max(2, e + 1))
    weights, z = [], 1 << 32
    for _ in range(r):
        weights.append((z * p1) >> 16)
        z = (z * (65536 - p1)) >> 16
    weights.append(z)
    positive = [i for i, w in enumerate(weights) if w > 0]
    total = sum(weights)
    freq = [1 + (w * (65536 - len(positive))) // total if w > 0 else 0 for w in weights]
    for i in positive[: 65536 - sum(freq)]:
        freq[i] += 1
    return freq


def test_run_tables_are_integer_exact() -> None:
    """Run tables match the spec's integer rule and pinned digests (for other decoders)."""
    digest = hashlib.sha256()
    for p1 in (1, 2, 3, 100, 1000, 4096, 12345, 32767, 32768):
        freq = block_code.run_table(p1).freq
        assert freq.tolist() == _spec_run_table(p1)
        digest.update(freq.astype("<u4").tobytes())
    assert digest.hexdigest()[:16] == "216ae5d36d9a938f"


# --- the block coding ------------------------------------------------------------------------


@st.composite
def selections(draw):
    folders = draw(st.lists(st.integers(1, 300), min_size=1, max_size=30))
    n = sum(folders)
    starts = np.append(0, np.cumsum(folders))
    k = draw(st.integers(2, 40))
    mode = draw(st.sampled_from(["random", "folders", "dense"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "random":
        mask = rng.random(n) < draw(st.floats(0.001, 1.0))
    else:
        mask = np.zeros(n, bool)
        for b in range(len(folders)):
            q = rng.choice([0.0, 0.01, 0.2, 0.5, 0.7, 0.99, 1.0])
            mask[starts[b] : starts[b + 1]] = rng.random(folders[b]) < q
        if mode == "dense":
            mask |= rng.random(n) < 0.5
    if not mask.any():
        mask[rng.integers(0, n)] = True
    indices = np.flatnonzero(mask)
    block = np.searchsorted(starts, indices, side="right") - 1
    pure = rng.random(indices.size) < draw(st.floats(0.0, 1.0))
    labels = np.where(pure, block % k, rng.integers(0, k, indices.size))
    return n, starts, indices, labels, k


@settings(max_examples=150, deadline=None)
@given(selections())
def test_block_coding_round_trips(selection) -> None:
    n, starts, indices, labels, k = selection
    for layout in (
        block_code.coding_block_starts(starts, n),
        block_code.fixed_block_starts(n, 256),
    ):
        body = block_code.plan_blocks(indices, labels, n, k, layout).encode()
        got_indices, got_labels = block_code.decode_blocks(body, n, k, indices.size, layout)
        assert np.array_equal(got_indices, indices)
        assert np.array_equal(got_labels, labels)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=300), st.integers(0, 4))
def test_pair_counts_are_np_unique(keys, spare) -> None:
    # the label planner counts (block, label) pairs with a bincount where the span is small
    keys_array = np.asarray(keys, dtype=np.int64)
    for span in (max(keys, default=0) + 1 + spare, 10**7):  # counted, then sorted
        unique, counts = block_code._pair_counts(keys_array, span)
        expected, expected_counts = np.unique(keys_array, return_counts=True)
        np.testing.assert_array_equal(unique, expected)
        np.testing.assert_array_equal(counts, expected_counts)


def _payload(n: int, indices, labels, k: int) -> Payload:
    return Payload(
        task="t",
        reference_name="ref",
        reference_fingerprint=FP,
        reference_size=n,
        class_names=tuple(f"c{i}" for i in range(k)),
        indices=np.asarray(indices),
        labels=np.asarray(labels),
        created=1,
    )


@settings(max_examples=40, deadline=None)
@given(selections())
def test_encoder_keeps_the_smallest_coding(selection) -> None:
    n, starts, indices, labels, k = selection
    layout = BlockLayout("ref", FP, n, starts)
    payload = _payload(n, indices, labels, k)
    best = encode_payload(payload, reference=layout)
    for coding in (BLOCK_CODING, BODY_CODING):
        assert len(best) <= len(encode_payload(payload, reference=layout, codings=(coding,)))
    decoded = decode_payload(best, reference=layout, trust=None)
    assert np.array_equal(decoded.indices, indices) and np.array_equal(decoded.labels, labels)


def test_large_folders_are_split_into_coding_blocks() -> None:
    starts = np.array([0, 3, 3 + 10_000, 3 + 10_000 + 4096])
    split = block_code.coding_block_starts(starts, int(starts[-1]))
    assert split.tolist() == [0, 3, 4099, 8195, 10003, 14099]


def test_clustered_selection_beats_the_paper_scheme_by_a_quarter() -> None:
    """On folder-clustered selections the block coding's body is < 0.75x the paper's."""
    rng = np.random.default_rng(7)
    folders = rng.integers(200, 1500, size=400)
    starts = np.append(0, np.cumsum(folders))
    n = int(starts[-1])
    mask = np.zeros(n, bool)
    for b in rng.choice(folders.size, size=40, replace=False):
        mask[starts[b] : starts[b + 1]] = rng.random(folders[b]) < rng.uniform(0.2, 1.0)
    mask |= rng.random(n) < 0.002
    indices = np.flatnonzero(mask)
    block = np.searchsorted(starts, indices, side="right") - 1
    labels = np.where(rng.random(indices.size) < 0.9, block % 10, rng.integers(0, 10, indices.size))
    layout = BlockLayout("ref", FP, n, starts)
    payload = _payload(n, indices, labels, 10)
    blocks = _body(encode_payload(payload, reference=layout, codings=(BLOCK_CODING,)))
    varint = _body(encode_payload(payload, reference=layout, codings=(BODY_CODING,)))
    paper = paper_body_bytes(indices, labels, 10)
    assert blocks < varint < paper
    assert blocks < 0.75 * paper, (blocks, paper)


def _body(encoded: bytes) -> int:
    return len(encoded) - 49 - int.from_bytes(encoded[9:13], "little")


# --- test vectors -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(vectors()))
def test_vectors_decode_and_reencode_bit_exactly(name: str) -> None:
    data = (VECTORS / f"{name}.plada").read_bytes()
    expected = json.loads((VECTORS / f"{name}.json").read_text())
    _, manifest, _ = vectors()[name]
    decoded = decode_payload(data, reference=manifest, trust=None)
    assert decoded.indices.tolist() == expected["indices"]
    assert decoded.labels.tolist() == expected["labels"]
    assert list(decoded.class_names) == expected["classes"]
    if expected["reference_folder_sizes"] is not None:
        assert np.diff(manifest.block_starts()).tolist() == expected["reference_folder_sizes"]
    assert encode_vector(name) == data
    if "signed" in expected:  # verified as a receiver does: its key, its audience, its clock
        signed = expected["signed"]
        key = SenderKey(signed["sender"], bytes.fromhex(signed["public_key"]))
        policy = TrustPolicy(
            TrustStore([key]),
            clock=lambda: signed["expires"] - 3600,
            audiences=frozenset({signed["audience"]}),
            max_clock_ahead=float("inf"),
        )
        stamp = decode_payload(data, reference=manifest, trust=policy).sender
        assert (stamp.sender, stamp.sequence, stamp.expires, stamp.audience) == (
            signed["sender"],
            signed["sequence"],
            signed["expires"],
            signed["audience"],
        )
        assert data[8] == 4 and key.key_id.hex() == signed["key_id"]


# --- hostile input ----------------------------------------------------------------------------


def _vector(name: str) -> tuple[bytes, ReferenceManifest | None]:
    return (VECTORS / f"{name}.plada").read_bytes(), vectors()[name][1]


@functools.cache
def _decoded_vector(name: str) -> Payload:
    """A test vector decoded once (hypothesis examples compare against it)."""
    encoded, manifest = _vector(name)
    return decode_payload(encoded, reference=manifest, trust=None)


def test_reference_blocks_need_the_right_manifest() -> None:
    data, manifest = _vector("clustered-reference-blocks")
    assert decode_header(data)["body"] == {"coding": BLOCK_CODING, "blocks": "reference"}
    with pytest.raises(ReferenceRequiredError, match="--reference"):
        decode_payload(data, trust=None)
    other = ReferenceManifest.from_unsorted("other", [f"a/{i}" for i in range(len(manifest))])
    with pytest.raises(ReferenceMismatchError, match="sync the reference set"):
        decode_payload(data, reference=other, trust=None)


def test_unchecked_reference_size_is_bounded() -> None:
    data, _ = _vector("uniform-fixed-blocks")
    with pytest.raises(PayloadLimitError, match="pass the local manifest"):
        decode_payload(data, max_reference_size=1000, trust=None)


def test_every_truncation_is_refused() -> None:
    data, manifest = _vector("clustered-reference-blocks")
    for cut in range(0, len(data)):
        with pytest.raises(PayloadError):
            decode_payload(data[:cut], reference=manifest, trust=None)


def _reframe(data: bytes, body: bytes) -> bytes:
    """Replace a payload's body, keeping its header (the digest then no longer matches)."""
    header_end = 13 + int.from_bytes(data[9:13], "little")
    return data[:header_end] + len(body).to_bytes(4, "little") + body + data[-32:]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_bodies_raise_typed_errors_only(data) -> None:
    name = data.draw(st.sampled_from(["clustered-reference-blocks", "uniform-fixed-blocks"]))
    encoded, manifest = _vector(name)
    header_end = 13 + int.from_bytes(encoded[9:13], "little")
    body = bytearray(encoded[header_end + 4 : -32])
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(body)))
        body = body[:cut] + data.draw(st.binary(max_size=8))
    forged = _reframe(encoded, bytes(body))
    original = _decoded_vector(name)
    try:
        decoded = decode_payload(forged, reference=manifest, trust=None)
    except PayloadError:
        return
    # accepted only if the damage left the content intact (e.g. a weight of a table no
    # symbol uses): the digest covers the decoded content, never the coded bytes
    assert np.array_equal(decoded.indices, original.indices)
    assert np.array_equal(decoded.labels, original.labels)


def test_forged_header_fields_are_refused() -> None:
    import msgpack

    data, manifest = _vector("clustered-reference-blocks")
    header = decode_header(data)

    def with_header(changed: dict) -> bytes:
        raw = msgpack.packb(changed, use_bin_type=True)
        rest = data[13 + int.from_bytes(data[9:13], "little") :]
        return data[:9] + len(raw).to_bytes(4, "little") + raw + rest

    for body, error in (
        ({"coding": BLOCK_CODING, "blocks": "diagonal"}, MalformedHeaderError),
        ({"coding": BLOCK_CODING, "blocks": "fixed", "block_size": 100}, MalformedHeaderError),
        ({"coding": BLOCK_CODING, "blocks": "fixed", "block_size": 256}, PayloadError),
    ):
        with pytest.raises(error):
            decode_payload(with_header(header | {"body": body}), reference=manifest, trust=None)
    many = header | {"classes": [f"c{i}" for i in range(5000)]}
    with pytest.raises(MalformedHeaderError, match="label alphabet"):
        decode_payload(with_header(many), reference=manifest, trust=None)
    fewer = header | {"count": header["count"] - 1}
    with pytest.raises(CorruptPayloadError, match="header says"):
        decode_payload(with_header(fewer), reference=manifest, trust=None)
