"""The availability file (which canonical rows a device copy holds): a codec read as
hostile, the merge of a copy's keys onto the canonical ones, coverage, and the fleet's
restriction of a selection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.availability import (
    Availability,
    AvailabilityError,
    coverage_of,
    decode_availability,
)
from protocol.errors import ConfigError
from protocol.manifest import ReferenceManifest
from protocol.reference.canonical import local_rows
from receiver.acceptance import CoverageRule
from receiver.errors import CoverageError
from sender.selection.fleet import Fleet

FINGERPRINT = bytes(range(32))


def _availability(present: np.ndarray) -> Availability:
    return Availability("ref", FINGERPRINT, present.astype(bool), "decode", "tree")


@settings(max_examples=80, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_availability_round_trips(bits: list[bool]) -> None:
    original = _availability(np.array(bits))
    back = decode_availability(original.encode())
    assert np.array_equal(back.present, original.present)
    assert (back.name, back.fingerprint, back.check, back.source) == (
        original.name,
        original.fingerprint,
        original.check,
        original.source,
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.booleans(), min_size=1, max_size=200),
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=1, max_value=255),
)
def test_any_changed_byte_is_a_typed_error(bits: list[bool], where: int, flip: int) -> None:
    data = bytearray(_availability(np.array(bits)).encode())
    data[where % len(data)] ^= flip
    with pytest.raises(AvailabilityError):
        decode_availability(bytes(data))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=200), st.data())
def test_any_truncation_is_a_typed_error(bits: list[bool], data) -> None:
    encoded = _availability(np.array(bits)).encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(AvailabilityError):
        decode_availability(encoded[:cut])


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_refused_with_a_typed_error(junk: bytes) -> None:
    with pytest.raises(AvailabilityError):
        decode_availability(junk)


def test_a_forged_header_with_a_valid_checksum_is_refused() -> None:
    """A checksum is no signature: the header's claims are checked against the rows."""
    import hashlib

    encoded = _availability(np.array([True, False, True])).encode()
    body = encoded[:-32].replace(b'"present": 2', b'"present": 3')
    with pytest.raises(AvailabilityError, match="count"):
        decode_availability(body + hashlib.sha256(body).digest())


@settings(max_examples=100, deadline=None)
@given(
    st.sets(st.text("abc/", min_size=1, max_size=4), min_size=1, max_size=30),
    st.sets(st.text("abcd/", min_size=1, max_size=4), min_size=1, max_size=30),
)
def test_local_rows_map_each_canonical_key_to_the_copy(canonical: set, local: set) -> None:
    canon = ReferenceManifest.from_unsorted("c", canonical)
    mine = ReferenceManifest.from_unsorted("l", local)
    rows = local_rows(canon, mine)
    where = {key: i for i, key in enumerate(mine.keys)}
    assert rows.tolist() == [where.get(key, -1) for key in canon.keys]


def test_coverage_is_judged_overall_and_per_class() -> None:
    present = np.ones(100, bool)
    present[[0, 1, 2]] = False  # all three in class 0
    indices = np.arange(0, 100, 2)  # 50 kept: rows 0 and 2 are missing
    labels = (indices >= 20).astype(np.int64)  # class 0: 10 kept, 2 missing
    coverage = coverage_of(present, indices, labels, ("a", "b"))
    assert (coverage.present, coverage.kept) == (48, 50)
    assert coverage.worst_class() == ("a", 0.8)
    with pytest.raises(CoverageError, match=r"class 'a' 80\.0%"):
        CoverageRule(min_overall=0.9, min_class=0.9).check(coverage)
    CoverageRule(min_overall=0.9, min_class=0.8).check(coverage)
    with pytest.raises(CoverageError, match=r"96\.0%"):
        CoverageRule().check(coverage)  # 98% overall by default


def test_fleet_keeps_rows_every_release_holds(tmp_path) -> None:
    a, b = np.ones(10, bool), np.ones(10, bool)
    a[[1, 2]] = False
    b[[2, 7]] = False
    for name, present in (("a", a), ("b", b)):
        _availability(present).save(tmp_path / f"{name}.src")
        Fleet(tmp_path / "fleet").add(name, tmp_path / f"{name}.src")
    fleet = Fleet(tmp_path / "fleet")
    assert fleet.restriction(FINGERPRINT, 10).absent.tolist() == [1, 2, 7]
    assert fleet.restriction(FINGERPRINT, 10, ("b",)).absent.tolist() == [2, 7]
    with pytest.raises(ConfigError, match="no release"):
        fleet.restriction(bytes(32), 10)
    with pytest.raises(AvailabilityError, match="not of"):
        fleet.restriction(bytes(32), 10, ("a",))


def test_acceptance_judges_coverage_before_the_callers_checks() -> None:
    """The order every way in shares (verify, train, the daemon's intake): a partial
    copy's shortfall is refused before the caller's own checks and before any record."""
    from protocol.payload import Payload, encode_payload
    from receiver.acceptance import AcceptanceRules, Received, open_acceptance
    from receiver.trust_store import TrustOptions

    manifest = ReferenceManifest.from_unsorted("ref", [f"b/{i:03d}" for i in range(50)])
    present = np.ones(50, bool)
    present[:5] = False
    held = Availability(manifest.name, manifest.fingerprint, present)
    indices = np.arange(0, 50, 2)
    payload = Payload("t", "ref", manifest.fingerprint, 50, ("x", "y"), indices, indices % 2)
    received = Received.of(encode_payload(payload, reference=manifest), "t.plada")
    rules = AcceptanceRules(TrustOptions(allow_unsigned=True))
    called = []
    partial = open_acceptance(None, rules, None, manifest, held)
    with pytest.raises(CoverageError, match="22 of the payload's 25"):
        partial.examine(received, check=called.append)
    assert called == []
    whole = open_acceptance(None, rules, None, manifest)
    assert whole.examine(received, check=called.append).payload.count == 25 and called
