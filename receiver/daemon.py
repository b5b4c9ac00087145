"""``plada-receive daemon``: unattended intake and training on the edge device.

Two threads share a daemon home (see the README for its layout):

- intake: rebuilds payloads from the frames in ``HOME/frames/``
  (:mod:`receiver.frames_inbox`), claims payload files from the inbox, verifies
  them and queues or quarantines them (:mod:`receiver.intake`), every
  ``poll_seconds``, also while a job trains;
- jobs (main thread): takes the oldest queued job, trains it with checkpoints
  (:mod:`receiver.job`), records the result, and goes on with the next one.

SIGTERM or SIGINT stops it cleanly: the running job saves a checkpoint and goes back
to the queue. SIGKILL or a power cut lose at most the steps since the last
checkpoint: on start the daemon requeues jobs whose owner died and adopts files
half-way through intake.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import PladaError
from protocol.payload import Payload
from protocol.reference.base import ReferenceSource
from protocol.reference.canonical import reference_availability
from protocol.reference.factory import ReferenceLocation
from protocol.shared_keys import read_link_key_file
from protocol.task_data import LabeledImages, load_labeled_images
from receiver.acceptance import read_received
from receiver.frames_inbox import FrameSettings, FramesInbox, transfer_of
from receiver.http_upload import HttpLimits, UploadServer, start_http
from receiver.intake import Intake, IntakeSettings
from receiver.job import JobControl, JobSettings, check_holdout, run_job
from receiver.job_queue import Job, JobQueue
from receiver.job_report import JobReport
from receiver.ledger import open_home_ledger
from receiver.logs import setup_logging
from receiver.reply_outbox import ReplyOutbox
from receiver.status import HEALTH_FILE, QUEUE_FILE, HealthFile, collect_status
from receiver.workers import WorkerLock
from trainer.faults import crash_point
from trainer.training import StepReport, TrainingInterrupted

log = logging.getLogger("plada.receiver")
PROGRESS_RECORD_SECONDS = 10.0


@dataclass
class DaemonConfig:
    """Where the daemon keeps its state, what it watches, and how it trains."""

    home: str
    reference: ReferenceLocation = field(default_factory=ReferenceLocation)
    inbox: str | None = None
    holdout: str | None = None
    settings: JobSettings = field(default_factory=JobSettings)
    http_port: int = 0
    http: HttpLimits = field(default_factory=HttpLimits)
    poll_seconds: float = 1.0
    intake: IntakeSettings = field(default_factory=IntakeSettings)  # with the trust store
    exit_when_idle: bool = False
    max_restarts: int = 3
    accept_empty_ledger: bool = False
    reply_outbox: str | None = None  # where replies for the uplink go; none without it
    reply_progress_seconds: float = 30.0
    link_key: str | None = None  # the link key file: only frames tagged with it are taken


def _reply_outcome(replies: ReplyOutbox, name: str, queued: bool) -> None:
    """A file the intake took in or refused: a reply if it came as frames."""
    transfer = transfer_of(name)
    if transfer is not None:
        replies.outcome(transfer, queued)


def _folder_name(job: Job) -> str:
    task = re.sub(r"[^A-Za-z0-9._-]+", "-", job.task).strip("-")[:40] or "task"
    return f"{job.id:05d}-{task}"


class Daemon:
    """One daemon process: an intake thread and a job loop."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.home = Path(config.home)
        self.inbox = Path(config.inbox) if config.inbox else self.home / "inbox"
        self.results = self.home / "results"
        self.stop = threading.Event()
        self.home.mkdir(parents=True, exist_ok=True)
        self.results.mkdir(exist_ok=True)
        setup_logging(self.home / "logs" / "daemon.jsonl")
        self.worker = WorkerLock(self.home)
        self.queue = JobQueue(self.home / QUEUE_FILE, check=True)
        self.health = HealthFile(
            self.home / HEALTH_FILE,
            owner=self.worker.owner,
            state="starting",
            inbox=str(self.inbox),
        )
        self.intake: Intake | None = None
        self.frames: FramesInbox | None = None
        self._intake_error: str | None = None
        self._intake_passes = 0  # completed intake passes
        self._intake_idle = False  # whether the last one found nothing to take in

    # --- intake thread -------------------------------------------------------------
    def _intake_loop(self) -> None:
        assert self.intake is not None and self.frames is not None
        while not self.stop.is_set():
            try:  # a fault in the frames inbox must not stop payload intake
                framed = self.frames.poll()
            except Exception:
                framed = 0
                log.exception("frames pass failed", extra={"event": "frames-error"})
            try:
                processed = framed + self.intake.poll()
                # judged by this thread, the only one that moves this daemon's files
                self._intake_idle = (
                    processed == 0 and self.intake.waiting() == 0 and self.frames.waiting() == 0
                )
                self._intake_error = None
            except Exception as exc:  # keep serving; the log has the traceback
                self._intake_idle = False
                self._intake_error = f"{type(exc).__name__}: {exc}"
                log.exception("intake pass failed", extra={"event": "intake-error"})
            self._intake_passes += 1
            try:
                counts = self.intake.queue.counts()
            except PladaError:  # a damaged queue: reported by the pass above, next time too
                counts = None
            self.health.update(
                intake=self.intake.report(),
                intake_error=self._intake_error,
                intake_passes=self._intake_passes,
                intake_pass_at=time.time(),
                intake_poll_seconds=self.config.poll_seconds,
                queue=counts,
                frames=dict(self.frames.stats),
                transfers=self.frames.report()[:20],
            )
            self.stop.wait(self.config.poll_seconds)

    # --- one job -------------------------------------------------------------------
    def _progress(self, job: Job):
        last_record = [time.monotonic()]

        def on_step(seed: int, report: StepReport) -> None:
            left = report.total_steps - report.step
            trained = report.step - report.resumed_from
            elapsed = time.monotonic() - started
            eta = left * elapsed / trained if trained else None
            self.health.update(
                state="training",
                current={
                    "job": job.id,
                    "task": job.task,
                    "seed": seed,
                    "step": report.step,
                    "total_steps": report.total_steps,
                    "epoch": report.epoch,
                    "loss": report.loss,
                    "images_per_second": report.images_per_second,
                    "eta_seconds": eta,
                    "resumed_from": report.resumed_from,
                },
            )
            if time.monotonic() - last_record[0] >= PROGRESS_RECORD_SECONDS:
                self.queue.progress(job.id, self.worker.owner, report.step)
                last_record[0] = time.monotonic()

        started = time.monotonic()
        return on_step

    def run_one(self, job: Job, reference: ReferenceSource, holdout: LabeledImages | None) -> None:
        """Train one claimed job and record how it ended."""
        out = self.results / _folder_name(job)
        owner = self.worker.owner
        log.info(
            f"job {job.id} started: {job.task}, {job.images} images"
            + (f" (claim {job.claims}, resuming)" if job.claims > 1 else ""),
            extra={"event": "job-started", "job": job.id, "claim": job.claims},
        )
        self.health.update(force=True, state="training", current=None)
        crash_point("job-claimed")
        control = JobControl(should_stop=self.stop.is_set, on_step=self._progress(job))
        try:
            report = self._train(job, reference, holdout, out, control)
        except TrainingInterrupted as stopped:
            self.queue.release(job.id, owner)
            log.info(
                f"job {job.id} paused at step {stopped.step}; back in the queue",
                extra={"event": "job-paused", "job": job.id, "step": stopped.step},
            )
            return
        except PladaError as exc:
            self.queue.fail(job.id, owner, f"{type(exc).__name__}: {exc}")
            log.error(
                f"job {job.id} failed: {type(exc).__name__}: {exc}",
                extra={"event": "job-failed", "job": job.id, "error": type(exc).__name__},
            )
            return
        except Exception as exc:  # a bug or a device error must not stop the daemon
            self.queue.fail(job.id, owner, f"internal error {type(exc).__name__}: {exc}")
            log.exception(
                f"job {job.id} failed with an internal error",
                extra={"event": "job-failed", "job": job.id},
            )
            return
        crash_point("job-published")
        self._finished(job, report, out)

    def _train(
        self,
        job: Job,
        reference: ReferenceSource,
        holdout: LabeledImages | None,
        out: Path,
        control: JobControl,
    ) -> JobReport:
        """The job's spooled payload, accepted again (its signature under the keys trusted
        now; freshness was checked at intake) with the holdout checked against it, then
        trained (the model is built once, by the training itself)."""
        assert self.intake is not None
        spooled = read_received(self.home / job.payload, self.intake.settings.max_bytes)

        def fits_the_holdout(payload: Payload) -> None:
            if holdout is not None:
                check_holdout(holdout, payload, reference)

        accepted = self.intake.acceptance.examine(spooled, known=True, check=fits_the_holdout)
        return run_job(accepted, reference, out, self.config.settings, holdout, False, control)

    def _finished(self, job: Job, report: JobReport, out: Path) -> None:
        """Record a finished job in the queue, the log and the health file."""
        owner = self.worker.owner
        self.queue.progress(job.id, owner, max(run.steps for run in report.runs))
        self.queue.finish(job.id, owner, str(out.relative_to(self.home)))
        accuracy = report.accuracy_mean
        shown = "" if accuracy is None else f", holdout accuracy {accuracy:.4f}"
        rate = sum(r.images_per_second for r in report.runs) / len(report.runs)
        log.info(
            f"job {job.id} done in {report.training_seconds:.1f}s training "
            f"({rate:.0f} img/s){shown}: {out}",
            extra={
                "event": "job-done",
                "job": job.id,
                "accuracy": accuracy,
                "training_seconds": report.training_seconds,
                "images_per_second": rate,
                "result": str(out),
            },
        )
        self.health.update(
            force=True,
            current=None,
            last_job={
                "job": job.id,
                "task": job.task,
                "accuracy": accuracy,
                "result": str(out),
                "images_per_second": rate,
                "finished": time.time(),
            },
        )

    # --- main loop -----------------------------------------------------------------
    def _recover(self) -> None:
        for job in self.queue.recover(self.worker.alive, self.config.max_restarts):
            if job.state == "failed":
                log.error(
                    f"job {job.id} failed: {job.error}",
                    extra={"event": "job-failed", "job": job.id},
                )
            else:
                log.warning(
                    f"job {job.id} was running in a daemon that stopped; requeued",
                    extra={"event": "job-requeued", "job": job.id, "restarts": job.restarts},
                )

    def _intake_settled(self) -> bool:
        """Wait for an intake pass that starts after now; True if it found nothing to take in.

        Everything that pass (or an earlier one) took in is queued by the time it ends.
        """
        target = self._intake_passes + 2  # the pass under way may have started earlier
        while self._intake_passes < target and not self.stop.is_set():
            time.sleep(0.01)
        return self._intake_idle

    def run(self) -> int:
        """Serve until stopped; returns the exit status."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop.set())
        log.info(
            f"daemon {self.worker.owner} starting in {self.home}",
            extra={"event": "daemon-start", "owner": self.worker.owner},
        )
        reference, holdout = self._open_reference()
        server = self._open_intake(reference)
        intake_thread = threading.Thread(target=self._intake_loop, name="plada-intake")
        intake_thread.start()
        try:
            self._serve(reference, holdout)
        finally:
            self.stop.set()
            intake_thread.join()
            if server is not None:
                server.shutdown()
            self.health.update(force=True, state="stopped", current=None)
            log.info("daemon stopped", extra={"event": "daemon-stop"})
            self.worker.release()
        return 0

    def _open_reference(self) -> tuple[ReferenceSource, LabeledImages | None]:
        """The local reference set and the holdout every job is evaluated on."""
        reference = self.config.reference.open()
        holdout = None
        if self.config.holdout:
            holdout = load_labeled_images(
                self.config.holdout, reference.image_size, reference.in_channels
            )
        summary = reference.manifest.summary()
        availability = reference_availability(reference)
        if availability is not None:  # a partial copy: how much of the canonical set it holds
            summary["present"] = availability.count
        self.health.update(force=True, reference=summary)
        return reference, holdout

    def _open_intake(self, reference: ReferenceSource) -> UploadServer | None:
        """The ledger, the reply outbox, the HTTP endpoint, the intake and the frames
        inbox, before any thread starts (a busy port ends the process at once, exit 2)."""
        config = self.config
        ledger = open_home_ledger(
            self.home,
            self.queue.signed_history(),
            has_history=_has_history(self.home),
            accept_empty=config.accept_empty_ledger,
        )
        link_key = read_link_key_file(config.link_key) if config.link_key else None
        replies = None  # the reply key is read (or made) before any thread starts
        if config.reply_outbox:
            replies = ReplyOutbox(
                self.home,
                Path(config.reply_outbox),
                progress_seconds=config.reply_progress_seconds,
            )
        server = self._start_http() if config.http_port else None
        queue = JobQueue(self.home / QUEUE_FILE)
        self.intake = Intake(
            self.home,
            self.inbox,
            reference.manifest,
            queue,
            ledger,
            self.worker,
            config.intake,
            reference_availability(reference),
        )
        if replies is not None:
            self.intake.on_outcome = lambda name, queued: _reply_outcome(replies, name, queued)
        frame_settings = FrameSettings(max_payload_bytes=config.intake.max_bytes)
        self.frames = FramesInbox(self.home, self.inbox, frame_settings, replies, link_key)
        return server

    def _start_http(self) -> UploadServer:
        config = self.config
        self.inbox.mkdir(parents=True, exist_ok=True)  # uploads land there at once
        server = start_http(
            config.http_port,
            self.inbox,
            self.home,
            config.intake.max_bytes,
            lambda: collect_status(self.home),
            config.http,
        )
        log.info(
            f"accepting uploads on http://127.0.0.1:{config.http_port}/payloads "
            f"(token in {server.token_file})",
            extra={"event": "http-start", "port": config.http_port},
        )
        return server

    def _serve(self, reference: ReferenceSource, holdout: LabeledImages | None) -> None:
        """Train queued jobs one after another until stopped (or idle, if asked)."""
        config = self.config
        while not self.stop.is_set():
            self._recover()
            job = self.queue.claim(self.worker.owner)
            if job is not None:
                self.run_one(job, reference, holdout)
                continue
            idle = config.exit_when_idle and self._intake_settled()
            if idle and self.queue.counts()["queued"] == 0:
                log.info("queue and inbox empty; exiting", extra={"event": "daemon-idle"})
                break
            self.health.update(state="idle", current=None)
            self.stop.wait(config.poll_seconds)


def _has_history(home: Path) -> bool:
    """Whether this home has taken payloads in before (spooled payloads or results)."""
    return any(
        folder.is_dir() and any(folder.iterdir())
        for folder in (home / "spool", home / "results", home / "quarantine")
    )


def run_daemon(config: DaemonConfig) -> int:
    """Run a daemon until SIGTERM/SIGINT (or until idle with ``exit_when_idle``)."""
    return Daemon(config).run()
