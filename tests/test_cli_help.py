"""Help texts, status order and the notebook's missing-report message, in-process."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest

from plada_cli import command_parsers
from receiver.cli import build_parser as receiver_parser
from receiver.job import class_difference
from sender.cli import build_parser as sender_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("build", [sender_parser, receiver_parser])
def test_every_option_of_every_command_has_a_help_line(build) -> None:
    missing = [
        f"{parser.prog} {action.option_strings or action.dest}"
        for parser in command_parsers(build())
        for action in parser._actions
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
        and not action.help
    ]
    assert not missing, missing


def test_class_differences_are_named() -> None:
    assert "position 1: 'b' where the payload has 'c'" in class_difference(
        ("a", "b", "c"), ("a", "c", "b")
    )
    text = class_difference(("a", "x"), ("a", "b"))
    assert "missing: 'b'" in text and "does not have: 'x'" in text


def test_status_lists_the_latest_quarantined_files_by_time(tmp_path) -> None:
    from receiver.job_queue import JobQueue
    from receiver.status import collect_status

    JobQueue(tmp_path / "queue.sqlite").close()
    quarantine = tmp_path / "quarantine"
    quarantine.mkdir()
    now = time.time()
    for age, name in [(30, "zz-oldest"), (20, "aa-middle"), (10, "mm-newest")]:
        path = quarantine / f"{name}.reason.json"
        path.write_text(json.dumps({"file": name, "error": "E", "message": "m"}))
        os.utime(path, (now - age, now - age))
    shown = collect_status(tmp_path, recent=2)["recent_quarantine"]
    assert [reason["file"] for reason in shown] == ["aa-middle", "mm-newest"]


def test_the_notebook_without_a_report_says_what_to_run(tmp_path, monkeypatch) -> None:
    notebook = json.loads((ROOT / "notebooks" / "demo_report.ipynb").read_text())
    loader = "".join(notebook["cells"][1]["source"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PLADA_REPORT", str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError, match="run `make compare` first"):
        exec(compile(loader, "demo_report.ipynb", "exec"), {})


def test_epochs_alone_decide_how_long_a_student_trains() -> None:
    from receiver.commands.options import training_length

    def length(*options: str) -> tuple[int, int, int]:
        train = ["train", "x.plada", "--out", "o", *options]
        return training_length(receiver_parser().parse_args(train))

    assert length() == (30, 250, 250)  # the student's fixed schedule
    assert length("--epochs", "3") == (3, 0, 0)  # no floor, no cap: the epochs decide
    assert length("--epochs", "3", "--max-steps", "100") == (3, 250, 100)


def test_keep_and_keeps_take_both_spellings_and_defaults_fit_the_machine() -> None:
    from plada_cli import machine_cores

    parse = sender_parser().parse_args
    assert parse(["select", "w", "--out", "p", "--keep", "1%"]).keep == pytest.approx(0.01)
    assert parse(["select", "w", "--out", "p", "--keep", "0.005"]).keep == pytest.approx(0.005)
    with pytest.raises(SystemExit):
        parse(["select", "w", "--out", "p", "--keep", "1%,2%"])
    cores = machine_cores()
    embed = parse(["embed", "--out", "e", "--clip-model", "m", "--clip-weights", "w"])
    assert embed.workers == min(4, cores) and embed.device == "auto"
    train = receiver_parser().parse_args(["train", "x", "--out", "o"])
    assert train.loader_threads == min(8, cores) and train.device == "auto"
    usage = sender_parser().format_help().splitlines()[0]
    assert usage == "usage: plada-send [-h] COMMAND ..."  # not every command on one line
