"""``plada-send``: the ground station's command line, in the order of use.

  task digits --out DIR                        the embedded default task (train/test .npz)
  reference --reference SPEC                   build or check a reference set: its fingerprint
  keygen --sender-id ID --out keys/ID          signing key ID.key, public key ID.pub
  score --reference SPEC --train T --out WORK  image path: a CNN teacher on the task's pixels
  world-clip | embed | merge | index           production path: CLIP embeddings in FAISS
  score --embeddings EMB --clip-weights W --task DIR --out WORK   a teacher on embeddings
  plan WORK --train T | --task DIR             predict what each candidate payload teaches
  select WORK [--plan WORK/plan] --signing-key keys/ID.key --out task.plada
  fleet add NAME DEVICE.avail --fleet DIR      a release devices hold (select/plan --fleet)
  frames task.plada --link PROFILE --out DIR   fountain-coded frames for a narrow link
  link-key --out link.key                      a key that makes frames unforgeable

`plada-send COMMAND --help` for each; docs/sender.md and docs/production.md for more.
"""

from __future__ import annotations

import argparse
import sys

from plada_cli import build_command_line, run_cli
from sender.commands import embedding, fleet, link, scoring, selection, station

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
    fleet.add_fleet,
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
