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
