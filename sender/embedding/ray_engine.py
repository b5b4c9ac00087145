"""``plada-send embed --engine ray``: the same parts, embedded by a Ray Data actor pool.

What runs where:

- the **driver** (this process) opens the reference set and the embeddings directory
  exactly as the local engine does (:func:`sender.embedding.engine.open_embedding_dir`),
  lists the batches of the parts still to do (:meth:`EmbedPlan.batches`: the same row
  ranges the local engine embeds, so the numbers come out the same), and writes each
  part as soon as all its rows are back (:class:`sender.embedding.engine.PartCollector`);
- each **actor** (one per GPU, or one per node's CPUs) opens the reference set from the
  same spec on its own node, checks its fingerprint, loads the CLIP model once, and per
  batch reads, decodes and embeds the rows with the code the local engine uses, returning
  rows, keys, fp16 embeddings and problems.

Only part files cross to disk, so ``merge``, resuming and the coverage check work as for
the local engine; a rerun after a killed driver embeds only the parts that are missing.
A batch whose worker raises is retried (``--retries``); one that keeps failing stops the
run with the finished parts kept.

Without ``--address`` a private Ray instance starts on this machine, bound to 127.0.0.1
only, with the dashboard off; usage-stats reporting is always off.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from protocol.errors import ConfigError, ReferenceSetError
from protocol.reference.factory import ReferenceLocation
from sender.embedding import engine
from sender.embedding.embedders import OpenClipEmbedder
from sender.embedding.native_stderr import dropping_native_lines
from sender.errors import EngineError, MissingExtraError
from trainer.faults import raise_point

EXTRA = "distributed"
BATCHES_PER_CALL = 4  # an actor decodes the later batches of a call while it embeds the first
# the core worker's line about Ray Data's own actor arguments (see native_stderr)
ACTOR_ARGUMENTS_NOTICE = "has constructor arguments in the object store"


# Ray's head asks cloud metadata services which cloud it runs on even with usage stats
# off (its dashboard process, for the usage report's cluster config: 169.254.169.254
# and metadata.google.internal), and its TPU detection asks the GCE metadata server.
# Every such lookup goes through HTTP proxies taken from the environment (requests,
# urllib); a proxy on a closed loopback port makes each fail at once, on 127.0.0.1,
# while gRPC and HTTP between the instance's own processes on loopback go direct.
NO_OUTSIDE_LOOKUPS = {
    name: value
    for names, value in (
        (("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"), "http://127.0.0.1:9"),
        (("NO_PROXY", "no_proxy"), "127.0.0.1,localhost,::1"),
    )
    for name in names
}


def import_ray(loopback: bool = False) -> Any:
    """The ``ray`` module with Ray Data, usage stats off; a typed error naming the extra.

    ``loopback``: for a local instance, turn on Ray's single-machine switch, under which
    every server of the instance listens on 127.0.0.1 instead of the machine's address.
    Ray reads it when it is first imported, so this must come before any ``import ray``.
    """
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if loopback:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    elif "ray" not in sys.modules:
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise MissingExtraError(
            f"--engine ray needs Ray Data, which is not installed ({exc}): "
            f"pip install 'plada[{EXTRA}]' (on every machine of the cluster)"
        ) from exc
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where to run and how big the actor pool is; None picks a default from the cluster."""

    address: str | None = None  # an existing cluster (ray://... or host:port); None: local
    actors: int | None = None
    actor_cpus: float | None = None
    actor_gpus: float | None = None
    local_cpus: int | None = None  # CPUs of the local instance (default: all)
    retries: int = 3  # tries of a failed batch after the first

    def __post_init__(self) -> None:
        for name in ("actors", "actor_cpus", "local_cpus"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.actor_gpus is not None and self.actor_gpus < 0:
            raise ConfigError("--actor-gpus must be >= 0")
        if self.retries < 0:
            raise ConfigError("--retries must be >= 0")


def start_ray(ray: Any, options: RayOptions, device: str) -> str:
    """Join the cluster at ``options.address`` or start a loopback-only local instance;
    return a line saying which."""
    if options.address:
        try:
            ray.init(address=options.address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise EngineError(
                f"cannot join the Ray cluster at {options.address} ({exc}): check the "
                "address ('ray status' on the head node prints it)"
            ) from exc
        where = f"joined the Ray cluster at {options.address}"
    else:
        from ray._private import ray_constants

        if ray_constants.ENABLE_RAY_CLUSTER:  # imported before import_ray(loopback=True)
            raise EngineError(
                "Ray was imported before plada could bind its local instance to 127.0.0.1: "
                "run 'plada-send embed --engine ray' in a fresh process"
            )
        gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
        os.environ.update(NO_OUTSIDE_LOOKUPS)  # the instance's processes inherit it
        ray.init(
            address="local",
            num_cpus=options.local_cpus or os.cpu_count() or 1,
            num_gpus=gpus,
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            logging_level=logging.ERROR,  # not the notice that token auth is on (loopback)
            # no idle workers started ahead: the actors need their own, and on a small
            # machine the idle ones only slow the start (about 3 s of 17 on 2 cores)
            _system_config={"prestart_worker_first_driver": False, "enable_worker_prestart": False},
        )
        where = (
            "started a local Ray instance on 127.0.0.1 only (dashboard off, no metadata lookups)"
        )
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    hint = "" if options.address else "; pass --address HOST:PORT to join a cluster"
    return f"{where}: {cpus:g} CPUs, {gpus:g} GPUs{hint}"


# an HTTP/2 client's connection preface and an empty SETTINGS frame (RFC 9113, 3.4): a
# gRPC server (Ray's GCS, its client server) answers with a SETTINGS frame of its own
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with a typed error, unless a gRPC server answers at a cluster address:
    Ray itself keeps retrying an unreachable head for minutes, and waits as long on a
    port that accepts connections and never speaks."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address must look like HOST:PORT or ray://HOST:PORT, not {address!r}")
    fix = (
        "start the head with 'ray start --head' or check --address ('ray status' on the "
        "head prints it)"
    )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.sendall(HTTP2_PREFACE)
            answer = _read_at_most(sock, 9, time.monotonic() + timeout)
    except OSError as exc:
        raise EngineError(
            f"nothing answers at the Ray cluster address {address} ({exc}): {fix}"
        ) from exc
    if len(answer) < 9 or answer[3] != HTTP2_SETTINGS:
        said = "said nothing" if not answer else "is not a gRPC server"
        raise EngineError(
            f"the service at the Ray cluster address {address} {said} within {timeout:g} s "
            f"(a Ray head answers at once): {fix}"
        )


def _read_at_most(sock: socket.socket, count: int, deadline: float) -> bytes:
    """Up to ``count`` bytes from ``sock``, whatever has come by ``deadline``."""
    data = b""
    while len(data) < count and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(count - len(data))
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


def actor_pool(ray: Any, options: RayOptions, device: str) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor): one actor per GPU (with its share of
    the CPUs) on CUDA, else one per node's worth of CPUs."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    on_cuda = device.startswith("cuda")
    actor_gpus = options.actor_gpus if options.actor_gpus is not None else float(on_cuda)
    if actor_gpus > 0 and actor_gpus > gpus:
        raise EngineError(
            f"each actor needs {actor_gpus:g} GPUs but the cluster has {gpus:g}: "
            "lower --actor-gpus or add GPU nodes"
        )
    if actor_gpus > 0:
        actors = options.actors or max(1, int(gpus // actor_gpus))
        actor_cpus = options.actor_cpus or max(1.0, float(cpus // max(1, int(gpus))))
    else:
        node_cpus = max(
            (node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]),
            default=cpus,
        )
        actor_cpus = options.actor_cpus or node_cpus
        actors = options.actors or max(1, int(cpus // actor_cpus))
    if actor_cpus * actors > cpus:
        raise EngineError(
            f"{actors} actors of {actor_cpus:g} CPUs need more than the cluster's {cpus:g} "
            "CPUs: lower --actors or --actor-cpus"
        )
    return actors, actor_cpus, actor_gpus


class EmbedBatches:
    """A Ray Data actor: one reference reader and one CLIP model, many batches."""

    def __init__(
        self, reference: ReferenceLocation, fingerprint: str, settings: engine.EmbedSettings
    ) -> None:
        self.reference = reference.open()
        found = self.reference.manifest.fingerprint_hex
        if found != fingerprint:
            raise ReferenceSetError(
                f"the reference set {reference.spec} on this worker has fingerprint "
                f"{found[:16]}..., the driver's has {fingerprint[:16]}...: every node must "
                "hold the same reference set at the same path"
            )
        self.embedder = OpenClipEmbedder(settings.model, settings.weights, settings.device)
        self.decoding = engine.BatchDecoding(self.embedder, settings.decode, settings.thumbnails)
        threads = max(1, settings.workers)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="plada-decode")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed each [start, stop) range of ``batch`` as one forward pass; all rows back
        in one table (so a retried call can never deliver half its rows twice)."""
        ranges = list(zip(batch["start"].tolist(), batch["stop"].tolist(), strict=True))
        loading = [self._submit(start, stop) for start, stop in ranges]
        columns = ("row", "key", "embedding", "thumbnail", "problem", "kind")
        out: dict[str, list[np.ndarray]] = {k: [] for k in columns}
        for (start, stop), futures in zip(ranges, loading, strict=True):
            images, problems, kinds = self._gather(start, stop, futures)
            raise_point("embed-batch")
            rows = np.arange(start, stop, dtype=np.int64)
            out["row"].append(rows)
            out["key"].append(np.asarray(self.reference.manifest.keys[start:stop], dtype=str))
            embeddings, thumbnails = self.decoding.embed(images)
            out["embedding"].append(embeddings)
            out["thumbnail"].append(  # a placeholder byte per row when there are none
                np.zeros((stop - start, 1), np.uint8) if thumbnails is None else thumbnails
            )
            out["problem"].append(np.asarray(problems, dtype=str))
            out["kind"].append(np.asarray(kinds, dtype=str))
        return {k: np.concatenate(v) for k, v in out.items()}

    def _submit(self, start: int, stop: int) -> list[Any]:
        if self.decoding.prepare is None:
            rows = np.arange(start, stop, dtype=np.int64)
            images = self.decoding.images(self.reference, rows)
            return [self.pool.submit(images.__getitem__, i) for i in range(stop - start)]
        return [self.pool.submit(self.reference.try_read_bytes, r) for r in range(start, stop)]

    def _gather(self, start: int, stop: int, futures: list[Any]):
        results = [f.result() for f in futures]
        if self.decoding.prepare is None:
            images = torch.stack([image for image, _, _, _ in results])
            return images, [p for _, _, p, _ in results], [k for _, _, _, k in results]
        encoded, problems = [d for d, _ in results], [p for _, p in results]
        keys = list(self.reference.manifest.keys[start:stop])
        return self.decoding.encoded(encoded, problems, keys)


class RayEngine:
    """The engine of a Ray actor pool: a loopback-only local instance, or the cluster of
    ``options.address``; ``say`` gets its one-line notes (which cluster, how many actors)."""

    def __init__(self, options: RayOptions | None = None, say: engine.Say = print) -> None:
        self.options, self.say = options or RayOptions(), say

    def embed(self, job: engine.EmbedJob) -> engine.EmbedSummary:
        """Embed the parts of the job's shard not done yet on a Ray actor pool (see the
        module docstring); the result is the local engine's, part for part."""
        options, settings, say = self.options, job.settings, self.say
        ray = import_ray(loopback=not options.address)
        if options.address:
            check_reachable(options.address)  # before anything is opened or written
        source = engine.open_reference_set(job.reference, say)
        embedder = OpenClipEmbedder(settings.model, settings.weights, "cpu")  # weights checked
        plan = engine.open_embedding_dir(source, job.out_dir, embedder, settings)
        del embedder
        batches = plan.batches(settings.batch_size)
        collector = engine.PartCollector(plan)  # the run's clock starts here
        if batches:
            say(start_ray(ray, options, settings.device))
            try:
                with dropping_native_lines(ACTOR_ARGUMENTS_NOTICE):
                    pool = actor_pool(ray, options, settings.device)
                    resumed = len(plan.mine) - len(plan.pending)
                    say(
                        f"{pool[0]} actor(s) of {pool[1]:g} CPUs and {pool[2]:g} GPUs; "
                        f"{len(plan.pending)} of {len(plan.mine)} parts to embed "
                        f"({resumed} done)"
                    )
                    worker = _WorkerSetup(job.reference, plan.meta.reference_fingerprint, settings)
                    _collect(ray, batches, worker, pool, collector, options, source.manifest.keys)
            finally:
                ray.shutdown()
        return collector.summary()


@dataclass(frozen=True)
class _WorkerSetup:
    """What every actor is built from, with its paths made absolute (workers do not share
    the driver's working directory)."""

    reference: ReferenceLocation
    fingerprint: str
    settings: engine.EmbedSettings

    def constructor(self) -> dict[str, object]:
        settings = replace(
            self.settings,
            model=_absolute_if_file(self.settings.model),
            weights=_absolute_if_file(self.settings.weights),
        )
        return {
            "reference": self.reference.absolute(),
            "fingerprint": self.fingerprint,
            "settings": settings,
        }


def _collect(
    ray: Any,
    batches: list[tuple[int, int]],
    worker: _WorkerSetup,
    pool: tuple[int, float, float],
    collector: engine.PartCollector,
    options: RayOptions,
    keys: tuple[str, ...],
) -> None:
    """Run the pool over ``batches`` and hand every embedded batch to ``collector``."""
    settings = worker.settings
    shard = settings.shard
    rows = sum(stop - start for start, stop in batches)
    bar = engine.progress_bar(rows, f"embedding {shard[0]}/{shard[1]} on ray", settings.progress)
    for out in _run_pool(ray, batches, worker.constructor(), options, *pool):
        _check_keys(out, keys, worker.reference.spec)
        thumbnails = out["thumbnail"] if settings.thumbnails else None
        embedded = (out["embedding"], thumbnails)
        collector.add(out["row"], embedded, out["problem"].tolist(), out["kind"].tolist())
        bar.update(len(out["row"]))
    bar.close()


def _absolute_if_file(text: str) -> str:
    """A path that exists here, made absolute; anything else (a model name, a tag) as is."""
    return os.path.abspath(text) if os.path.exists(text) else text


def _run_pool(
    ray: Any,
    batches: list[tuple[int, int]],
    constructor: dict[str, object],
    options: RayOptions,
    actors: int,
    actor_cpus: float,
    actor_gpus: float,
) -> Iterator[dict[str, np.ndarray]]:
    """The embedded batches as the actor pool returns them (in any order)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # the one bar is plada's, as in the local engine
    # a batch whose code raises is tried again on its worker, at most --retries times (a
    # worker process that dies is restarted by Ray and its batches rerun elsewhere)
    context.retried_map_errors = True
    context.max_map_retries = options.retries
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # not "progress bars disabled"
    ranges = ray.data.from_items(
        [{"start": start, "stop": stop} for start, stop in batches],
        override_num_blocks=min(len(batches), max(1, 8 * actors)),
    )
    embedded = ranges.map_batches(
        EmbedBatches,
        fn_constructor_kwargs=constructor,
        batch_size=BATCHES_PER_CALL,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus,
        num_gpus=actor_gpus,
    )
    try:
        yield from embedded.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.RayError as exc:
        raise EngineError(
            f"a Ray worker gave up on a batch after {options.retries + 1} tries: "
            f"{_root_cause(exc)}; the finished parts are kept: rerun the same command"
        ) from exc


_RAISED = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Fault)): (.+)$")


def _root_cause(exc: BaseException) -> str:
    """The worker's own error as one line. Ray passes it back only as the text of its
    traceback, inside its own wrappers; the first raised line not of Ray's is it."""
    text = str(exc)
    for line in text.splitlines():
        found = _RAISED.match(line.strip())
        if found and not line.strip().startswith("ray."):
            return f"{found.group(1)}: {found.group(2)}"
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}"


def _check_keys(out: dict[str, np.ndarray], keys: tuple[str, ...], spec: str) -> None:
    """Coverage: each returned row must carry the driver's manifest key for that row."""
    for row, key in zip(out["row"].tolist(), out["key"].tolist(), strict=True):
        if keys[row] != key:
            raise ReferenceSetError(
                f"a worker's reference set {spec} has {key!r} at row {row}, the manifest "
                f"has {keys[row]!r}: every node must hold the same reference set"
            )
