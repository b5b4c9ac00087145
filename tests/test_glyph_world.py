import numpy as np
import pytest

from protocol.errors import ConfigError, ReferenceSetError
from protocol.reference.glyph_pool import (
    DEFAULT_FINGERPRINT,
    GlyphPool,
    generate_pool,
    parse_glyph_spec,
)
from protocol.world import glyphs
from tests.conftest import SMALL_CONCEPTS, SMALL_PER, SMALL_SPEC


def test_concepts_and_digit_share() -> None:
    concepts = glyphs.all_concepts()
    assert 140 <= len(concepts) <= 160
    digits = [c for c in concepts if c.name.startswith("digit-")]
    assert len(digits) == 10 and len(digits) / len(concepts) < 0.1
    keys = glyphs.GlyphWorldSpec(images_per_concept=2).keys()
    assert keys == sorted(keys)


def test_regeneration_is_byte_identical_and_independent_of_workers(small_pool) -> None:
    spec = parse_glyph_spec(SMALL_SPEC)
    again = generate_pool(spec, workers=1)
    assert np.array_equal(again, np.asarray(small_pool.images))
    assert glyphs.manifest_for(spec, again).fingerprint == small_pool.manifest.fingerprint
    assert small_pool.images.shape == (len(SMALL_CONCEPTS) * SMALL_PER, 32, 32)


def test_seed_changes_the_world() -> None:
    spec = glyphs.GlyphWorldSpec(seed=1, images_per_concept=5, concept_names=("digit-3",))
    other = glyphs.GlyphWorldSpec(seed=2, images_per_concept=5, concept_names=("digit-3",))
    assert not np.array_equal(generate_pool(spec), generate_pool(other))


def test_default_world_matches_the_published_fingerprint(tmp_path) -> None:
    pool = GlyphPool.open(glyphs.GlyphWorldSpec(), tmp_path)
    assert pool.manifest.fingerprint_hex == DEFAULT_FINGERPRINT
    assert len(pool) == len(glyphs.all_concepts()) * 700


def test_corrupt_cache_is_detected_and_regenerated(tmp_path, capsys) -> None:
    spec = glyphs.GlyphWorldSpec(images_per_concept=4, concept_names=("digit-1", "shape-star"))
    pool = GlyphPool.open(spec, tmp_path)
    images_path = tmp_path / spec.tag / "images.npy"
    data = bytearray(images_path.read_bytes())
    data[-1] ^= 0xFF
    images_path.write_bytes(bytes(data))
    again = GlyphPool.open(spec, tmp_path)
    assert "does not match its manifest" in capsys.readouterr().err
    assert again.manifest.fingerprint == pool.manifest.fingerprint


def test_bad_specs() -> None:
    with pytest.raises(ConfigError):
        parse_glyph_spec("glyphs:seed=x")
    with pytest.raises(ConfigError):
        parse_glyph_spec("glyphs:colour=red")
    with pytest.raises(ReferenceSetError):
        parse_glyph_spec("glyphs:concepts=digit-1+no-such").concepts()


def test_rendering_the_pool_shows_progress_and_throughput(capsys) -> None:
    from protocol.reference.glyph_pool import generate_pool, parse_glyph_spec

    spec = parse_glyph_spec("glyphs:per=3,concepts=digit-0+digit-1")
    assert generate_pool(spec, workers=1, progress=True).shape == (6, 32, 32)
    shown = capsys.readouterr().err
    assert "rendering pool" in shown and "6/6" in shown and "img/s" in shown
