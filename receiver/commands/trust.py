"""``plada-receive trust add|remove|list|reset-sequence``: the senders this device trusts,
and the way out of a sequence lockout."""

from __future__ import annotations

import argparse
from pathlib import Path

from protocol.atomic_files import writable_directory
from protocol.errors import ConfigError
from receiver.commands.options import TRUST_ENV, Subparsers, trust_dir
from receiver.errors import TrustStoreError
from receiver.ledger import LEDGER_FILE, SequenceLedger
from receiver.trust_store import add_key, load_trust_store, remove_keys


def add_trust(sub: Subparsers) -> None:
    trust = sub.add_parser("trust", help="list, add or remove trusted sender keys")
    actions = trust.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="trust the senders of these public keys")
    add.add_argument("keys", nargs="+", metavar="KEY.pub", help="public key files (keygen)")
    add.set_defaults(func=_run_add)
    remove = actions.add_parser("remove", help="stop trusting a sender or one of its keys")
    remove.add_argument("selector", metavar="SENDER|KEYID", help="a sender id or a key id (hex)")
    remove.set_defaults(func=_run_remove)
    listing = actions.add_parser("list", help="the trusted keys")
    listing.set_defaults(func=_run_list)
    reset = actions.add_parser(
        "reset-sequence",
        help="forget a sender's last accepted sequence number (after a lockout)",
    )
    reset.add_argument("sender", metavar="SENDER", help="the sender id")
    reset.set_defaults(func=_run_reset_sequence)
    for command in (add, remove, listing, reset):
        where = command.add_mutually_exclusive_group()
        where.add_argument("--trust", help=f"trust store directory (default ${TRUST_ENV})")
        where.add_argument("--home", help="a daemon's home: its trust store HOME/trust")


def _store_dir(args: argparse.Namespace) -> Path:
    folder = Path(args.home) / "trust" if args.home else trust_dir(args)
    if folder is None:
        raise ConfigError(f"name the trust store: --trust DIR, --home HOME or ${TRUST_ENV}")
    return folder


def _run_add(args: argparse.Namespace) -> int:
    from protocol.signing import SenderKey

    folder = writable_directory(_store_dir(args), "the trust store")
    for path in args.keys:
        key = SenderKey.load(path)
        written = add_key(folder, key)
        print(f"trusted sender {key.sender}, key {key.key_id.hex()} ({written})")
    return 0


def _run_remove(args: argparse.Namespace) -> int:
    removed = remove_keys(_store_dir(args), args.selector)
    if not removed:
        raise ConfigError(f"no trusted key matches {args.selector!r}: see `trust list`")
    print(f"removed {len(removed)} key(s): " + ", ".join(p.name for p in removed))
    return 0


def _run_list(args: argparse.Namespace) -> int:
    folder = _store_dir(args)
    if not folder.is_dir():
        raise TrustStoreError(
            f"there is no trust store at {folder}: check the path, or trust a sender first "
            "with `plada-receive trust add`"
        )
    store = load_trust_store(folder)
    for key in store:
        print(f"{key.sender}\t{key.key_id.hex()}\t{key.public_key.hex()}")
    print(f"{len(store)} trusted key(s) in {folder}")
    return 0


def _run_reset_sequence(args: argparse.Namespace) -> int:
    path = Path(args.home) / LEDGER_FILE if args.home else _store_dir(args) / LEDGER_FILE
    if not path.is_file():
        raise TrustStoreError(f"no sequence ledger at {path}: nothing to reset")
    ledger = SequenceLedger(path)
    try:
        forgotten = ledger.reset(args.sender)
    finally:
        ledger.close()
    if forgotten is None:
        raise ConfigError(f"the ledger {path} holds no sequence number of {args.sender!r}")
    print(
        f"forgot sequence {forgotten} of sender {args.sender} in {path}: its next payload is "
        "accepted whatever its sequence number, and replays are refused from then on"
    )
    return 0
