"""``plada-send embed --engine ray`` on Ray's local instance (2 CPUs, one actor): the same
bytes as the local engine, a failed batch retried, a killed driver resumed, nothing
listening or connecting beyond loopback, and the typed errors. Each Ray instance costs
seconds to start on 2 cores, so one test runs the three instances in sequence."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest

from protocol.errors import ConfigError, ReferenceSetError
from protocol.reference.factory import ReferenceLocation
from sender.embedding.engine import EmbedSettings
from sender.embedding.ray_engine import ACTOR_ARGUMENTS_NOTICE
from sender.errors import EngineError, MissingExtraError
from tests.subprocess_cli import cli, cli_env, embed_args, wait_for
from tests.worlds import save_tiny_clip, write_reference_tree, write_shards
from trainer.faults import InjectedFault

if not os.environ.get("CI"):  # CI installs the extra: there a missing Ray must fail
    pytest.importorskip("ray")

BLOCKS, PER_BLOCK, PART_ROWS, BATCH = 12, 20, 16, 8  # embed_args' batches and parts
PARTS = BLOCKS * PER_BLOCK // PART_ROWS


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, small_pool) -> dict[str, Path]:
    """A JPEG tree, the same images as WebDataset shards, a tiny random-weight CLIP, and
    the local engine's merged embeddings of the tree (the reference result)."""
    from protocol.reference.image_folder import ImageFolderReference
    from sender.embedding.local import embed_reference
    from sender.embedding.store import merge_embeddings

    root = tmp_path_factory.mktemp("ray-world")
    write_reference_tree(small_pool, root / "tree", PER_BLOCK, BLOCKS)
    write_shards(root / "tree", root / "shards", per_shard=50)
    model, weights = save_tiny_clip(root)
    world = {"root": root, "config": root / f"{model}.json", "weights": Path(weights)}
    local = root / "emb-local"
    settings = EmbedSettings(
        str(world["config"]),
        weights,
        batch_size=BATCH,
        workers=0,
        part_rows=PART_ROWS,
        progress=False,
    )
    embed_reference(ImageFolderReference(root / "tree"), local, settings)
    merge_embeddings(local)
    return world | {"local": local}


def ray_embed(world, out: Path, *extra: str) -> list[str]:
    shards = "wds:" + str(world["root"] / "shards")
    return embed_args(world, shards, out, "--engine", "ray", "--ray-cpus", "2", *extra, workers=2)


def merged_bytes(out: Path) -> bytes:
    """The merged embeddings and thumbnails (merge itself runs in this process: its CLI is
    tested elsewhere)."""
    from sender.embedding.store import merge_embeddings

    merged = merge_embeddings(out)
    assert merged.thumbnails.size == 32, merged.thumbnails.describe()
    return (out / "embeddings.f16").read_bytes() + (out / "thumbnails.u8").read_bytes()


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


AUDIT_SITE = Path(__file__).parent / "connect_audit"


def audited_env(log: Path) -> dict[str, str]:
    """``cli_env`` under which every Python process records its connects and lookups."""
    env = cli_env()
    env["PYTHONPATH"] = f"{AUDIT_SITE}{os.pathsep}{env['PYTHONPATH']}"
    return env | {"PLADA_CONNECT_LOG": str(log)}


def outside_connections(log: Path) -> list[str]:
    """The recorded connects and lookups of anything but loopback (a lookup of no host
    at all, for a local bind, is none)."""
    outside = []
    for line in log.read_text().splitlines() if log.exists() else []:
        host = line.split("\t")[3]
        if host in ("localhost", "None", "") or (_is_ip(host) and _loopback(host)):
            continue
        outside.append(line)
    return outside


def _is_ip(text: str) -> bool:
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(text.split("%")[0])
        return True
    return False


def _gcs_speaks_grpc(watch: SocketWatch) -> bool:
    """Whether a port the instance's GCS listens on passes the check ``--address``
    makes of a cluster's head."""
    from sender.embedding.ray_engine import check_reachable

    for process in list(watch.tree):
        with contextlib.suppress(psutil.Error):
            if process.name() != "gcs_server":
                continue
            for c in process.net_connections(kind="inet"):
                if c.status != psutil.CONN_LISTEN:
                    continue
                with contextlib.suppress(EngineError):
                    check_reachable(f"127.0.0.1:{c.laddr.port}", timeout=5)
                    return True
    return False


class SocketWatch:
    """Every TCP/UDP endpoint that a process and its descendants hold, sampled while it
    runs (Ray's servers and workers are all descendants of a driver that started them)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.root = psutil.Process(proc.pid)
        self.tree: set[psutil.Process] = set()
        self.endpoints: set[tuple[str, str, str]] = set()  # (process, local ip, remote ip)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.tree |= {self.root, *self.root.children(recursive=True)}
            for process in list(self.tree):
                try:
                    name = process.name()
                    for c in process.net_connections(kind="inet"):
                        remote = c.raddr.ip if c.raddr else ""
                        self.endpoints.add((name, c.laddr.ip, remote))
                except psutil.Error:
                    continue
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def kill_leftovers(self) -> None:
        """SIGKILL what is left of the tree (Ray's agents outlive a SIGKILLed driver for
        a few minutes before they notice)."""
        for process in self.tree:
            with contextlib.suppress(psutil.Error):
                process.kill()


def test_killed_driver_a_failing_rerun_and_a_retried_batch_end_in_the_local_bytes(world):
    """Three runs into one directory, each Ray instance watched for sockets: a driver
    SIGKILLed mid-run keeps its parts; a rerun whose batches keep failing ends in a typed
    error and loses none; a rerun whose one batch fails once retries it and finishes with
    the local engine's bytes. Nothing listens or connects beyond loopback."""
    out = world["root"] / "emb-ray"
    parts = out / "parts"
    watches: list[SocketWatch] = []
    audit = world["root"] / "connects.log"

    def watched(env: dict[str, str], *extra: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            ray_embed(world, out, *extra),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        watches.append(SocketWatch(proc))
        return proc

    try:
        killed = watched(audited_env(audit))

        # on condition, not on a clock: a busy machine can take minutes to start Ray
        # (the cap only ends a run that would never write them; an exit ends the wait)
        def two_parts_or_exit() -> bool:
            return len(list(parts.glob("part-*.npz"))) >= 2 or killed.poll() is not None

        wait_for(two_parts_or_exit, 900, "two parts")
        assert _gcs_speaks_grpc(watches[0])  # what --address checks a head by
        assert killed.poll() is None, "embed finished before it could be killed"
        killed.send_signal(signal.SIGKILL)
        killed.communicate()
        kept = sorted(p.name for p in parts.glob("part-*.npz"))
        assert 2 <= len(kept) < PARTS, kept
        with pytest.raises(ReferenceSetError, match=f"{PARTS - len(kept)} of {PARTS} parts are"):
            merged_bytes(out)  # the coverage check names the gap

        # every worker's first batch fails, and no retry is allowed
        failing = watched(
            audited_env(audit) | {"PLADA_RAISE_AT": "embed-batch@1"}, "--retries", "0"
        )
        _, stderr = failing.communicate(timeout=600)
        assert failing.returncode == 2, stderr
        error = stderr.strip().splitlines()[-1]
        assert "EngineError: a Ray worker gave up on a batch after 1 tries" in error
        assert "InjectedFault: injected fault at embed-batch" in error
        assert "Traceback" not in stderr
        assert set(kept) <= {p.name for p in parts.glob("part-*.npz")}

        # the worker's second batch fails once: its call is retried, and the run finishes
        done = len(list(parts.glob("part-*.npz")))
        resumed = watched(audited_env(audit) | {"PLADA_RAISE_AT": "embed-batch@2"})
        stdout, stderr = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, stdout + stderr
        # Ray's C++ notice about Ray Data's own actor arguments is not shown (ray#53727)
        assert ACTOR_ARGUMENTS_NOTICE not in stderr and "core_worker.cc" not in stderr, stderr
    finally:
        for watch in watches:
            watch.stop()
            watch.kill_leftovers()
    assert "local Ray instance on 127.0.0.1 only" in stdout
    assert f"{done} already done, {PARTS - done} written" in stdout
    local = world["local"]
    assert merged_bytes(out) == (
        (local / "embeddings.f16").read_bytes() + (local / "thumbnails.u8").read_bytes()
    )
    endpoints = set().union(*(watch.endpoints for watch in watches))
    names = {name for name, _, _ in endpoints}
    assert "raylet" in names and "gcs_server" in names, names  # the watch saw Ray at work
    outside = {e for e in endpoints if not _loopback(e[1]) or (e[2] and not _loopback(e[2]))}
    assert not outside, outside
    # every connect and lookup of every Python process of the three instances, as it
    # happened (Ray's dashboard asks 169.254.169.254 unless plada stops it)
    recorded = audit.read_text().splitlines()
    assert any("dashboard.py" in line for line in recorded), recorded[:20]
    assert not outside_connections(audit), outside_connections(audit)[:20]


def test_engine_ray_without_the_extra_names_it(world, monkeypatch, capsys) -> None:
    from sender.cli import main

    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray -> ImportError
    for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.setenv(name, "")  # import_ray sets them: put them back afterwards
    status = main(ray_embed(world, world["root"] / "emb-no-ray")[len(cli("plada-send")) :])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "MissingExtraError" in err and "pip install 'plada[distributed]'" in err
    assert not (world["root"] / "emb-no-ray").exists()
    from sender.embedding.ray_engine import import_ray

    with pytest.raises(MissingExtraError):
        import_ray()


def test_a_worker_with_another_reference_set_is_refused(world) -> None:
    from sender.embedding.ray_engine import EmbedBatches

    with pytest.raises(ReferenceSetError, match="every node must hold the same reference set"):
        EmbedBatches(
            ReferenceLocation("wds:" + str(world["root"] / "shards"), str(world["root"] / "cache")),
            "00" * 32,
            EmbedSettings(str(world["config"]), str(world["weights"]), decode="pil", workers=1),
        )


def test_a_worker_batch_is_the_local_engines_batch(world, monkeypatch) -> None:
    """The actor's call embeds each range as one batch, with the manifest's keys."""
    from protocol.reference.image_folder import ImageFolderReference
    from sender.embedding.ray_engine import EmbedBatches
    from sender.embedding.store import StoreMeta, read_part
    from sender.embedding.thumbnails import read_thumbnail_part

    tree = ImageFolderReference(world["root"] / "tree")
    actor = EmbedBatches(
        ReferenceLocation(str(world["root"] / "tree")),
        tree.manifest.fingerprint_hex,
        EmbedSettings(str(world["config"]), str(world["weights"]), decode="pil", workers=2),
    )
    out = actor({"start": np.array([16, 24]), "stop": np.array([24, 32])})
    with monkeypatch.context() as patched:  # the fault the Ray tests inject fires here
        patched.setenv("PLADA_RAISE_AT", "embed-batch@2")
        with pytest.raises(InjectedFault):
            actor({"start": np.array([0, 8]), "stop": np.array([8, 16])})
    assert out["row"].tolist() == list(range(16, 32))
    assert out["key"].tolist() == list(tree.manifest.keys[16:32])
    part = read_part(world["local"], 1, StoreMeta.load(world["local"]))
    assert part is not None and np.array_equal(out["embedding"], part.embeddings)
    thumbnails = read_thumbnail_part(world["local"], 1)
    assert out["thumbnail"].shape == (16, 3, 32, 32)
    assert np.array_equal(out["thumbnail"], thumbnails)


def test_an_address_where_no_cluster_answers_is_a_typed_error(world, capsys) -> None:
    from sender.embedding.ray_engine import check_reachable

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(EngineError, match="nothing answers at the Ray cluster address"):
        check_reachable(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(EngineError):
        check_reachable(f"ray://127.0.0.1:{port}", timeout=2)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        check_reachable("no-port-here")


@contextlib.contextmanager
def _server(answer: bytes | None):
    """A TCP server on loopback that accepts and then says ``answer`` (None: nothing,
    ever); its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = listener.accept()
                held.append(conn)
                if answer is not None:
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def test_a_port_that_accepts_and_never_speaks_is_a_typed_error_before_anything_is_written(
    world,
) -> None:
    out = world["root"] / "emb-silent"
    with _server(None) as port:
        run = subprocess.run(
            ray_embed(world, out, "--address", f"127.0.0.1:{port}"),
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 2, run.stderr[-2000:]
    error = run.stderr.strip().splitlines()[-1]
    assert "EngineError" in error and "said nothing" in error and "Traceback" not in run.stderr
    assert not out.exists()  # no meta.json, manifest or parts/ for a cluster never joined
    from sender.embedding.ray_engine import check_reachable

    with (
        _server(b"HTTP/1.1 400 Bad Request\r\n\r\n") as port,
        pytest.raises(EngineError, match="is not a gRPC server"),
    ):
        check_reachable(f"127.0.0.1:{port}", timeout=2)
