import numpy as np

from sender.embedding.embedders import PixelEmbedder
from sender.embedding.index import build_index
from sender.scoring.work_dir import LeakageCandidates


def test_planted_duplicates_are_found_and_nothing_else() -> None:
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, size=(2000, 1, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, size=(50, 1, 32, 32), dtype=np.uint8)
    test[3] = reference[10]  # exact copy
    test[7] = np.clip(reference[20].astype(int) + 3, 0, 255).astype(np.uint8)  # brightened
    test[9] = reference[30]  # another exact copy
    embed = PixelEmbedder()
    index = build_index(embed.embed(reference))
    queries = embed.embed(test)
    duplicates, hit_queries = LeakageCandidates.find(index, queries).duplicates(threshold=0.97)
    assert duplicates.tolist() == [10, 20, 30] and hit_queries == 3
    sims, ids = index.search(queries[[3, 7]], 1)
    assert ids[:, 0].tolist() == [10, 20] and sims.min() > 0.99
