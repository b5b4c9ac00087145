"""A real open_clip architecture with random weights, saved to a file and loaded by path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol.errors import WeightsError
from tests.worlds import save_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_embeds_generated_images(tiny_clip, small_pool) -> None:
    from sender.embedding.embedders import OpenClipEmbedder

    embedder = OpenClipEmbedder(*tiny_clip)
    images = small_pool.load(np.arange(0, 40, 4))
    first = embedder.embed(images, batch_size=4)
    assert first.shape == (10, 32) and first.dtype == np.float32
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.allclose(embedder.embed(images), first, atol=1e-5)  # batch size does not matter
    assert not np.allclose(first[0], first[5])


def test_loaded_weights_are_the_saved_ones(tiny_clip) -> None:
    import open_clip

    from sender.embedding.embedders import OpenClipEmbedder

    saved = torch.load(tiny_clip[1], weights_only=True)
    loaded = OpenClipEmbedder(*tiny_clip).model.state_dict()
    assert torch.equal(saved["visual.conv1.weight"], loaded["visual.conv1.weight"])
    assert "plada-tiny-vit" in open_clip.list_models()


def test_missing_or_unreadable_weights(tiny_clip, tmp_path) -> None:
    from sender.embedding.embedders import OpenClipEmbedder

    with pytest.raises(WeightsError, match="not found"):
        OpenClipEmbedder(tiny_clip[0], tmp_path / "absent.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(WeightsError, match="cannot load"):
        OpenClipEmbedder(tiny_clip[0], junk)
    pickled = tmp_path / "code-inside.pt"
    torch.save({"visual.proj": print}, pickled)  # refused by the safe loader
    for weights in (junk, pickled):
        with pytest.raises(WeightsError) as refused:
            OpenClipEmbedder(tiny_clip[0], weights)
        text = str(refused.value)
        assert "weights_only" not in text and "trust the source" not in text, text
        assert "\n" not in text


def test_a_pretrained_tag_not_in_the_cache_is_named_without_the_network(tmp_path, monkeypatch):
    """open_clip would try the network (five times, about a minute, offline); plada looks
    in the local caches only and names where the checkpoint belongs."""
    from sender.embedding.embedders import OpenClipEmbedder

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for tag in ("laion2b_s34b_b79k", "openai"):
        with pytest.raises(WeightsError, match="is not on this machine") as missing:
            OpenClipEmbedder("ViT-B-32", tag)
        assert "plada never downloads" in str(missing.value)


def test_probe_teacher_on_clip_embeddings_makes_a_valid_payload(tiny_clip, small_pool, tmp_path):
    from protocol.payload import decode_payload, read_payload_bytes
    from protocol.world.digits import load_digits_split
    from sender.embedding.embedders import OpenClipEmbedder
    from sender.scoring.images import TeacherSettings, score_reference
    from sender.selection.payloads import Selection, make_payload
    from sender.selection.strategies import SelectionConfig

    train, test = load_digits_split()
    teacher = TeacherSettings("probe", embedder=OpenClipEmbedder(*tiny_clip))
    summary = score_reference(small_pool, train, test, tmp_path, teacher, progress=False)
    assert summary.embedder == "open_clip:plada-tiny-vit"
    assert summary.teacher.test_accuracy > 0.3  # random CLIP weights still separate digits
    out = tmp_path / "probe.plada"
    made = make_payload(tmp_path, Selection(SelectionConfig(keep=0.05)), out)
    payload = decode_payload(read_payload_bytes(out), reference=small_pool.manifest, trust=None)
    payload.check_reference(small_pool.manifest)
    assert payload.count == made.kept == round(0.05 * len(small_pool))
