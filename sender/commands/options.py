"""Option groups and value parsers that several ``plada-send`` subcommands share."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from protocol.errors import ConfigError

if TYPE_CHECKING:
    from sender.embedding.embedders import OpenClipEmbedder

Subparsers = argparse._SubParsersAction


def add_clip_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--clip-model, --clip-weights and --device: the CLIP model and where it runs."""
    parser.add_argument(
        "--clip-model",
        required=required,
        help="open_clip model name (e.g. ViT-B-32) or a model config JSON",
    )
    parser.add_argument(
        "--clip-weights",
        required=required,
        help="local weights file, or a pretrained tag already cached",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ..."
    )


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def clip_embedder(args: argparse.Namespace) -> OpenClipEmbedder | None:
    """The CLIP embedder of --clip-model/--clip-weights, or None when neither is given."""
    if not (args.clip_model or args.clip_weights):
        return None
    if not (args.clip_model and args.clip_weights):
        raise ConfigError("give both --clip-model and --clip-weights")
    from sender.embedding.embedders import OpenClipEmbedder

    return OpenClipEmbedder(args.clip_model, args.clip_weights, args.device)


def parse_bytes(text: str) -> int:
    """A size such as 4GB or 512MB, in bytes."""
    units = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    number = text.upper().removesuffix("B")
    unit = number[-1] if number and number[-1] in units else ""
    try:
        return int(float(number.removesuffix(unit) if unit else number) * units[unit])
    except ValueError as exc:
        raise ConfigError(f"cannot read {text!r} as a size (e.g. 4GB, 512MB)") from exc


def keep_fraction(text: str) -> float:
    """One keep fraction, as ``--keep`` takes it: '1%' or '0.01'."""
    try:
        (keep,) = parse_keeps(text)
    except (ConfigError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not one keep fraction (1% or 0.01)") from exc
    return keep


def parse_keeps(text: str) -> tuple[float, ...]:
    """Keep fractions from '0.25%,1%,0.05' (percent or fraction)."""
    keeps = []
    for part in text.split(","):
        part = part.strip()
        try:
            keeps.append(float(part[:-1]) / 100 if part.endswith("%") else float(part))
        except ValueError as exc:
            raise ConfigError(f"cannot read {part!r} as a keep fraction (e.g. 0.5%,1%,5%)") from exc
    return tuple(keeps)


def add_fleet_options(parser: argparse.ArgumentParser) -> None:
    """--fleet and --releases: keep only rows the fleet's releases all hold."""
    group = parser.add_argument_group("a fleet whose reference copies differ")
    group.add_argument(
        "--fleet",
        metavar="DIR",
        help="keep only reference images every release registered here holds "
        "(plada-send fleet add), so that each of those devices has them all",
    )
    group.add_argument(
        "--releases",
        help="with --fleet: only these releases, comma-separated (default: every one "
        "registered for this reference set)",
    )


def fleet_choice(args: argparse.Namespace):
    """The --fleet/--releases choice, or None."""
    from sender.selection.fleet import FleetChoice, check_release_name

    if args.releases and not args.fleet:
        raise ConfigError("--releases names releases of a --fleet folder: add --fleet DIR")
    if not args.fleet:
        return None
    names = tuple(check_release_name(n.strip()) for n in (args.releases or "").split(",") if n)
    return FleetChoice(args.fleet, names)
