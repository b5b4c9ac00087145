"""Typed errors of the edge device alone; each names the problem and the fix."""

from __future__ import annotations

from protocol.errors import PayloadError, PladaError


class InboxEntryError(PayloadError):
    """An inbox entry is not a payload file this device may read: a link, a FIFO or
    device, or a file that cannot be read."""


class TrustStoreError(PladaError):
    """The receiver's trust store or sequence ledger is unreadable or inconsistent."""


class CoverageError(PladaError):
    """This device's copy of the reference set lacks too many of a payload's images."""
