"""The payload decoder as a fuzz target, shared by the atheris driver
(``benchmarks/fuzz_payload.py``) and the hypothesis tests (``tests/test_fuzz.py``).

Every input goes through the real ``decode_payload`` in one of three ways, chosen
by its first byte:

* ``raw``: the bytes as received, under a strict trust policy (signed only);
  this exercises the size cap, the framing and the signature gate;
* ``resigned``: the bytes are taken as a v3 frame, given the trusted key's id and
  a valid signature, then decoded: a compromised or buggy sender, so everything
  behind the signature (header, decompression, block code, content rules, digest)
  is reached;
* ``unsigned``: decoded with ``allow_unsigned`` (development mode): v1/v2 framing.

A campaign can also fix one mode for every input (``--mode``), so that its corpus
keeps what is new for that mode. The contract: decoding returns a payload or
raises a ``PladaError`` subtype.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import block_code, payload
from protocol.errors import PladaError
from protocol.manifest import BlockLayout
from protocol.signing import SigningKey
from protocol.trust import TrustPolicy, TrustStore

NOW = 1_800_000_000
FINGERPRINT = bytes(range(32))
FOLDERS = np.array([0, 100, 104, 700, 701, 1500, 2400], dtype=np.int64)
LAYOUT = BlockLayout("fuzz-ref", FINGERPRINT, int(FOLDERS[-1]), FOLDERS)
KEY = SigningKey("fuzz-station", Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
STRICT = TrustPolicy(TrustStore([KEY.public]), clock=lambda: NOW, last_sequence=lambda s: 3)
UNSIGNED = TrustPolicy(TrustStore([KEY.public]), allow_unsigned=True, clock=lambda: NOW)
MODES = ("raw", "resigned", "unsigned")
SIGNATURE = 64


def seed_payloads() -> list[bytes]:
    """Valid payloads of every kind, from the real encoder."""
    rng = np.random.default_rng(0)
    n = LAYOUT.size
    seeds = []
    for count, k, clustered in ((1, 2, False), (30, 5, True), (200, 37, True), (400, 3, False)):
        if clustered:  # most kept images in two folders, mostly one label each
            pool = np.r_[np.arange(104, 700), np.arange(1500, 2400)]
            indices = np.sort(rng.choice(pool, count, replace=False))
            labels = (indices >= 1500).astype(np.int64) + rng.integers(0, k, count) * (
                rng.random(count) < 0.1
            )
            labels = np.minimum(labels, k - 1)
        else:
            indices = np.sort(rng.choice(n, count, replace=False))
            labels = rng.integers(0, k, count)
        for signed in (True, False):
            made = payload.Payload(
                "fuzz",
                "fuzz-ref",
                FINGERPRINT,
                n,
                tuple(f"c{i}" for i in range(k)),
                indices,
                labels,
                created=NOW - 60,
                sender=payload.SenderStamp(KEY.sender, 5, NOW + 3600) if signed else None,
            )
            signer = KEY if signed else None
            for codings in ((payload.BODY_CODING,), (payload.BLOCK_CODING,)):
                for reference in (LAYOUT, None):
                    try:
                        seeds.append(
                            payload.encode_payload(
                                made, reference=reference, codings=codings, signer=signer
                            )
                        )
                    except block_code.UnplannableError:
                        continue
    return seeds


def prepare(data: bytes, mode: str | None = None) -> tuple[str, bytes, TrustPolicy]:
    """The bytes to decode and the policy, for ``mode`` (``None``: the input's first
    byte picks the mode)."""
    if mode is None:
        if not data:
            return "raw", data, STRICT
        mode, data = MODES[data[0] % len(MODES)], data[1:]
    if mode == "resigned":
        frame = bytearray(data)
        if len(frame) >= 18 and frame[8] == payload.SIGNED_VERSION:
            frame[10:18] = KEY.key_id
        frame = bytes(frame)
        return mode, frame + KEY.sign(frame), STRICT
    return mode, data, STRICT if mode == "raw" else UNSIGNED


def seed_inputs(mode: str | None = None) -> list[bytes]:
    """The seed corpus as fuzz inputs for ``mode`` (``None``: with the mode byte)."""
    inputs = []
    for blob in seed_payloads():
        signed = blob[8] == payload.SIGNED_VERSION
        for chosen, data in (("raw", blob), ("resigned", blob[:-SIGNATURE]), ("unsigned", blob)):
            if signed != (chosen != "unsigned"):  # signed seeds for raw and resigned only
                continue
            if mode is None:
                inputs.append(bytes([MODES.index(chosen)]) + data)
            elif mode == chosen:
                inputs.append(data)
    return inputs


def decode_input(data: bytes, mode: str | None = None) -> tuple[str, str]:
    """Decode one fuzz input; (mode, "accepted" or the typed error's name). Anything
    but a ``PladaError`` propagates: that is a finding."""
    mode, blob, trust = prepare(data, mode)
    try:
        payload.decode_payload(blob, reference=LAYOUT, trust=trust)
    except PladaError as exc:
        return mode, type(exc).__name__
    return mode, "accepted"
