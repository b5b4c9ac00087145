"""``plada-send frames``: a payload cut into fountain-coded frames for a narrow, lossy link,
written once or sent for ever as a carousel."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from protocol.errors import ConfigError
from protocol.frames import PROFILES, link_profile
from sender.commands.options import Subparsers

CAROUSEL_ONLY = ("until_done", "reply_key", "rate", "max_frames")


def add_frames(sub: Subparsers) -> None:
    frames = sub.add_parser(
        "frames", help="cut a payload into fountain-coded frames for a narrow, lossy link"
    )
    frames.add_argument("payload", help="the payload file (.plada)")
    link = frames.add_mutually_exclusive_group(required=True)
    link.add_argument("--link", help=f"link profile: {', '.join(PROFILES)}", metavar="PROFILE")
    link.add_argument("--mtu", type=int, help="custom frame size in bytes")
    frames.add_argument(
        "--out",
        required=True,
        help="folder for the frame files; with --carousel `-` (stdout), a named pipe or a device",
    )
    frames.add_argument(
        "--repair",
        default="0",
        help="repair frames after the source frames: a count, or a share of them (30%%)",
    )
    frames.add_argument(
        "--stream",
        action="store_true",
        help="one stream file of length-prefixed frames instead of one file per frame: "
        "--out is that file (or, an existing folder, gets TRANSFER.frames)",
    )
    frames.add_argument(
        "--link-key",
        metavar="FILE",
        help="tag every frame with this link key (`plada-send link-key`), so that devices "
        "holding it drop forged frames; without it frames carry a CRC only",
    )
    _add_carousel_options(frames)
    frames.set_defaults(func=_run_frames)


def add_link_key(sub: Subparsers) -> None:
    key = sub.add_parser(
        "link-key", help="make a link key: frames tagged with it cannot be forged on the link"
    )
    key.add_argument("--out", required=True, help="the new key file (mode 0600; never replaced)")
    key.set_defaults(func=_run_link_key)


def _run_link_key(args: argparse.Namespace) -> int:
    from sender.link.frames import make_link_key

    path = make_link_key(args.out)
    print(
        f"link key written to {path}: give each device a copy (`plada-receive daemon "
        f"--link-key FILE`) and send with `plada-send frames --link-key {path}`"
    )
    return 0


def _add_carousel_options(frames: argparse.ArgumentParser) -> None:
    carousel = frames.add_argument_group("carousel")
    carousel.add_argument(
        "--carousel",
        action="store_true",
        help="send for ever (source, then fresh repair frames) as a stream to --out",
    )
    carousel.add_argument(
        "--rate",
        type=float,
        help="carousel pace in bits per second on air (default: the profile's; 0: unpaced)",
    )
    carousel.add_argument(
        "--until-done",
        metavar="OUTBOX_REPLY",
        help="stop the carousel once a reply in this folder (or file) says the device is done",
    )
    carousel.add_argument(
        "--reply-key", help="the device's reply key file (from `plada-receive reply-key`)"
    )
    carousel.add_argument("--max-frames", type=int, help="stop the carousel after this many frames")
    carousel.add_argument(
        "--reply-skew",
        type=float,
        default=300.0,
        help="seconds the device's clock may run behind: replies written longer before the "
        "carousel began are an earlier send's and are ignored (default 300)",
    )


def _run_frames(args: argparse.Namespace) -> int:
    profile = link_profile(args.link, args.mtu)
    if args.carousel:
        return _run_carousel(args, profile)
    for option in CAROUSEL_ONLY:
        if getattr(args, option) is not None:
            flag = "--" + option.replace("_", "-")
            raise ConfigError(f"{flag} goes with --carousel (frame files are written once)")
    from sender.link.frames import write_frames

    written = write_frames(args.payload, profile, args.out, args.repair, args.stream, args.link_key)
    print(written.summary(profile))
    print(f"frames: {Path(written.written[0]).parent}")
    return 0


def _run_carousel(args: argparse.Namespace, profile) -> int:
    from sender.link.carousel import CarouselSettings, send_carousel

    if args.stream or args.repair != "0":
        raise ConfigError("--carousel sends repair frames for ever: drop --stream and --repair")
    settings = CarouselSettings(
        args.rate,
        args.max_frames or 0,
        args.until_done,
        args.reply_key,
        args.link_key,
        args.reply_skew,
    )
    run = send_carousel(
        args.payload, profile, args.out, settings, lambda line: print(line, file=sys.stderr)
    )
    return 130 if run.stopped == "interrupted" else 0
