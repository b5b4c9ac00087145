"""Write the payload test vectors: ``python -m tests.vectors.generate``.

Each vector is ``<name>.plada`` plus ``<name>.json`` with the reference layout it
is decoded against and the content it must decode to. Any decoder of the format
must reproduce the JSON from the bytes; this implementation must also reproduce
the bytes from the JSON (encoding is deterministic). Regenerate only when the
format itself changes, and then bump its version.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.manifest import ReferenceManifest
from protocol.payload import BLOCK_CODING, BODY_CODING, Payload, SenderStamp, encode_payload
from protocol.signing import SigningKey

HERE = Path(__file__).parent
CREATED = 1_790_000_000
# the signed vector's key: public test material, derived from a fixed seed
VECTOR_KEY = SigningKey(
    "vector-station",
    Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"plada-test-vector-key").digest()),
)
SIGNED = {
    "signed-audience-v4": SenderStamp("vector-station", CREATED * 1000, CREATED + 86400, "rover-7")
}


def _manifest(folder_sizes: list[int]) -> ReferenceManifest:
    keys = [
        f"n{b:08d}/n{b:08d}_{i:05d}.JPEG"
        for b, size in enumerate(folder_sizes)
        for i in range(size)
    ]
    return ReferenceManifest.from_unsorted("vector-reference", keys)


def vectors() -> dict[str, tuple[Payload, ReferenceManifest, tuple[str, ...]]]:
    """The vectors' content, from fixed seeds."""
    rng = np.random.default_rng(20261122)
    sizes = [int(s) for s in rng.integers(1, 900, size=40)] + [5000]
    manifest = _manifest(sizes)
    n = len(manifest)
    starts = manifest.block_starts()
    mask = np.zeros(n, bool)
    for b in rng.choice(len(sizes), size=12, replace=False):  # clustered: dense folders
        lo, hi = starts[b], starts[b + 1]
        mask[lo:hi] = rng.random(hi - lo) < rng.choice([0.02, 0.3, 0.8, 1.0])
    mask |= rng.random(n) < 0.003
    indices = np.flatnonzero(mask)
    block = np.searchsorted(starts, indices, side="right") - 1
    labels = np.where(rng.random(indices.size) < 0.85, block % 7, rng.integers(0, 7, indices.size))
    uniform = np.sort(rng.choice(n, size=400, replace=False))

    def payload(task: str, idx: np.ndarray, lab: np.ndarray) -> Payload:
        return Payload(
            task=task,
            reference_name=manifest.name,
            reference_fingerprint=manifest.fingerprint,
            reference_size=n,
            class_names=tuple(f"class-{i}" for i in range(7)),
            indices=idx,
            labels=lab,
            selection={"strategy": "safety-net", "keep": 0.01},
            created=CREATED,
        )

    return {
        "clustered-reference-blocks": (
            payload("clustered", indices, labels),
            manifest,
            (BLOCK_CODING,),
        ),
        "uniform-fixed-blocks": (
            payload("uniform", uniform, rng.integers(0, 7, 400)),
            None,
            (BLOCK_CODING,),
        ),
        "delta-varint-zstd": (payload("varint", indices, labels), manifest, (BODY_CODING,)),
        "signed-audience-v4": (payload("signed", uniform, labels[:400] % 7), None, (BODY_CODING,)),
    }


def encode_vector(name: str) -> bytes:
    payload, manifest, codings = vectors()[name]
    if name in SIGNED:  # Ed25519 signatures are deterministic: the bytes are too
        from dataclasses import replace

        stamped = replace(payload, sender=SIGNED[name])
        return encode_payload(stamped, reference=manifest, codings=codings, signer=VECTOR_KEY)
    return encode_payload(payload, reference=manifest, codings=codings)


def frame_vector() -> dict:
    """Frames of a fixed 300-byte payload for the acoustic-64 profile, with 3 repair
    frames: ``frames-acoustic-64.json``."""
    from protocol.frames import PROFILES, FrameEncoder

    payload = b"".join(hashlib.sha256(bytes([i])).digest() for i in range(10))[:300]
    frame_bytes = PROFILES["acoustic-64"].frame_bytes
    frames = FrameEncoder(payload, frame_bytes).frames(repair=3)
    return {
        "payload": payload.hex(),
        "frame_bytes": frame_bytes,
        "repair": 3,
        "frames": [frame.hex() for frame in frames],
    }


def main() -> None:
    if not (HERE / "frames-acoustic-64.json").exists() or "--all" in sys.argv:
        (HERE / "frames-acoustic-64.json").write_text(json.dumps(frame_vector(), indent=1) + "\n")
        print("frames-acoustic-64: written")
    for name, (payload, manifest, _) in vectors().items():
        if (HERE / f"{name}.plada").exists() and "--all" not in sys.argv:
            continue  # the existing vectors are fixed: written once, checked forever
        data = encode_vector(name)
        (HERE / f"{name}.plada").write_bytes(data)
        folders = None if manifest is None else np.diff(manifest.block_starts()).tolist()
        expected = {
            "reference_folder_sizes": folders,  # keys n{b:08d}/n{b:08d}_{i:05d}.JPEG
            "reference_size": payload.reference_size,
            "classes": list(payload.class_names),
            "indices": payload.indices.tolist(),
            "labels": payload.labels.tolist(),
        }
        if name in SIGNED:
            stamp = SIGNED[name]
            expected["signed"] = {
                "sender": stamp.sender,
                "sequence": stamp.sequence,
                "expires": stamp.expires,
                "audience": stamp.audience,
                "public_key": VECTOR_KEY.public.public_key.hex(),
                "key_id": VECTOR_KEY.key_id.hex(),
            }
        (HERE / f"{name}.json").write_text(json.dumps(expected) + "\n")
        print(f"{name}: {len(data)} bytes, {payload.count} images")


if __name__ == "__main__":
    main()
