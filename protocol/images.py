"""Opening untrusted image files with a pixel limit read from the header.

Every decode path (Pillow, and the batched tensor decoders) refuses an image of
more than :data:`MAX_IMAGE_PIXELS` before decoding it: a 136 KiB PNG can declare
12000 x 12000 pixels, a 631-byte JPEG 16000 x 16000, and decoding either would
take gigabytes. Pillow's own warning for large images is replaced by this limit.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import IO, Any

MAX_IMAGE_PIXELS = 50_000_000  # 50 Mpx: far above any photo a reference set holds


def pixel_problem(width: int, height: int, limit: int | None = None) -> str | None:
    """Why an image of ``width`` x ``height`` is refused (None: it is not); ``limit``
    defaults to :data:`MAX_IMAGE_PIXELS`."""
    limit = MAX_IMAGE_PIXELS if limit is None else limit
    if width * height > limit:
        return f"too many pixels ({width} x {height} exceeds {limit})"
    return None


@contextlib.contextmanager
def opened_image(source: str | IO[bytes] | Any) -> Iterator[Any]:
    """A lazily opened PIL image whose header passed :func:`pixel_problem`; over the
    limit, Pillow's ``DecompressionBombError`` (before any pixel is decoded)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(source) as img:
            problem = pixel_problem(*img.size)
            if problem is not None:
                raise Image.DecompressionBombError(problem)
            yield img
