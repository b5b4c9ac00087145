"""Typed errors of the ground station alone; each names the problem and the fix."""

from __future__ import annotations

from protocol.errors import ConfigError, PladaError


class TransferRefusedError(PladaError):
    """The device rebuilt the payload from its frames and its intake refused it."""


class BudgetError(PladaError):
    """No payload fits the byte budget (a plan's, or ``--max-bytes``)."""


class MissingExtraError(ConfigError):
    """An option needs an optional dependency group (a pip extra) that is not installed."""


class EngineError(PladaError):
    """A distributed run failed: its workers gave up on a batch, or the cluster cannot
    be reached or started; the finished parts are kept for the rerun."""
