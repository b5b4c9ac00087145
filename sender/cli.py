"""``plada-send``: the ground station's command line.

plada-send task digits --out DIR          export the embedded default task
plada-send reference --reference SPEC     build/verify a reference set, print its fingerprint
plada-send world-clip [--reference glyphs]     the glyph world's own small CLIP (trained once)
plada-send embed --reference SPEC --clip-model M --clip-weights W --out EMB [--shard i/N]
                 [--engine ray [--address HOST:PORT] [--actors N]]
plada-send merge EMB [--from OTHER ...] [--int8]
plada-send index EMB [--memory-budget 4GB]
plada-send score --embeddings EMB --clip-weights W --task DIR | --classes a,b --out WORK
plada-send score --reference SPEC --train T.npz [--test T.npz] --out WORK   (image teacher)
plada-send keygen --sender-id ID --out keys/ID      signing key (ID.key) + public key (ID.pub)
plada-send frames task.plada --link lora-sf9 --out FRAMES [--repair 30%]   frames for a link
plada-send frames task.plada --link acoustic-64 --carousel --out - [--until-done DIR --reply-key F]
plada-send link-key --out link.key   a key for tagged frames (frames --link-key, on the devices too)
plada-send plan WORK --reference SPEC --train T.npz [--out PLAN]   predict each payload's accuracy
plada-send plan WORK --clip-weights W --task DIR    (a work directory scored from embeddings)
plada-send select WORK --plan PLAN [--max-bytes N | --link-bps B --window 20m] \\
    --signing-key keys/ID.key --out task.plada       the best planned payload that fits
plada-send select WORK --signing-key keys/ID.key --out task.plada   (safety-net, kNN, 1%)
"""

from __future__ import annotations

import argparse
import sys

from plada_cli import build_command_line, run_cli
from sender.commands import embedding, link, scoring, selection, station

SUBCOMMANDS = (
    station.add_task,
    station.add_reference,
    embedding.add_world_clip,
    embedding.add_embed,
    embedding.add_merge,
    embedding.add_index,
    scoring.add_score,
    selection.add_select,
    selection.add_plan,
    link.add_frames,
    link.add_link_key,
    station.add_keygen,
)


def build_parser() -> argparse.ArgumentParser:
    return build_command_line("plada-send", __doc__, SUBCOMMANDS)


def main(argv: list[str] | None = None) -> int:
    """Entry point; typed errors become one-line messages and exit status 2."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
