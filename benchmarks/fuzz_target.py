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

``intake`` (its own campaign, ``--mode intake``) puts each input into a daemon
inbox, name and content both from the input, and runs a real intake pass: the
entry must be queued or quarantined with a typed reason, and nothing may be left
behind or escape as an exception.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import block_code, payload
from protocol.errors import PladaError
from protocol.manifest import BlockLayout
from protocol.signing import SigningKey
from protocol.trust import TrustPolicy, TrustStore
from receiver.claims import is_candidate
from receiver.intake import Intake, IntakeSettings
from receiver.job_queue import JobQueue
from receiver.ledger import SequenceLedger
from receiver.trust_store import TrustOptions, add_key
from receiver.workers import WorkerLock

NOW = 1_800_000_000
FINGERPRINT = bytes(range(32))
FOLDERS = np.array([0, 100, 104, 700, 701, 1500, 2400], dtype=np.int64)
LAYOUT = BlockLayout("fuzz-ref", FINGERPRINT, int(FOLDERS[-1]), FOLDERS)
KEY = SigningKey("fuzz-station", Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
STRICT = TrustPolicy(TrustStore([KEY.public]), clock=lambda: NOW, last_sequence=lambda s: 3)
UNSIGNED = TrustPolicy(TrustStore([KEY.public]), allow_unsigned=True, clock=lambda: NOW)
MODES = ("raw", "resigned", "unsigned")
INTAKE_MODE = "intake"
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
    if mode == INTAKE_MODE:  # signed payloads under an ordinary inbox name
        name = b"seed.plada"
        return [bytes([len(name)]) + name + blob for blob in seed_payloads() if blob[8] == 3]
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


# --- the daemon's intake as a fuzz target ---------------------------------------------------


class _FuzzIntake(Intake):
    """The real intake (on the fuzz world's clock: its settings), remembering the last
    refusal."""

    last_error = ""

    def _quarantine(self, path, sha256, error) -> None:
        self.last_error = type(error).__name__
        super()._quarantine(path, sha256, error)


_INTAKE: list[_FuzzIntake] = []


def _intake() -> _FuzzIntake:
    if not _INTAKE:
        logging.getLogger("plada.receiver").addHandler(logging.NullHandler())  # no stderr
        home = Path(tempfile.mkdtemp(prefix="plada-fuzz-intake-"))
        add_key(home / "trust", KEY.public)
        queue = JobQueue(home / "queue.sqlite")
        ledger = SequenceLedger(home / "ledger.sqlite")
        settings = IntakeSettings(
            settle_seconds=0,
            reorder_seconds=0,
            quarantine_max_files=50,
            trust=TrustOptions(clock=lambda: NOW),
        )
        _INTAKE.append(
            _FuzzIntake(home, home / "inbox", LAYOUT, queue, ledger, WorkerLock(home), settings)
        )
    return _INTAKE[0]


def entry_name(data: bytes) -> tuple[bytes, bytes]:
    """(inbox file name, file content) of an intake input: its first byte is the name's
    length, the name's bytes follow (``/`` and NUL replaced), then the content."""
    length = data[0] if data else 0
    name = data[1 : 1 + length].replace(b"/", b"_").replace(b"\0", b"_")
    if name in (b"", b".", b".."):
        name = b"entry" + name
    return name, data[1 + length :]


def intake_input(data: bytes) -> str:
    """One inbox entry through a real intake pass: "accepted", or the typed error it was
    quarantined with ("ignored" for names intake never reads, such as ``x.part``).
    Anything left behind in the inbox or an intake folder is a finding."""
    intake = _intake()
    name, content = entry_name(data)
    if intake.ledger.last(KEY.sender) is not None:
        intake.ledger.reset(KEY.sender)  # every input is judged as if it came first
    path = os.path.join(os.fsencode(intake.inbox), name)
    with open(path, "wb") as handle:
        handle.write(content)
    accepted, intake.last_error = intake.stats.accepted, ""
    intake.poll()
    if not is_candidate(os.fsdecode(name)):
        os.unlink(path)
        return "ignored"
    left = os.listdir(intake.inbox) + os.listdir(intake.claimed)
    if left:
        raise AssertionError(f"intake left {left!r} behind")
    return "accepted" if intake.stats.accepted > accepted else intake.last_error
