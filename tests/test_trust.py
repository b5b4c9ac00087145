"""Signed payloads: one test per attack, each asserting its specific typed error, plus
keys, trust store, sender sequence numbers and the receiver's ledger."""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import stat
import struct
import time
import tracemalloc

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import (
    BadSignatureError,
    DigestMismatchError,
    ExpiredPayloadError,
    InvalidSelectionError,
    MalformedHeaderError,
    PayloadError,
    PayloadLimitError,
    ReferenceMismatchError,
    ReplayError,
    RollbackError,
    SigningKeyError,
    TruncatedPayloadError,
    UnknownSenderError,
    UnsignedPayloadError,
    UnsupportedVersionError,
    WrongKeyError,
)
from protocol.manifest import BlockLayout
from protocol.payload import Payload, SenderStamp, decode_payload, encode_payload
from protocol.payload import codec as fmt
from protocol.signing import SigningKey
from protocol.timestamps import utc_text
from protocol.trust import TrustPolicy, TrustStore
from protocol.varint import encode_uvarints
from receiver.errors import TrustStoreError
from receiver.ledger import SequenceLedger
from receiver.trust_store import add_key, load_trust_store, remove_keys
from sender.signer import next_sequence, parse_duration

FP = bytes(range(32))
NOW = 1_800_000_000
STATION = SigningKey.generate("station-1")
LAYOUT = BlockLayout("ref", FP, 1000, np.array([0], dtype=np.int64))


def policy(**changes) -> TrustPolicy:
    options = {"store": TrustStore([STATION.public]), "clock": lambda: NOW} | changes
    return TrustPolicy(**options)


def make(indices=(3, 40, 41), labels=(0, 2, 1), sequence=5, expires=NOW + 3600, key=STATION):
    return Payload(
        "task",
        "ref",
        FP,
        1000,
        ("c0", "c1", "c2"),
        np.asarray(indices),
        np.asarray(labels),
        created=NOW - 10,
        sender=SenderStamp(key.sender, sequence, expires),
    )


def signed(payload: Payload | None = None, key: SigningKey = STATION) -> bytes:
    return encode_payload(payload or make(key=key), codings=(fmt.BODY_CODING,), signer=key)


def forge(
    header: dict,
    body: bytes,
    content: tuple[np.ndarray, np.ndarray] | None = None,
    key: SigningKey = STATION,
    key_id: bytes | None = None,
    sequence: int = 5,
    expires: int = NOW + 3600,
) -> bytes:
    """A v3 payload assembled by hand and validly signed: a compromised or buggy sender.
    Everything the signature covers is exactly what the test chose."""
    sender = key.sender.encode()
    header_bytes = msgpack.packb(header, use_bin_type=True)
    head = (
        struct.pack("<8sBB8sB", fmt.MAGIC, 3, 1, key_id or key.key_id, len(sender))
        + sender
        + struct.pack("<QQI", sequence, expires, len(header_bytes))
        + header_bytes
    )
    indices, labels = content if content is not None else (np.array([3]), np.array([0]))
    digest = hashlib.sha256(
        b"plada-payload-v3"
        + head
        + indices.astype("<u8").tobytes()
        + labels.astype("<u4").tobytes()
    ).digest()
    frame = head + struct.pack("<I", len(body)) + body + digest
    return frame + key.sign(frame)


def header(count: int = 1, raw_size: int = 2, classes=("c0", "c1", "c2"), n: int = 1000) -> dict:
    return {
        "task": "t",
        "created": NOW - 10,
        "reference": {"name": "ref", "fingerprint": FP, "size": n},
        "classes": list(classes),
        "count": count,
        "selection": {},
        "body": {"coding": fmt.BODY_CODING, "raw_size": raw_size},
    }


def zstd(raw: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(raw)


def varints(gaps, labels) -> bytes:
    return encode_uvarints(np.asarray(gaps)) + encode_uvarints(np.asarray(labels))


# --- the good path -------------------------------------------------------------------------


def test_signed_payload_round_trips_with_its_stamp() -> None:
    data = signed()
    got = decode_payload(data, reference=LAYOUT, trust=policy())
    assert got.sender == SenderStamp("station-1", 5, NOW + 3600)
    assert got.key_id == STATION.key_id and list(got.indices) == [3, 40, 41]
    # the envelope costs 64 (signature) + 26 + len(sender id) bytes over unsigned v2
    unsigned = encode_payload(make(), codings=(fmt.BODY_CODING,))
    assert len(data) - len(unsigned) == 64 + 26 + len("station-1")


def test_forge_helper_builds_what_the_encoder_builds() -> None:
    """The hand-assembled frame used by the attack tests is byte-identical to the encoder's
    for the same content, so each attack changes only what it says it does."""
    payload = make(indices=[3], labels=[0])
    real = signed(payload)
    hdr = fmt.decode_header(real)
    raw = varints([3], [0])
    assert hdr["body"]["raw_size"] == len(raw)
    body = real[-(64 + 32) - len(zstandard.ZstdCompressor(level=19).compress(raw)) : -(64 + 32)]
    assert forge(hdr, body)[:-64] == real[:-64]  # Ed25519 signatures are deterministic too
    assert forge(hdr, body) == real


# --- one test per attack -------------------------------------------------------------------


def test_tampered_byte_is_a_bad_signature() -> None:
    data = signed()
    header_start = 19 + len("station-1") + 20
    for position in (header_start + 3, len(data) - 64 - 40, len(data) - 64 - 1, len(data) - 1):
        tampered = bytearray(data)
        tampered[position] ^= 0x01
        with pytest.raises(BadSignatureError, match="altered in transit or forged"):
            decode_payload(bytes(tampered), trust=policy())


def test_truncated_payload() -> None:
    data = signed()
    for cut in (4, 12, 25, 60, len(data) // 2, len(data) - 64, len(data) - 1):
        with pytest.raises(TruncatedPayloadError, match="truncated"):
            decode_payload(data[:cut], trust=policy())


def test_wrong_key() -> None:
    """A key of the right sender id that the receiver does not trust: WrongKeyError; a
    signature by another key under the trusted key's id: BadSignatureError."""
    impostor = SigningKey.generate("station-1")
    with pytest.raises(WrongKeyError, match="not one of its trusted keys"):
        decode_payload(signed(key=impostor), trust=policy())
    forged = forge(header(1, 2), zstd(varints([3], [0])), key=impostor, key_id=STATION.key_id)
    with pytest.raises(BadSignatureError):
        decode_payload(forged, trust=policy())


def test_unknown_sender() -> None:
    stranger = SigningKey.generate("station-9")
    with pytest.raises(UnknownSenderError, match=r"station-9.*trust add"):
        decode_payload(signed(key=stranger), trust=policy())


def test_replayed_payload() -> None:
    data = signed(make(sequence=5))
    with pytest.raises(ReplayError, match="already accepted"):
        decode_payload(data, trust=policy(last_sequence={"station-1": 5}.get))


def test_rolled_back_sequence_number() -> None:
    data = signed(make(sequence=4))
    with pytest.raises(RollbackError, match="older than payload 5"):
        decode_payload(data, trust=policy(last_sequence={"station-1": 5}.get))
    newer = decode_payload(signed(make(sequence=6)), trust=policy(last_sequence=lambda s: 5))
    assert newer.sender.sequence == 6


def test_expired_payload() -> None:
    data = signed(make(expires=NOW))
    with pytest.raises(ExpiredPayloadError, match="--no-expiry-check"):
        decode_payload(data, trust=policy())
    # a device with no trusted clock turns expiry off explicitly
    assert decode_payload(data, trust=policy(check_expiry=False)).sender.expires == NOW
    # a payload accepted earlier (spooled, or resumed) is re-read without freshness checks,
    # but still only under a trusted key
    accepted = policy(last_sequence={"station-1": 5}.get).without_freshness()
    assert decode_payload(data, trust=accepted).sender.sequence == 5
    with pytest.raises(UnknownSenderError):
        decode_payload(data, trust=policy(store=TrustStore()).without_freshness())


def test_payload_for_another_reference_set() -> None:
    other = BlockLayout("ref", bytes(32), 1000, np.array([0], dtype=np.int64))
    with pytest.raises(ReferenceMismatchError, match="sync the reference set"):
        decode_payload(signed(), reference=other, trust=policy())


def test_decompression_bomb_is_refused_before_inflating() -> None:
    """A 1 GiB frame of zeros compresses to ~33 KB; the header may declare it or not.
    Either way nothing is inflated: peak memory stays far below the declared size."""
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * (1 << 30))
    assert len(bomb) < 100_000
    tracemalloc.start()
    for declared in (1 << 30, 2):  # the true size (impossible for 1 image), or a lie
        with pytest.raises(PayloadLimitError):
            decode_payload(forge(header(1, declared), bomb), trust=policy())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, peak
    # a frame that hides its size cannot be inflated past the declared cap either
    hidden = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (1 << 20))
    with pytest.raises(PayloadLimitError, match="refusing to inflate"):
        decode_payload(forge(header(1, 2), hidden), trust=policy())


def test_oversized_arrays_in_the_header() -> None:
    too_many = [f"c{i}" for i in range(100_001)]
    with pytest.raises(MalformedHeaderError, match="msgpack within limits"):
        decode_payload(forge(header(classes=too_many), zstd(b"\0\0")), trust=policy())
    huge = header() | {"padding": "x" * 4000, "more": ["y" * 4000] * 300}
    with pytest.raises(PayloadLimitError, match="exceeds 1048576"):
        decode_payload(forge(huge, zstd(b"\0\0")), trust=policy())


def test_labels_at_or_above_k() -> None:
    raw = varints([3], [3])  # k = 3 classes: label 3 does not exist
    with pytest.raises(InvalidSelectionError, match=r"label lies outside \[0, 3\)"):
        decode_payload(forge(header(1, len(raw)), zstd(raw)), trust=policy())


def test_indices_out_of_range_or_not_increasing() -> None:
    raw = varints([1000], [0])  # n = 1000: index 1000 is past the end
    with pytest.raises(InvalidSelectionError, match="outside the reference set"):
        decode_payload(forge(header(1, len(raw)), zstd(raw)), trust=policy())
    raw = varints([600, 500], [0, 1])  # each gap < n, but 600 + 1 + 500 >= n
    with pytest.raises(InvalidSelectionError, match="outside the reference set"):
        decode_payload(forge(header(2, len(raw)), zstd(raw)), trust=policy())
    # gaps make a decreasing or repeated list unrepresentable on the wire; the content rule
    # is still enforced wherever a selection is built (encoder input, decoder output)
    for indices in ([5, 3], [5, 5]):
        with pytest.raises(InvalidSelectionError, match="strictly increasing"):
            make(indices=indices, labels=[0, 1])


# --- more rules ----------------------------------------------------------------------------


def test_unsigned_payload_refused_unless_development() -> None:
    unsigned = encode_payload(make(), codings=(fmt.BODY_CODING,))
    with pytest.raises(UnsignedPayloadError, match="--allow-unsigned"):
        decode_payload(unsigned, trust=policy())
    assert decode_payload(unsigned, trust=policy(allow_unsigned=True)).sender is None


def test_a_valid_signature_over_wrong_content_is_a_digest_mismatch() -> None:
    raw = varints([3], [0])
    forged = forge(header(1, len(raw)), zstd(raw), content=(np.array([4]), np.array([0])))
    with pytest.raises(DigestMismatchError):
        decode_payload(forged, trust=policy())


def test_unknown_signature_algorithm_and_bad_envelope_fields() -> None:
    data = bytearray(signed())
    data[9] = 7
    with pytest.raises(UnsupportedVersionError, match="signature algorithm 7"):
        decode_payload(bytes(data), trust=policy())
    with pytest.raises(MalformedHeaderError, match="sequence number 0"):
        decode_payload(forge(header(), zstd(b"\0\0"), sequence=0), trust=policy())
    with pytest.raises(MalformedHeaderError, match="expires before it was created"):
        decode_payload(
            forge(header(), zstd(varints([3], [0])), expires=NOW - 20),
            trust=policy(check_expiry=False),
        )


def test_signature_is_checked_before_anything_is_parsed_or_inflated(monkeypatch) -> None:
    bomb = forge(header(1, 1 << 30), zstandard.ZstdCompressor().compress(b"\0" * (1 << 24)))
    tampered = bytearray(bomb)
    tampered[30] ^= 0x20  # inside the header: the signature fails
    calls = []
    for name in ("_parse_header", "_decode_varint_zstd"):
        monkeypatch.setattr(fmt, name, lambda *a, _n=name: calls.append(_n))
    with pytest.raises(BadSignatureError):
        decode_payload(bytes(tampered), trust=policy())
    assert calls == []


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_no_single_byte_change_is_ever_accepted(data) -> None:
    blob = SIGNED_SAMPLE
    position = data.draw(st.integers(0, len(blob) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = bytearray(blob)
    tampered[position] ^= flip
    with pytest.raises(PayloadError):
        decode_payload(bytes(tampered), trust=policy())


SIGNED_SAMPLE = signed()


@settings(max_examples=60, deadline=None)
@given(
    indices=st.sets(st.integers(0, 999), min_size=1, max_size=200),
    k=st.integers(2, 50),
    sequence=st.integers(1, (1 << 63) - 1),
    seed=st.integers(0, 2**32 - 1),
    audience=st.none() | st.sampled_from(["rover-7", "fleet.north", "x" * 64]),
)
def test_signed_round_trip_property(indices, k, sequence, seed, audience) -> None:
    idx = np.array(sorted(indices))
    labels = np.random.default_rng(seed).integers(0, k, idx.size)
    stamp = SenderStamp("station-1", sequence, NOW + 1, audience)
    names = tuple(f"c{i}" for i in range(k))
    payload = Payload("t", "ref", FP, 1000, names, idx, labels, created=NOW - 1, sender=stamp)
    data = encode_payload(payload, signer=STATION)
    assert data[8] == (3 if audience is None else 4)  # v3 stays v3: old receivers read it
    receiver = policy(max_clock_ahead=math.inf, audiences=frozenset({audience or "rover-7"}))
    got = decode_payload(data, trust=receiver)
    assert np.array_equal(got.indices, idx) and np.array_equal(got.labels, labels)
    assert got.sender == stamp


# --- keys, trust store, sequence numbers, ledger --------------------------------------------


def test_key_files(tmp_path, monkeypatch) -> None:
    from sender.signer import generate_key_files

    key = generate_key_files("gs-1", tmp_path / "keys" / "gs-1", encrypt=False)
    private = tmp_path / "keys" / "gs-1.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    loaded = SigningKey.load(private)
    assert loaded.public == key.public
    with pytest.raises(SigningKeyError, match="refusing to overwrite"):
        generate_key_files("gs-1", tmp_path / "keys" / "gs-1", encrypt=False)
    monkeypatch.setenv("PLADA_SIGNING_PASSPHRASE", "correct horse")
    generate_key_files("gs-2", tmp_path / "gs-2", encrypt=True)
    assert b"ENCRYPTED" in (tmp_path / "gs-2.key").read_bytes()
    assert SigningKey.load(tmp_path / "gs-2.key").sender == "gs-2"
    monkeypatch.setenv("PLADA_SIGNING_PASSPHRASE", "wrong")
    with pytest.raises(SigningKeyError, match="wrong passphrase"):
        SigningKey.load(tmp_path / "gs-2.key")
    with pytest.raises(SigningKeyError, match=r"not found.*keygen"):
        SigningKey.load(tmp_path / "missing.key")
    with pytest.raises(SigningKeyError, match="invalid sender id"):
        SigningKey.generate("../etc")


def test_trust_store_directory(tmp_path) -> None:
    other = SigningKey.generate("station-2")
    add_key(tmp_path / "trust", STATION.public)
    add_key(tmp_path / "trust", other.public)
    store = load_trust_store(tmp_path / "trust")
    assert store.senders() == ["station-1", "station-2"] and len(store) == 2
    assert remove_keys(tmp_path / "trust", "station-2")
    assert load_trust_store(tmp_path / "trust").senders() == ["station-1"]
    assert len(load_trust_store(tmp_path / "absent")) == 0
    (tmp_path / "trust" / "broken.pub").write_text("{not json")
    with pytest.raises(TrustStoreError, match=r"broken\.pub"):
        load_trust_store(tmp_path / "trust")


def _take(path, count, out):
    out.put([next_sequence(path) for _ in range(count)])


def test_sequence_numbers_increase_across_processes_and_a_lost_counter(tmp_path) -> None:
    counter = tmp_path / "gs.sequence"
    first = next_sequence(counter)
    assert first >= int(time.time() * 1000) - 5000
    queue = multiprocessing.get_context("spawn").Queue()
    workers = [
        multiprocessing.get_context("spawn").Process(target=_take, args=(counter, 40, queue))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    taken = [n for _ in workers for n in queue.get(timeout=120)]
    for worker in workers:
        worker.join()
    assert len(set(taken)) == 80 and min(taken) > first
    last = int(counter.read_text())
    assert last == max(taken)
    os.unlink(counter)  # the station lost its counter: time keeps the numbers increasing
    assert next_sequence(counter, clock=time.time() + 1) > first
    counter.write_text("garbage")
    with pytest.raises(SigningKeyError, match="damaged"):
        next_sequence(counter)
    assert parse_duration("7d") == 7 * 86400 and parse_duration("90") == 90
    assert utc_text(0) == "1970-01-01T00:00:00+00:00"
    assert utc_text((1 << 63) - 1) == f"Unix time {(1 << 63) - 1}"  # a forged far expiry


def test_ledger_persists_and_refuses_old_numbers(tmp_path) -> None:
    ledger = SequenceLedger(tmp_path / "ledger.sqlite")
    ledger.record("station-1", 5, "a" * 64)
    with pytest.raises(ReplayError):
        ledger.record("station-1", 5, "b" * 64)
    with pytest.raises(RollbackError):
        ledger.record("station-1", 4, "c" * 64)
    ledger.record("station-2", 1, "d" * 64)
    ledger.close()
    again = SequenceLedger(tmp_path / "ledger.sqlite")
    assert again.last("station-1") == 5 and again.last("station-2") == 1
    assert again.last("nobody") is None
    with pytest.raises(ReplayError):
        decode_payload(signed(make(sequence=5)), trust=policy(last_sequence=again.last))
    again.close()
