import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sender.embedding.row_reads import read_rows_at


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 300),
    row_bytes=st.integers(1, 40),
    picks=st.lists(st.integers(0, 10_000), max_size=200),
)
def test_rows_read_equal_the_file_indexed(tmp_path_factory, n, row_bytes, picks) -> None:
    path = tmp_path_factory.mktemp("rows") / "rows.u8"
    data = np.random.default_rng(n * 41 + row_bytes).integers(0, 256, (n, row_bytes), np.uint8)
    data.tofile(path)
    rows = np.asarray([p % n for p in picks], dtype=np.int64)  # repeats, any order
    np.testing.assert_array_equal(read_rows_at(path, rows, row_bytes), data[rows])


def test_a_row_past_the_end_of_the_file_is_an_eof_error(tmp_path) -> None:
    path = tmp_path / "rows.u8"
    np.zeros((4, 8), np.uint8).tofile(path)
    with pytest.raises(EOFError, match="row 4"):
        read_rows_at(path, np.array([1, 4]), 8)
