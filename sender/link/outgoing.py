"""What may go on the link: a whole, signed plada payload, checked before any frame
is cut (air time is the scarcest thing a link has)."""

from __future__ import annotations

import os

from protocol.errors import PayloadError, ReferenceRequiredError, UnsignedPayloadError
from protocol.payload import MAGIC, SIGNED_VERSION, decode_payload, read_payload_bytes


def read_signed_payload(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the payload file at ``path``, once they decode as a whole plada
    payload (magic, framing, body and digest; framing only for a body that needs the
    reference set's manifest) of a signed format version."""
    data = read_payload_bytes(path)
    try:
        decode_payload(data, trust=None)
    except ReferenceRequiredError:
        pass  # a block body over reference folders: its framing was checked
    except PayloadError as exc:
        raise type(exc)(
            f"{path} is not a whole plada payload ({exc}); frame the .plada file that "
            "`plada-send select` wrote"
        ) from None
    if data[len(MAGIC)] < SIGNED_VERSION:  # the version byte follows the magic
        raise UnsignedPayloadError(
            f"{path} is unsigned, and receivers refuse unsigned payloads outside development "
            "mode: select it again with --signing-key"
        )
    return data
