"""Hostile local input and damaged state at the receiver, one test per case: odd inbox
entries, ordering, quarantine quota, damaged databases, the ledger, audience, lifetimes,
weak keys, loose permissions, per-job caps. Each asserts the typed outcome and that
nothing valid is lost."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from protocol.errors import LifetimeError, SigningKeyError, StorageError, WrongAudienceError
from protocol.signing import SenderKey, SigningKey
from receiver.acceptance import AcceptanceRules, Received, open_acceptance
from receiver.errors import TrustStoreError
from receiver.job_queue import JobQueue
from receiver.ledger import LEDGER_FILE, SequenceLedger, backup_path, open_home_ledger
from receiver.sqlite_store import add_missing_columns, open_database
from receiver.trust_store import TrustOptions, add_key, load_trust_store
from tests.hostile import MANIFEST, SENDERS, jobs, make_intake, reasons, signed_payload
from tests.subprocess_cli import cli, cli_env


def _put(home: Path, name: str | bytes, data: bytes) -> None:
    inbox = os.fsencode(home / "inbox")
    os.makedirs(inbox, exist_ok=True)
    with open(os.path.join(inbox, os.fsencode(name)), "wb") as handle:
        handle.write(data)


# --- 2. names that stop intake --------------------------------------------------------------


def test_long_names_and_symlink_loops_do_not_stop_intake(tmp_path) -> None:
    home = tmp_path / "home"
    intake = make_intake(home)
    long_valid = "v" * 240 + ".plada"  # 246 characters: longer than a claimed name could be
    _put(home, long_valid, signed_payload(sequence=10))
    _put(home, "j" * 228 + ".plada", b"junk with a name just under the limit")
    _put(home, "k" * 250, b"junk with a name near the limit")
    os.symlink("loop-b", home / "inbox" / "loop-a")
    os.symlink("loop-a", home / "inbox" / "loop-b")
    intake.poll()
    assert jobs(intake) == [(long_valid, 10)]
    got = reasons(home)
    assert got["j" * 228 + ".plada"] == "NotAPayloadError" and got["k" * 250] == "NotAPayloadError"
    assert got["loop-a"] == got["loop-b"] == "InboxEntryError"
    for path in (home / "quarantine").iterdir():  # names of the daemon's own, all short
        assert len(path.name) < 64
    assert not list((home / "inbox").iterdir()) and intake.waiting() == 0


# --- 3. ordering ----------------------------------------------------------------------------


def test_one_senders_payloads_in_one_pass_are_queued_in_sequence_order(tmp_path) -> None:
    home = tmp_path / "home"
    intake = make_intake(home)
    _put(home, "a-newest.plada", signed_payload(sequence=7, task="seven"))
    _put(home, "m-other-sender.plada", signed_payload("station-b", sequence=3))
    _put(home, "z-oldest.plada", signed_payload(sequence=5, task="five"))
    intake.poll()
    assert jobs(intake) == [  # by sender, then by sequence number
        ("z-oldest.plada", 5),
        ("a-newest.plada", 7),
        ("m-other-sender.plada", 3),
    ]
    assert reasons(home) == {}


def test_the_reorder_window_waits_for_older_payloads(tmp_path) -> None:
    home = tmp_path / "home"
    intake = make_intake(home, reorder_seconds=0.6)
    _put(home, "nine.plada", signed_payload(sequence=9))
    intake.poll()
    assert jobs(intake) == [] and intake.waiting() == 1  # held inside the window
    _put(home, "eight.plada", signed_payload(sequence=8))  # arrives late, within it
    intake.poll()
    time.sleep(0.7)
    intake.poll()
    assert jobs(intake) == [("eight.plada", 8), ("nine.plada", 9)]
    _put(home, "six.plada", signed_payload(sequence=6))  # after acceptance: a rollback
    time.sleep(0.7)
    intake.poll()
    assert reasons(home) == {"six.plada": "RollbackError"}


# --- 4. symlinks, special files, reads past the cap -----------------------------------------


def test_links_and_special_files_are_quarantined_never_followed(tmp_path) -> None:
    home = tmp_path / "home"
    intake = make_intake(home, max_bytes=4096)
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0)
    os.symlink(secret, home / "inbox" / "to-secret.plada")
    os.symlink("/proc/self/status", home / "inbox" / "to-proc.plada")
    os.symlink(tmp_path / "nothing", home / "inbox" / "dangling.plada")
    os.mkfifo(home / "inbox" / "fifo.plada")
    _put(home, "big.plada", b"x" * 5000)
    _put(home, "ok.plada", signed_payload(sequence=4))
    intake.poll()
    assert reasons(home) == {
        "to-secret.plada": "InboxEntryError",
        "to-proc.plada": "InboxEntryError",
        "dangling.plada": "InboxEntryError",
        "fifo.plada": "InboxEntryError",
        "big.plada": "PayloadLimitError",
    }
    records = [json.loads(p.read_text()) for p in (home / "quarantine").glob("*.reason.json")]
    linked = [r for r in records if r["file"].startswith("to-")]
    assert all(r["sha256"] is None for r in linked)  # the target was never read
    assert "symbolic link" in linked[0]["message"]
    assert jobs(intake) == [("ok.plada", 4)] and intake.waiting() == 0


# --- 5. quarantine quota --------------------------------------------------------------------


def test_the_quarantine_quota_purges_oldest_first(tmp_path) -> None:
    home = tmp_path / "home"
    intake = make_intake(home, quarantine_max_files=5, quarantine_max_bytes=64 * 1024)
    for number in range(12):
        _put(home, f"junk-{number:02d}", os.urandom(3000))
        intake.poll()
    kept = sorted(reasons(home))
    assert kept == [f"junk-{n:02d}" for n in range(7, 12)]  # the newest five
    usage = intake.report()["quarantine"]
    assert usage["files"] == 5 and usage["purged"] == 7 and usage["bytes"] <= 64 * 1024
    for _ in range(30):  # bytes: 30 junk files of 10 KB never hold more than the quota
        _put(home, f"bulk-{_}", os.urandom(10_000))
        intake.poll()
    on_disk = sum(p.stat().st_size for p in (home / "quarantine").iterdir())
    assert on_disk <= 64 * 1024 and intake.report()["quarantine"]["bytes"] <= 64 * 1024
    _put(home, "genuine.plada", signed_payload(sequence=2))
    intake.poll()
    assert jobs(intake) == [("genuine.plada", 2)]


# --- 6. a damaged database ------------------------------------------------------------------


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100:4096] = os.urandom(3996)  # the schema page: every query fails
    path.write_bytes(bytes(data))


def test_a_damaged_queue_is_a_typed_error_and_keeps_payloads_for_a_retry(tmp_path) -> None:
    home = tmp_path / "home"
    intake = make_intake(home)
    intake.queue.close()
    intake.queue.db = sqlite3.connect(":memory:")  # a connection whose tables are gone
    _put(home, "ok.plada", signed_payload(sequence=3))
    intake.poll()  # every query fails: the file must wait, not be quarantined
    assert reasons(home) == {} and intake.waiting() == 1
    claimed = [p for p in intake.claimed.iterdir() if not p.name.endswith(".origin")]
    assert len(claimed) == 1
    JobQueue(home / "queue.sqlite").close()
    _damage(home / "queue.sqlite")
    with pytest.raises(StorageError, match=r"ledger\.sqlite"):
        JobQueue(home / "queue.sqlite", check=True)


def test_a_queue_changed_under_a_running_daemon_is_a_typed_error_not_a_type_error(
    tmp_path,
) -> None:
    path = tmp_path / "queue.sqlite"
    queue = JobQueue(path)
    other = sqlite3.connect(path)  # another process rewrites the table under it
    other.executescript(
        "ALTER TABLE jobs RENAME TO jobs_old;"
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, state TEXT, owner TEXT, claims INT,"
        " started REAL, claimed_at_step INT, progress_step INT, junk TEXT);"
        "INSERT INTO jobs (state, claims, progress_step) VALUES ('queued', 0, 0);"
    )
    other.close()
    with pytest.raises(StorageError, match="damaged while in use"):
        queue.claim("daemon-1")
    queue.close()


def test_the_daemon_refuses_to_start_on_a_damaged_queue_with_one_line(tmp_path) -> None:
    home = tmp_path / "home"
    JobQueue(home / "queue.sqlite").close() if home.mkdir() is None else None
    _damage(home / "queue.sqlite")
    proc = subprocess.run(
        [*cli("plada-receive"), "daemon", "--home", str(home), "--reference", "glyphs:per=2"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "StorageError" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# --- 7. the ledger apart from the queue -----------------------------------------------------


def test_moving_a_damaged_queue_aside_keeps_replay_protection(tmp_path) -> None:
    home = tmp_path / "home"
    old = signed_payload(sequence=5)
    intake = make_intake(home)
    _put(home, "first.plada", old)
    intake.poll()
    assert jobs(intake) == [("first.plada", 5)]
    intake.queue.close()
    intake.ledger.close()
    (home / "queue.sqlite").rename(home / "queue.sqlite.damaged")  # the documented recovery
    again = make_intake(home)
    _put(home, "replayed.plada", old)
    again.poll()
    assert jobs(again) == [] and reasons(home) == {"replayed.plada": "ReplayError"}


def test_two_daemons_upgrading_one_old_file_add_each_column_once(tmp_path) -> None:
    """Two daemons started at once on a home of an earlier release both find a column
    missing; the second must look again under the write lock, not add it twice."""
    path = tmp_path / "earlier-release.sqlite"
    first = open_database(path, "CREATE TABLE IF NOT EXISTS jobs (id INTEGER);")
    other = open_database(path, "")
    raced: list[str] = []

    def the_other_daemon_upgrades_in_between(statement: str) -> None:
        if not raced and not statement.startswith("PRAGMA"):
            raced.append(statement)
            other.execute("ALTER TABLE jobs ADD COLUMN intake_name TEXT")

    first.set_trace_callback(the_other_daemon_upgrades_in_between)
    add_missing_columns(first, "jobs", {"intake_name": "TEXT", "sender": "TEXT"})
    assert raced, "the other daemon never ran"
    columns = [row[1] for row in first.execute("PRAGMA table_info(jobs)")]
    assert columns == ["id", "intake_name", "sender"]
    first.close()
    other.close()


def test_a_lost_ledger_is_rebuilt_or_refused(tmp_path) -> None:
    home = tmp_path / "home"
    intake = make_intake(home)
    _put(home, "one.plada", signed_payload(sequence=40))
    _put(home, "two.plada", signed_payload("station-b", sequence=41))
    intake.poll()
    intake.ledger.close()
    backup = json.loads(backup_path(home / LEDGER_FILE).read_text())
    assert {row["sender"]: row["sequence"] for row in backup["senders"]} == {
        "station-a": 40,
        "station-b": 41,
    }
    (home / LEDGER_FILE).unlink()  # lost: rebuilt from its backup
    rebuilt = open_home_ledger(home, [], has_history=True)
    assert rebuilt.last("station-a") == 40 and rebuilt.last("station-b") == 41
    rebuilt.close()
    (home / LEDGER_FILE).unlink()
    backup_path(home / LEDGER_FILE).unlink()  # and its backup: rebuilt from the queue
    from_queue = open_home_ledger(home, intake.queue.signed_history(), has_history=True)
    assert from_queue.last("station-a") == 40
    from_queue.close()
    for path in (home / LEDGER_FILE, backup_path(home / LEDGER_FILE)):
        path.unlink()
    with pytest.raises(StorageError, match="--accept-empty-ledger"):
        open_home_ledger(home, [], has_history=True)  # nothing to rebuild from
    assert not (home / LEDGER_FILE).exists()  # so the next start refuses too
    open_home_ledger(home, [], has_history=True, accept_empty=True).close()


def test_an_intake_interrupted_after_recording_queues_the_job_on_restart(tmp_path) -> None:
    """The ledger recorded the payload under its claimed name; the daemon died before
    queueing it: the next pass queues it (no replay error, nothing lost)."""
    home = tmp_path / "home"
    intake = make_intake(home)
    data = signed_payload(sequence=12)
    _put(home, "late.plada", data)
    intake.claims.claim_ready()
    (claimed,) = intake.claims.files()
    import hashlib

    intake.ledger.record("station-a", 12, hashlib.sha256(data).hexdigest(), claimed)
    intake.poll()
    assert jobs(intake) == [("late.plada", 12)] and reasons(home) == {}


# --- 8. audience ----------------------------------------------------------------------------


def test_a_payload_for_one_device_is_refused_by_another(tmp_path) -> None:
    for_a = signed_payload(sequence=20, audience="rover-a")
    device_a = make_intake(tmp_path / "a", TrustOptions(audiences=frozenset({"rover-a"})))
    device_b = make_intake(tmp_path / "b", TrustOptions(audiences=frozenset({"rover-b"})))
    for device, home in ((device_a, tmp_path / "a"), (device_b, tmp_path / "b")):
        _put(home, "for-a.plada", for_a)
        _put(home, "for-anyone.plada", signed_payload("station-b", sequence=21))  # v3
        device.poll()
    assert jobs(device_a) == [("for-a.plada", 20), ("for-anyone.plada", 21)]
    assert jobs(device_b) == [("for-anyone.plada", 21)]
    assert reasons(tmp_path / "b") == {"for-a.plada": "WrongAudienceError"}
    group = make_intake(tmp_path / "c", TrustOptions(audiences=frozenset({"fleet-north"})))
    _put(tmp_path / "c", "fleet.plada", signed_payload(sequence=22, audience="fleet-north"))
    group.poll()
    assert jobs(group) == [("fleet.plada", 22)]
    rules = AcceptanceRules(TrustOptions(require_audience=True))
    strict = open_acceptance(tmp_path / "a" / "trust", rules, None, MANIFEST)
    with pytest.raises(WrongAudienceError, match="names no audience"):
        strict.examine(Received.of(signed_payload(sequence=23), "no-audience.plada"))


# --- 10. sequence and lifetime sanity, reset-sequence ---------------------------------------


def test_far_future_sequences_and_lifetimes_are_refused(tmp_path) -> None:
    add_key(tmp_path / "trust", SENDERS["station-a"].public)
    device = open_acceptance(tmp_path / "trust", AcceptanceRules(), None, MANIFEST)

    def examine(data: bytes) -> None:
        device.examine(Received.of(data, "from-station-a.plada"))

    with pytest.raises(LifetimeError, match="ahead of this device's clock"):
        examine(signed_payload(sequence=(1 << 63) - 1))
    with pytest.raises(LifetimeError, match="days from now"):
        examine(signed_payload(expires_in=(1 << 62)))
    examine(signed_payload())  # an honest one passes


def test_trust_reset_sequence_ends_a_lockout(tmp_path) -> None:
    home = tmp_path / "home"
    intake = make_intake(home)
    _put(home, "ahead.plada", signed_payload(sequence=int(time.time() * 1000) + 3_600_000))
    intake.poll()  # an hour ahead: within the limit, accepted
    _put(home, "now.plada", signed_payload())
    intake.poll()
    assert reasons(home) == {"now.plada": "RollbackError"}
    intake.ledger.close()
    reset = subprocess.run(
        [*cli("plada-receive"), "trust", "reset-sequence", "station-a", "--home", str(home)],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert reset.returncode == 0, reset.stderr
    assert "forgot sequence" in reset.stdout
    after = make_intake(home)
    assert after.ledger.last("station-a") is None
    _put(home, "now-again.plada", signed_payload(seed=1))
    after.poll()
    assert [name for name, _ in jobs(after)] == ["ahead.plada", "now-again.plada"]
    unknown = subprocess.run(
        [*cli("plada-receive"), "trust", "reset-sequence", "nobody", "--home", str(home)],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert unknown.returncode == 2 and "holds no sequence number" in unknown.stderr


# --- 12. weak keys --------------------------------------------------------------------------

SMALL_ORDER = [
    bytes(32),  # y = 0: order 4
    (1).to_bytes(32, "little"),  # the identity
    ((2**255 - 19) - 1).to_bytes(32, "little"),  # y = -1: order 2
]


@pytest.mark.parametrize("raw", SMALL_ORDER, ids=["zero", "identity", "order-2"])
def test_small_order_keys_are_refused(tmp_path, raw: bytes) -> None:
    with pytest.raises(SigningKeyError, match="small order"):
        SenderKey("evil", raw)
    forged = tmp_path / "evil.pub"
    forged.write_text(
        json.dumps(
            {
                "format": "plada-sender-key-v1",
                "sender": "evil",
                "algorithm": "ed25519",
                "public_key": raw.hex(),
            }
        )
    )
    proc = subprocess.run(
        [*cli("plada-receive"), "trust", "add", str(forged), "--trust", str(tmp_path / "t")],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "small order" in proc.stderr
    assert not list((tmp_path / "t").glob("*.pub")) if (tmp_path / "t").exists() else True


def test_non_canonical_keys_are_refused_and_real_keys_pass() -> None:
    with pytest.raises(SigningKeyError, match="non-canonical"):
        SenderKey("evil", (2**255 - 19).to_bytes(32, "little"))  # y = p
    for _ in range(50):
        SigningKey.generate("honest")  # every genuine key passes the same checks


# --- 17. permissions ------------------------------------------------------------------------


def test_loose_permissions_on_keys_are_refused(tmp_path) -> None:
    trust = tmp_path / "trust"
    add_key(trust, SENDERS["station-a"].public)
    trust.chmod(0o777)
    with pytest.raises(TrustStoreError, match="chmod go-w"):
        load_trust_store(trust)
    trust.chmod(0o755)
    (key_file,) = trust.glob("*.pub")
    key_file.chmod(0o666)
    with pytest.raises(TrustStoreError, match="writable by group or others"):
        load_trust_store(trust)
    key_file.chmod(0o644)
    assert len(load_trust_store(trust)) == 1
    private = tmp_path / "gs.key"
    SigningKey.generate("gs").save(private)
    private.chmod(0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        SigningKey.load(private)
    private.chmod(0o600)
    assert SigningKey.load(private).sender == "gs"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o644


# --- 15, 16, 18. odd names, the size map, per-job caps -------------------------------------


def test_a_valid_payload_with_a_non_utf8_name_is_queued(tmp_path) -> None:
    home = tmp_path / "home"
    intake = make_intake(home)
    _put(home, b"caf\xe9-\xff.plada", signed_payload(sequence=30))
    intake.poll()
    assert jobs(intake) == [("caf\\xe9-\\xff.plada", 30)]
    assert len(list((home / "spool").iterdir())) == 1 and reasons(home) == {}


def test_the_map_of_unsettled_sizes_stays_bounded(tmp_path) -> None:
    home = tmp_path / "home"
    intake = make_intake(home, settle_seconds=60.0)
    for round_ in range(20):  # files come and go before they ever settle
        names = [f"r{round_}-{i}.plada" for i in range(25)]
        for name in names:
            _put(home, name, b"partial")
        intake.poll()
        for name in names:
            (home / "inbox" / name).unlink()
    intake.poll()
    assert len(intake.claims.sizes) == 0


def test_payloads_over_the_per_job_caps_are_quarantined(tmp_path) -> None:
    home = tmp_path / "home"
    intake = make_intake(home, max_images=100, max_classes=10)
    _put(home, "many-images.plada", signed_payload(sequence=50, count=300))
    _put(home, "many-classes.plada", signed_payload("station-b", sequence=51, classes=12))
    _put(home, "fits.plada", signed_payload("station-c", sequence=52, count=100, classes=10))
    intake.poll()
    assert reasons(home) == {
        "many-images.plada": "PayloadLimitError",
        "many-classes.plada": "PayloadLimitError",
    }
    assert jobs(intake) == [("fits.plada", 52)]
    record = next((home / "quarantine").glob("*.reason.json")).read_text()
    assert "--max-job-images" in record


def test_ledger_backup_is_written_durably_with_every_acceptance(tmp_path) -> None:
    ledger = SequenceLedger(tmp_path / LEDGER_FILE)
    ledger.record("station-a", 3, "a" * 64)
    assert (
        json.loads(backup_path(tmp_path / LEDGER_FILE).read_text())["senders"][0]["sequence"] == 3
    )
    ledger.close()


# --- 14. train reads, hashes and decodes the payload once --------------------------------------


def test_train_reads_hashes_and_decodes_the_payload_once(
    tmp_path, small_pool, cache_dir, monkeypatch
) -> None:
    """`plada-receive train` reads the payload file once, hashes its bytes once and decodes
    them once: acceptance hands what it judged to the job, which neither reads the file
    again (a file swapped after acceptance is never trained) nor re-checks it. Counted
    where every read, hash and decode must pass, not at one import site."""
    import hashlib
    import pathlib

    import numpy as np

    from protocol.payload import Payload, SenderStamp, encode_payload, write_payload
    from protocol.payload import codec as payload_format
    from receiver.cli import main
    from tests.conftest import SMALL_SPEC

    manifest, key = small_pool.manifest, SENDERS["station-a"]
    indices = np.arange(0, len(manifest), 20)
    now = int(time.time())
    stamp = SenderStamp(key.sender, int(time.time() * 1000), now + 3600)
    data = encode_payload(
        Payload(
            "once",
            manifest.name,
            manifest.fingerprint,
            len(manifest),
            ("a", "b"),
            indices,
            indices % 2,
            created=now,
            sender=stamp,
        ),
        reference=manifest,
        signer=key,
    )
    path = tmp_path / "once.plada"
    write_payload(path, data)
    add_key(tmp_path / "trust", key.public)
    counts = {"read": 0, "hash": 0, "decode": 0}
    read_bytes, sha256 = pathlib.Path.read_bytes, hashlib.sha256
    parse_header = payload_format._parse_header

    def counted_read(self: pathlib.Path) -> bytes:
        counts["read"] += self == path
        return read_bytes(self)

    def counted_sha256(*args, **kwargs):
        counts["hash"] += bool(args) and bytes(args[0]) == data
        return sha256(*args, **kwargs)

    def counted_parse(raw: bytes):
        # every decode parses the header (the first check of a file reads only the
        # framing's fixed-size lengths)
        counts["decode"] += raw in data
        return parse_header(raw)

    monkeypatch.setattr(pathlib.Path, "read_bytes", counted_read)
    monkeypatch.setattr(hashlib, "sha256", counted_sha256)
    monkeypatch.setattr(payload_format, "_parse_header", counted_parse)
    args = ["train", str(path), "--reference", SMALL_SPEC, "--cache-dir", str(cache_dir)]
    args += ["--trust", str(tmp_path / "trust"), "--out", str(tmp_path / "out"), "--quiet"]
    args += ["--min-steps", "2", "--max-steps", "2", "--batch-size", "16", "--no-export"]
    assert main(args) == 0
    monkeypatch.undo()
    assert counts == {"read": 1, "hash": 1, "decode": 1}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["task"] == "once"
    assert report["payload_sha256"] == hashlib.sha256(data).hexdigest()


def test_the_sender_addresses_payloads_with_audience(tmp_path) -> None:
    from protocol.errors import ConfigError
    from sender.signer import PayloadSigner, generate_key_files

    generate_key_files("gs-7", tmp_path / "gs-7", encrypt=False)
    signer = PayloadSigner.from_files(tmp_path / "gs-7.key", "1h", audience="rover-7")
    assert signer.stamp(int(time.time())).audience == "rover-7"
    with pytest.raises(ConfigError, match="invalid --audience"):
        PayloadSigner.from_files(tmp_path / "gs-7.key", "1h", audience="no spaces")


def test_verify_and_train_apply_the_per_job_caps(tmp_path, small_pool, cache_dir) -> None:
    import numpy as np

    from protocol.payload import BODY_CODING, Payload, SenderStamp, encode_payload
    from tests.conftest import SMALL_SPEC

    manifest = small_pool.manifest
    now = int(time.time())
    blob = encode_payload(
        Payload(
            "big",
            manifest.name,
            manifest.fingerprint,
            len(manifest),
            ("a", "b"),
            np.arange(0, 600),
            np.arange(600) % 2,
            created=now,
            sender=SenderStamp("station-a", int(now * 1000), now + 3600),
        ),
        codings=(BODY_CODING,),
        signer=SENDERS["station-a"],
    )
    (tmp_path / "big.plada").write_bytes(blob)
    add_key(tmp_path / "trust", SENDERS["station-a"].public)
    common = [
        "--reference",
        SMALL_SPEC,
        "--cache-dir",
        str(cache_dir),
        "--trust",
        str(tmp_path / "trust"),
        "--max-job-images",
        "500",
    ]
    for command in (["verify"], ["train", "--out", str(tmp_path / "out")]):
        proc = subprocess.run(
            [*cli("plada-receive"), command[0], str(tmp_path / "big.plada"), *command[1:], *common],
            env=cli_env(),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and "PayloadLimitError" in proc.stderr, proc.stderr
        assert "at most 500 images" in proc.stderr
    assert (
        SequenceLedger(tmp_path / "trust" / LEDGER_FILE, read_only=True).last("station-a") is None
    )


def test_the_quarantine_keeps_the_disks_free_space_reserve_on_a_small_disk(tmp_path) -> None:
    """On a small disk, junk refused into the quarantine is purged before the free space
    falls under the reserve, long before the byte quota (256 MiB) is reached."""
    from receiver.quarantine import Quarantine

    disk = 8 << 20  # an 8 MiB filesystem, as the device's disk is seen by the quarantine
    folder = tmp_path / "quarantine"

    def free(path) -> int:
        return disk - sum(p.stat().st_size for p in folder.iterdir())

    quarantine = Quarantine(folder, max_files=4096, max_bytes=256 << 20, free_bytes=free)
    quarantine.reserve = 2 << 20  # a quarter of the 8 MiB disk
    for number in range(77):
        junk = tmp_path / f"junk-{number}"
        junk.write_bytes(bytes(100_000))
        quarantine.put(junk, junk.name, f"{number:064x}", ValueError("junk"))
        assert free(folder) >= quarantine.reserve - 110_000  # at most the newest over it
    assert quarantine.usage.purged > 0 and quarantine.usage.files < 77
    roomy = Quarantine(tmp_path / "roomy", max_files=4096, max_bytes=256 << 20)
    for number in range(5):  # with room to spare nothing is purged
        junk = tmp_path / f"kept-{number}"
        junk.write_bytes(bytes(1000))
        roomy.put(junk, junk.name, f"{number:064x}", ValueError("junk"))
    assert roomy.usage.files == 5 and roomy.usage.purged == 0
