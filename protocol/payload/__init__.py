"""The payload: which reference images to keep, and their hard labels.

- :mod:`.model`: the data model (:class:`Payload`, :class:`SenderStamp`) and the rules
  its content obeys;
- :mod:`.codec`: the byte format (envelope, one header schema, bodies, digest,
  signature), documented in ``protocol/FORMAT.md``, and the decoder that trusts nothing;
- :mod:`.files`: payload files, and a selection as people read it.

This package exports their public names, the contract both sides import.
"""

from protocol.payload.codec import (
    AUDIENCE_VERSION,
    BLOCK_CODING,
    BODY_CODING,
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    READABLE_VERSIONS,
    RECEIVER_DEFAULT_MAX_BYTES,
    SIGNED_VERSION,
    EncodedPayload,
    Header,
    check_framing,
    decode_header,
    decode_payload,
    encode_payload,
    encode_payload_detailed,
    information_bound_bytes,
)
from protocol.payload.files import read_payload_bytes, selection_text, write_payload
from protocol.payload.model import (
    MAX_CLASSES,
    MAX_REFERENCE_SIZE,
    MAX_SEQUENCE,
    Payload,
    SelectionRecord,
    SenderStamp,
)

__all__ = [
    "AUDIENCE_VERSION",
    "BLOCK_CODING",
    "BODY_CODING",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CLASSES",
    "MAX_HEADER_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_REFERENCE_SIZE",
    "MAX_SEQUENCE",
    "READABLE_VERSIONS",
    "RECEIVER_DEFAULT_MAX_BYTES",
    "SIGNED_VERSION",
    "EncodedPayload",
    "Header",
    "Payload",
    "SelectionRecord",
    "SenderStamp",
    "check_framing",
    "decode_header",
    "decode_payload",
    "encode_payload",
    "encode_payload_detailed",
    "information_bound_bytes",
    "read_payload_bytes",
    "selection_text",
    "write_payload",
]
