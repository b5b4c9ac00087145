import pytest

from protocol.errors import ManifestError
from protocol.manifest import ReferenceManifest

KEYS = ["b/2", "a/1", "a/2", "c-d/1", "c/1"]


def test_canonical_order_is_independent_of_input_order() -> None:
    one = ReferenceManifest.from_unsorted("x", KEYS)
    two = ReferenceManifest.from_unsorted("y", reversed(KEYS))
    assert one.fingerprint == two.fingerprint  # the name is a label, not content
    assert one.keys == ("a/1", "a/2", "b/2", "c-d/1", "c/1")
    assert one.block_names() == ["a", "b", "c-d", "c"]
    assert one.block_starts().tolist() == [0, 2, 3, 4, 5]


def test_fingerprint_covers_keys_and_content() -> None:
    base = ReferenceManifest.from_unsorted("x", KEYS)
    assert ReferenceManifest.from_unsorted("x", [*KEYS, "d/1"]).fingerprint != base.fingerprint
    renamed = ReferenceManifest.from_unsorted("x", [k.replace("b/2", "b/3") for k in KEYS])
    assert renamed.fingerprint != base.fingerprint
    with_digest = ReferenceManifest.from_unsorted("x", KEYS, content_digest=b"\0" * 32)
    assert with_digest.fingerprint != base.fingerprint


@pytest.mark.parametrize("keys", [[], ["a/1", "a/1"], ["b", "a"], ["a\nb"], [""]])
def test_rejects_bad_key_lists(keys: list[str]) -> None:
    with pytest.raises(ManifestError):
        ReferenceManifest(name="x", keys=tuple(keys))


def test_save_load_round_trip_and_truncation(tmp_path) -> None:
    manifest = ReferenceManifest.from_unsorted("x", KEYS, content_digest=b"\1" * 32)
    path = tmp_path / "manifest.txt"
    manifest.save(path)
    assert ReferenceManifest.load(path) == manifest
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ManifestError, match="truncated"):
        ReferenceManifest.load(path)
