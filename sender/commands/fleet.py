"""``plada-send fleet``: the releases of the reference set the fleet's devices hold."""

from __future__ import annotations

import argparse

from sender.commands.options import Subparsers


def add_fleet(sub: Subparsers) -> None:
    fleet = sub.add_parser(
        "fleet", help="register the reference releases devices hold (select/plan --fleet)"
    )
    actions = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="register a device's availability file as a release")
    add.add_argument("name", help="the release's name (letters, digits, . _ -)")
    add.add_argument(
        "availability", help="the device's file (plada-receive reference --availability-out)"
    )
    add.add_argument("--fleet", required=True, metavar="DIR", help="the fleet folder")
    add.set_defaults(func=_run_add)
    listing = actions.add_parser("list", help="the registered releases")
    listing.add_argument("--fleet", required=True, metavar="DIR", help="the fleet folder")
    listing.set_defaults(func=_run_list)


def _run_add(args: argparse.Namespace) -> int:
    from sender.selection.fleet import Fleet

    available, replaced = Fleet(args.fleet).add(args.name, args.availability)
    verb = "replaced" if replaced else "registered"
    print(
        f"{verb} release {args.name}: {available.count} of {available.size} rows of "
        f"{available.name} ({available.fingerprint.hex()[:16]}...) present "
        f"({100 * available.count / available.size:.2f}%, {available.check})"
    )
    return 0


def _run_list(args: argparse.Namespace) -> int:
    from sender.selection.fleet import Fleet

    releases = Fleet(args.fleet).releases()
    for name, available in releases:
        print(
            f"{name}: {available.count} of {available.size} rows of {available.name} "
            f"({available.fingerprint.hex()[:16]}...), {available.check}, from {available.source}"
        )
    print(f"{len(releases)} release(s) in {args.fleet}")
    return 0
