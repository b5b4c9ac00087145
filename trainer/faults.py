"""Named crash points for fault-injection tests of the receiver and the training loop.

``PLADA_CRASH_AT=<point>`` (or ``<point>@<n>`` for its n-th visit) makes the process
kill itself with SIGKILL when it reaches that point: no cleanup handler, no flush,
exactly like a power cut or the kernel's OOM killer. Unset (always, in production),
a crash point is a dictionary lookup.

Points: ``frames-appended`` (a frame written to its transfer's log, not yet synced),
``frames-synced`` (a frame file's frames durable, the file not yet removed),
``frames-decoded`` (a rebuilt payload in the inbox, its transfer not yet closed),
``intake-verified``, ``intake-spooled``, ``intake-queued``, ``job-claimed``,
``training-step``, ``checkpoint-written``, ``outputs-saving``, ``outputs-saved``,
``job-published``.

``PLADA_RAISE_AT=<point>[@<n>]`` raises an exception there instead (see
:func:`raise_point`); point: ``embed-batch`` (a batch on a Ray embedding worker).
"""

from __future__ import annotations

import os
import signal

_visits: dict[str, int] = {}


def _visit_hits(variable: str, name: str) -> tuple[int, int] | None:
    """(this visit's number, the visit ``variable`` names) when it names point ``name``."""
    target = os.environ.get(variable)
    if not target:
        return None
    point, _, nth = target.partition("@")
    if point != name:
        return None
    key = f"{variable}:{name}"
    _visits[key] = _visits.get(key, 0) + 1
    return _visits[key], int(nth or 1)


def crash_point(name: str) -> None:
    """SIGKILL this process if ``PLADA_CRASH_AT`` names this point (and visit)."""
    hit = _visit_hits("PLADA_CRASH_AT", name)
    if hit and hit[0] >= hit[1]:
        os.kill(os.getpid(), signal.SIGKILL)


class InjectedFault(RuntimeError):
    """The exception a raise point throws (a stand-in for a transient worker failure)."""


def raise_point(name: str) -> None:
    """Raise :class:`InjectedFault` if ``PLADA_RAISE_AT`` names this point and visit.

    Unlike a crash point the process lives on, so this tests the retry of one failed
    unit of work (a batch on a Ray worker) rather than the restart of a process. Visits
    are counted per process: ``embed-batch@2`` fails the second batch a worker takes,
    once, and its retry (the third visit) goes through.
    """
    hit = _visit_hits("PLADA_RAISE_AT", name)
    if hit and hit[0] == hit[1]:
        target = os.environ["PLADA_RAISE_AT"]
        raise InjectedFault(f"injected fault at {name} (PLADA_RAISE_AT={target})")
