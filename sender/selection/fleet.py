"""The releases of the reference set a fleet holds, and selections restricted to them.

Devices report which canonical rows their copies hold (an availability file,
``plada-receive reference --canonical ... --availability-out``). The station registers
them by name in a fleet folder (``plada-send fleet add``); ``select`` and ``plan`` with
``--fleet`` keep only rows every named release holds, so one payload trains each of those
devices without a missing image.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.atomic_files import writable_directory, write_bytes_atomic
from protocol.availability import (
    AVAILABILITY_SUFFIX,
    Availability,
    AvailabilityError,
    read_availability,
)
from protocol.errors import ConfigError

_RELEASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_release_name(name: str) -> str:
    """A release name: letters, digits, '.', '_' or '-', at most 64 characters."""
    if not _RELEASE_NAME.fullmatch(name):
        raise ConfigError(
            f"release name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class FleetChoice:
    """Which registered releases a selection must suit: the fleet folder and the names
    (empty: every release registered for the work directory's reference set)."""

    folder: str
    releases: tuple[str, ...] = ()

    def as_json(self) -> dict[str, object]:
        return {"folder": self.folder, "releases": list(self.releases)}


@dataclass(frozen=True)
class FleetRestriction:
    """The rows a selection may keep for a fleet: present in every named release."""

    releases: tuple[str, ...]
    digest: str  # of the release files' contents, to tell a plan's fleet from another
    absent: np.ndarray  # sorted rows some release lacks

    def as_json(self) -> dict[str, object]:
        return {
            "releases": list(self.releases),
            "digest": self.digest,
            "rows_excluded": int(self.absent.size),
        }


class Fleet:
    """A folder of registered releases: ``NAME.avail`` each."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def add(self, name: str, source: str | os.PathLike[str]) -> tuple[Availability, bool]:
        """Register (or replace) release ``name`` from a device's availability file; the
        file is checked whole before it is stored. (its availability, replaced)"""
        check_release_name(name)
        available = read_availability(source)
        folder = writable_directory(self.folder, "--fleet")
        target = folder / (name + AVAILABILITY_SUFFIX)
        replaced = target.exists()
        write_bytes_atomic(target, available.encode(), durable=True)
        return available, replaced

    def releases(self) -> list[tuple[str, Availability]]:
        """Every registered release, by name (a damaged file is a typed error)."""
        if not self.folder.is_dir():
            raise ConfigError(
                f"fleet folder {self.folder} does not exist: register releases with "
                "`plada-send fleet add --fleet DIR NAME FILE`"
            )
        found = []
        for path in sorted(self.folder.glob("*" + AVAILABILITY_SUFFIX)):
            found.append((path.name[: -len(AVAILABILITY_SUFFIX)], read_availability(path)))
        return found

    def restriction(
        self, fingerprint: bytes, size: int, names: tuple[str, ...] = ()
    ) -> FleetRestriction:
        """The rows absent from any of ``names`` (none named: every release registered
        for this reference set), for a reference set of ``fingerprint`` and ``size``."""
        registered = dict(self.releases())
        for name in names:
            if name not in registered:
                known = ", ".join(registered) or "none"
                raise ConfigError(f"release {name!r} is not in {self.folder} (registered: {known})")
        chosen = names or tuple(
            n for n, a in registered.items() if a.fingerprint == fingerprint and a.size == size
        )
        if not chosen:
            raise ConfigError(
                f"no release in {self.folder} is of this reference set "
                f"({fingerprint.hex()[:16]}..., {size} rows): register one with "
                "`plada-send fleet add`"
            )
        held = np.ones(size, dtype=bool)
        digest = hashlib.sha256()
        for name in chosen:
            available = registered[name]
            if available.fingerprint != fingerprint or available.size != size:
                raise AvailabilityError(
                    f"release {name!r} is of reference {available.name} "
                    f"({available.fingerprint.hex()[:16]}..., {available.size} rows), not of "
                    f"this work directory's ({fingerprint.hex()[:16]}..., {size} rows)"
                )
            held &= available.present
            digest.update(name.encode() + b"\0" + available.encode())
        return FleetRestriction(tuple(chosen), digest.hexdigest(), np.flatnonzero(~held))


def restriction_of(
    choice: FleetChoice | None, fingerprint: bytes, size: int
) -> FleetRestriction | None:
    """The restriction a fleet choice makes (None: no fleet)."""
    if choice is None:
        return None
    return Fleet(choice.folder).restriction(fingerprint, size, choice.releases)
