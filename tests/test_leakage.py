import numpy as np

from sender.embedders import PixelEmbedder
from sender.index import build_index, near_duplicates


def test_planted_duplicates_are_found_and_only_among_kept_images() -> None:
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, size=(2000, 1, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, size=(50, 1, 32, 32), dtype=np.uint8)
    test[3] = reference[10]  # exact copy, kept
    test[7] = np.clip(reference[20].astype(int) + 3, 0, 255).astype(np.uint8)  # brightened, kept
    test[9] = reference[30]  # copy of an image that is not kept
    embed = PixelEmbedder()
    index = build_index(embed.embed(reference))
    kept = np.array([10, 20, 40, 50])
    report = near_duplicates(index, kept, embed.embed(test), threshold=0.97)
    assert sorted((q, r) for q, r, _ in report.duplicates) == [(3, 10), (7, 20)]
    assert report.max_similarity > 0.99 and report.as_dict()["near_duplicates"] == 2
