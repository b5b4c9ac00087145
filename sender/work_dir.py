"""Names of the files in a scoring work directory (written by ``score``, read by ``select``)."""

SCORES_FILE = "scores.npz"
REFERENCE_EMBEDDINGS = "reference_embeddings.npy"
TEST_EMBEDDINGS = "test_embeddings.npy"
SCORE_REPORT = "score_report.json"
