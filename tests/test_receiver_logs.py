import json
import logging

from hypothesis import given
from hypothesis import strategies as st

from receiver.logs import ReadableFormatter, one_line


@given(st.text())
def test_a_readable_record_is_one_line_whatever_its_message_holds(text: str) -> None:
    record = logging.makeLogRecord({"msg": "inbox file %s refused", "args": (text,)})
    line = ReadableFormatter().format(record)
    assert line.splitlines() == [line] and "\x1b" not in line
    assert text in line or one_line(text) in line


def test_a_file_name_with_a_newline_cannot_forge_a_line_of_the_daemon_log(tmp_path, capsys):
    from receiver.logs import setup_logging

    setup_logging(tmp_path / "daemon.log")
    forged = "x.plada\n12:00:00 info    payload queued: job 1 (signed by station)"
    logging.getLogger("plada.receiver").warning(f"inbox file {forged} refused")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.plada\\n12:00:00" in err
    (entry,) = (tmp_path / "daemon.log").read_text().splitlines()  # JSON keeps it exact
    assert json.loads(entry)["message"] == f"inbox file {forged} refused"


def test_status_says_when_the_intake_thread_stopped_passing_though_health_is_fresh() -> None:
    """The job loop keeps health.json fresh; a stuck intake thread shows in status."""
    import time

    from receiver.status import intake_stalled_seconds, render_status

    now = time.time()
    health = {"updated": now, "intake_pass_at": now - 600, "intake_poll_seconds": 1.0}
    assert intake_stalled_seconds(health, now) == 600
    assert intake_stalled_seconds({**health, "intake_pass_at": now - 5}, now) is None
    status = {
        "home": "/h",
        "daemons_running": ["me"],
        "health": health,
        "intake_stalled_seconds": intake_stalled_seconds(health, now),
        "queue": {"queued": 0},
        "quarantined": 0,
        "jobs": [],
        "senders": [],
        "recent_quarantine": [],
    }
    assert "INTAKE STALLED: no intake pass finished for 600s" in render_status(status)
