"""``plada-receive``: the edge device's command line.

  trust add SENDER.pub --trust DIR             trust a sender's public key
  trust reset-sequence SENDER --home DIR       forget a sender's last sequence number
  reference --reference SPEC                   build or check the local reference set
  reference --reference SPEC --canonical M     which of the canonical set's images it holds
  verify PAYLOAD --reference SPEC --trust DIR  check a payload; nothing is recorded
  train PAYLOAD --reference SPEC --trust DIR [--holdout T] --out DIR
  frames DIR --out PAYLOAD                     decode received frame files, no daemon
  daemon --home DIR --reference SPEC           watch an inbox, train every payload
  status --home DIR                            queue, current job, progress
  reply-key --home DIR                         the key replies to frames are MACed with
  retry --home DIR JOB                         queue a failed job again (JOB: its number)

`plada-receive COMMAND --help` for each; docs/receiver.md for more.
"""

from __future__ import annotations

import argparse
import sys

from plada_cli import build_command_line, run_cli
from receiver.commands import daemon, frames, payloads, reference, trust

SUBCOMMANDS = (
    reference.add_reference,
    payloads.add_verify,
    payloads.add_train,
    frames.add_frames,
    daemon.add_daemon,
    daemon.add_reply_key,
    daemon.add_status,
    daemon.add_retry,
    trust.add_trust,
)


def build_parser() -> argparse.ArgumentParser:
    return build_command_line("plada-receive", __doc__, SUBCOMMANDS)


def main(argv: list[str] | None = None) -> int:
    """Entry point; typed errors become one-line messages and exit status 2."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
