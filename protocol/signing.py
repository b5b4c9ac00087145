"""Ed25519 keys of payload senders: generation, key files, key ids, signatures.

A sender holds a :class:`SigningKey` (private, file mode 0600, optionally
encrypted with a passphrase); receivers hold its :class:`SenderKey` (public) in
their trust store. A key belongs to one sender id; a sender may have several
keys (rotation). The key id is the first 8 bytes of
SHA-256("plada-key-v1\\n" + the 32-byte raw public key); it only names the key,
the signature is what is checked.

Signatures cover ``SIGNING_CONTEXT`` followed by the exact payload bytes up to
the signature, so a signature made for anything else never verifies here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.atomic_files import create_secret_file, write_json_atomic
from protocol.errors import SigningKeyError

ALGORITHM_ED25519 = 1
ALGORITHM_NAMES = {ALGORITHM_ED25519: "ed25519"}
KEY_ID_BYTES = 8
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
SIGNING_CONTEXT = b"plada-signed-payload-v3\n"
MAX_SENDER_ID = 64
SENDER_ID_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PRIVATE_FORMAT = "plada-signing-key-v1"
PUBLIC_FORMAT = "plada-sender-key-v1"
PASSPHRASE_ENV = "PLADA_SIGNING_PASSPHRASE"


def is_valid_sender_id(sender: object) -> bool:
    """Whether ``sender`` is a valid sender id: 1-64 of ``A-Z a-z 0-9 . _ -``, starting
    with a letter or digit."""
    return isinstance(sender, str) and SENDER_ID_RULE.fullmatch(sender) is not None


def check_sender_id(sender: str) -> str:
    """Return ``sender`` if :func:`is_valid_sender_id`, else raise ``SigningKeyError``."""
    if not is_valid_sender_id(sender):
        raise SigningKeyError(
            f"invalid sender id {sender!r}: use 1-{MAX_SENDER_ID} letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return sender


_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _edwards_add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    x3 = (x1 * y2 + y1 * x2) * pow(1 + t, _P - 2, _P) % _P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, _P - 2, _P) % _P
    return x3, y3


def public_key_problem(raw: bytes) -> str | None:
    """Why ``raw`` is not a usable Ed25519 public key (None: it is): not 32 bytes, a
    non-canonical encoding, not a point of the curve, or a point of small order (such
    a "key" accepts signatures nobody made, so it must never be trusted)."""
    if len(raw) != PUBLIC_KEY_BYTES:
        return "an Ed25519 public key is 32 bytes"
    encoded = int.from_bytes(raw, "little")
    y, sign = encoded & ((1 << 255) - 1), encoded >> 255
    if y >= _P:
        return "non-canonical encoding (y >= 2^255 - 19)"
    xx = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(xx, (_P + 3) // 8, _P)
    if (x * x - xx) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - xx) % _P:
        return "not a point of the Ed25519 curve"
    if x == 0 and sign:
        return "non-canonical encoding (negative zero)"
    if x & 1 != sign:
        x = _P - x
    point = (x, y)
    for _ in range(3):  # 8 P: the identity exactly when P has small order
        point = _edwards_add(point, point)
    if point == (0, 1):
        return "a point of small order (a weak key that verifies forged signatures)"
    return None


def key_id_of(public_key: bytes) -> bytes:
    """The 8-byte id of a raw Ed25519 public key."""
    return hashlib.sha256(b"plada-key-v1\n" + public_key).digest()[:KEY_ID_BYTES]


@dataclass(frozen=True)
class SenderKey:
    """A sender's public key, as a receiver's trust store holds it."""

    sender: str
    public_key: bytes  # 32 raw bytes

    def __post_init__(self) -> None:
        check_sender_id(self.sender)
        problem = public_key_problem(bytes(self.public_key))
        if problem is not None:
            raise SigningKeyError(f"refused public key of sender {self.sender!r}: {problem}")

    @property
    def key_id(self) -> bytes:
        return key_id_of(self.public_key)

    def verifies(self, signature: bytes, signed: bytes) -> bool:
        """Whether ``signature`` is this key's signature over ``signed``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(
                signature, SIGNING_CONTEXT + signed
            )
        except InvalidSignature:
            return False
        return True

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": PUBLIC_FORMAT,
            "sender": self.sender,
            "algorithm": "ed25519",
            "public_key": self.public_key.hex(),
            "key_id": self.key_id.hex(),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the public key file (JSON, mode 0644 whatever the umask) atomically."""
        write_json_atomic(Path(path), self.as_dict(), durable=True)
        os.chmod(path, 0o644)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SenderKey:
        """Read a public key file written by :meth:`save` (``plada-send keygen``)."""
        data = _read_json(Path(path), "sender public key")
        try:
            if data.get("format") != PUBLIC_FORMAT or data.get("algorithm") != "ed25519":
                raise ValueError(f"not a {PUBLIC_FORMAT} ed25519 key file")
            key = cls(data["sender"], bytes.fromhex(data["public_key"]))
            if "key_id" in data and data["key_id"] != key.key_id.hex():
                raise ValueError("its key_id does not match its public key")
        except (KeyError, TypeError, ValueError) as exc:
            raise SigningKeyError(
                f"{path} is not a valid sender public key file ({exc}): use the .pub file "
                "`plada-send keygen` wrote"
            ) from exc
        return key


class SigningKey:
    """A sender's private Ed25519 key and the sender id it signs for."""

    def __init__(self, sender: str, private_key: Ed25519PrivateKey) -> None:
        self.sender = check_sender_id(sender)
        self._private = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public = SenderKey(sender, raw)

    @property
    def key_id(self) -> bytes:
        return self.public.key_id

    @classmethod
    def generate(cls, sender: str) -> SigningKey:
        """A new random key for ``sender`` (from the operating system's CSPRNG)."""
        return cls(sender, Ed25519PrivateKey.generate())

    def sign(self, signed: bytes) -> bytes:
        """The 64-byte signature over ``SIGNING_CONTEXT + signed``."""
        return self._private.sign(SIGNING_CONTEXT + signed)

    def save(self, path: str | os.PathLike[str], passphrase: bytes | None = None) -> None:
        """Write the private key file (JSON holding a PKCS#8 PEM; mode 0600), refusing to
        overwrite an existing key."""
        path = Path(path)
        encryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
        text = json.dumps(
            {
                "format": PRIVATE_FORMAT,
                "sender": self.sender,
                "key_id": self.key_id.hex(),
                "encrypted": bool(passphrase),
                "private_key_pem": pem.decode(),
            },
            indent=2,
        )
        try:
            create_secret_file(path, text + "\n")
        except FileExistsError as exc:
            raise SigningKeyError(
                f"{path} exists: refusing to overwrite a signing key (move it away first)"
            ) from exc
        except OSError as exc:
            raise SigningKeyError(f"cannot write {path}: {exc.strerror}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str], passphrase: bytes | None = None) -> SigningKey:
        """Read a private key file; an encrypted one needs ``passphrase`` (or the
        ``PLADA_SIGNING_PASSPHRASE`` environment variable)."""
        path = Path(path)
        data = _read_json(path, "signing key")
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise SigningKeyError(
                f"signing key {path} is readable or writable by others (mode {mode:o}): anyone "
                f"on this machine could sign as its sender; run `chmod 600 {path}`"
            )
        if data.get("format") != PRIVATE_FORMAT or "private_key_pem" not in data:
            raise SigningKeyError(
                f"{path} is not a plada signing key file: use the .key file `plada-send keygen` "
                "wrote"
            )
        if passphrase is None and data.get("encrypted"):
            env = os.environ.get(PASSPHRASE_ENV)
            if not env:
                raise SigningKeyError(
                    f"{path} is encrypted: set {PASSPHRASE_ENV} to its passphrase"
                )
            passphrase = env.encode()
        try:
            private = serialization.load_pem_private_key(
                str(data["private_key_pem"]).encode(),
                password=passphrase if data.get("encrypted") else None,
            )
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(
                f"cannot read the private key in {path} (wrong passphrase or damaged file): {exc}"
            ) from exc
        if not isinstance(private, Ed25519PrivateKey):
            raise SigningKeyError(f"{path} does not hold an Ed25519 key")
        key = cls(str(data.get("sender")), private)
        if data.get("key_id") not in (None, key.key_id.hex()):
            raise SigningKeyError(f"{path}: its key_id does not match its key (damaged file)")
        return key


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise SigningKeyError(
            f"{what} file {path} not found: create one with `plada-send keygen`"
        ) from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SigningKeyError(f"cannot read {what} file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SigningKeyError(f"{what} file {path} is not a JSON object")
    return data
