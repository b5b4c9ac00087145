"""plada-send world-clip: the glyph world's own CLIP, trained once per cache, loaded by path
as a user's open_clip weights are."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import SMALL_SPEC
from tests.subprocess_cli import cli, cli_env, run


def test_world_clip_trains_once_caches_and_loads_as_a_users_checkpoint(tmp_path) -> None:
    from sender.embedding.embedders import OpenClipEmbedder

    args = [*cli("plada-send"), "world-clip", "--reference", SMALL_SPEC]
    args += ["--cache-dir", str(tmp_path / "cache"), "--samples", "512", "--quiet"]
    first = run(args, cli_env()).stdout.strip().splitlines()
    again = run(args, cli_env()).stdout.strip().splitlines()
    assert first == again  # the second call finds the cached model (same digest, same paths)
    flags = first[-1].split()
    assert flags[0] == "--clip-model" and flags[2] == "--clip-weights"
    config, weights = flags[1], flags[3]
    assert config.endswith(".json") and weights.endswith(".pt")
    embedder = OpenClipEmbedder(config, weights)
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 32, 32), dtype=np.uint8)
    embedded = embedder.embed(images)
    assert embedded.shape == (4, 64) and np.allclose(np.linalg.norm(embedded, axis=1), 1.0)
    assert embedder.embed_text(["a photo of a digit 0."]).shape == (1, 64)

    path = Path(weights)
    tampered = bytearray(path.read_bytes())
    tampered[-1] ^= 0xFF
    path.write_bytes(bytes(tampered))
    refused = run(args, cli_env(), expect=2)
    assert "does not match its recorded digest" in refused.stderr
    assert "Traceback" not in refused.stderr
    other = [*cli("plada-send"), "world-clip", "--reference", str(tmp_path), "--quiet"]
    refused = run(other, cli_env(), expect=2)
    assert "embedded glyph world only" in refused.stderr
