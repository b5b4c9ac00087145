"""``plada-send task``, ``reference`` and ``keygen``: the station's task, its reference
set and its signing key."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from plada_cli import add_manifest_out, add_reference_options, print_reference
from protocol.atomic_files import writable_directory
from protocol.errors import ConfigError
from sender.commands.options import Subparsers

BUILT_IN_TASKS = ("digits",)


def add_task(sub: Subparsers) -> None:
    task = sub.add_parser("task", help="export a built-in task as train.npz / test.npz")
    task.add_argument("name", choices=BUILT_IN_TASKS, help="the built-in task")
    task.add_argument("--out", required=True, help="directory for train.npz and test.npz")
    task.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    task.set_defaults(func=_run_task)


def _run_task(args: argparse.Namespace) -> int:
    from protocol.world.digits import load_digits_split

    if args.name not in BUILT_IN_TASKS:
        raise ConfigError(f"unknown built-in task {args.name!r} (available: digits)")
    out = writable_directory(args.out, "--out")
    train, test = load_digits_split(seed=args.seed)
    replace(train, name=args.name).save(out / "train.npz")
    replace(test, name=args.name).save(out / "test.npz")
    print(f"task digits: {len(train)} train and {len(test)} test images in {out}")
    return 0


def add_reference(sub: Subparsers) -> None:
    ref = sub.add_parser("reference", help="build or verify a reference set; print its fingerprint")
    add_reference_options(ref)
    add_manifest_out(ref)
    ref.set_defaults(func=print_reference)


def add_keygen(sub: Subparsers) -> None:
    keygen = sub.add_parser("keygen", help="create a sender signing key and its public key")
    keygen.add_argument("--sender-id", required=True, help="this station's sender id")
    keygen.add_argument("--out", required=True, help="path prefix: writes OUT.key and OUT.pub")
    keygen.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt the private key with the passphrase in PLADA_SIGNING_PASSPHRASE",
    )
    keygen.set_defaults(func=_run_keygen)


def _run_keygen(args: argparse.Namespace) -> int:
    from sender.signer import generate_key_files

    if args.out.endswith(("/", os.sep)) or Path(args.out).is_dir():
        raise ConfigError(
            f"--out {args.out} is a directory; --out is a path prefix (it writes OUT.key and "
            f"OUT.pub): give {Path(args.out) / args.sender_id}"
        )
    writable_directory(Path(args.out).parent, "the --out directory")
    key = generate_key_files(args.sender_id, args.out, args.encrypt)
    print(f"sender {key.sender}: key id {key.key_id.hex()}")
    print(f"private key: {args.out}.key (keep it on this station; mode 0600)")
    print(f"public key:  {args.out}.pub (install on receivers: plada-receive trust add)")
    return 0
