"""``sts-worker``: an RQ worker that keeps the models resident, and a status view for administrators.

::

    sts-worker                                  # queues interactive, preannotate, train (in that order)
    sts-worker --queues interactive             # a worker only for annotators (recommended on the GPU
                                                #   host next to one for preannotate,train: a whole-case
                                                #   job never makes an annotator wait)
    sts-worker --status [--json]                # queues, workers and their device, failed jobs

It runs ``rq.SimpleWorker``: jobs run in the worker process itself, never in a forked child, so the
model loaded once (on CUDA when available, else CPU) serves every job, and no CUDA context is forked.
At start it warms the model (``--no-warm`` to skip) so the first annotator does not wait for the load,
describes itself in Redis (``sts:worker:<name>``: device, host, models), and reaps the jobs of workers
that died on this host (same host name, process gone): those go back to their queue when they have
retries left, else to the FailedJobRegistry as ``AbandonedJobError``, at once instead of after RQ's
job-timeout-plus-60-s expiry. The scheduler runs beside it (``--no-scheduler`` to skip) so retries
with intervals happen.

Job time limits, result and failure TTLs are set per job by the enqueuer from ``core.queues``; this
worker's own default result TTL is ``DEFAULT_RESULT_TTL_S``. Environment: ``REDIS_URL``,
``STS_DATA_DIR`` (the case store, on a disk shared with the importer), ``LABEL_STUDIO_URL`` and
``LABEL_STUDIO_API_KEY`` (propagation writes predictions).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click
import redis

from core.errors import ProjectError
from core.queues import DEFAULT_RESULT_TTL_S, QUEUES_BY_PRIORITY
from core.redis_store import worker_info_key
from core.settings import Settings

log = logging.getLogger(__name__)

WORKER_INFO_TTL_S = 7 * 24 * 3600
"""``sts:worker:<name>`` outlives a crashed worker at most this long (a clean exit deletes it)."""
FAILED_JOBS_SHOWN = 20
PROCESS_STARTED = datetime.now(UTC)
"""When this module was imported, i.e. when the worker process started: an RQ worker registered
under our pid before then belongs to an earlier process (``_is_dead_local_worker``)."""


def detect_device() -> str:
    """``cuda:N`` when torch sees a GPU, else ``cpu`` (imports torch: call it in the worker only)."""
    import torch

    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def worker_name(device: str) -> str:
    """A unique, readable name that says where the worker runs: ``sts-<host>-<pid>-<device>``."""
    host = socket.gethostname().split(".")[0]
    return f"sts-{host}-{os.getpid()}-{device.replace(':', '')}"


def warm_model() -> dict[str, Any]:
    """Load LiteMedSAM and run it once on a synthetic slice; returns its version and the time taken."""
    import numpy as np

    from workers.segmentation import default_segmenter, segment_slice

    start = time.perf_counter()
    yy, xx = np.mgrid[:64, :64]
    image = (((yy - 32) ** 2 + (xx - 32) ** 2) < 12**2).astype(np.uint8) * 200 + 20
    segment_slice(image, box=(16, 16, 48, 48))
    segmenter = default_segmenter()
    return {"segmentation_model": str(segmenter.model.version), "box_shrinks_px": list(segmenter.box_shrinks),
            "box_threshold": segmenter.box_cut,
            "warm_s": round(time.perf_counter() - start, 2)}


def worker_switches() -> dict[str, bool | str]:
    """The ``STS_*`` switches the jobs will read, read once at start so that a typo stops the
    worker with a ``ConfigError`` naming the variable instead of failing every job later."""
    from workers.embedding_cache import EMBEDDING_CACHE_ENV, embedding_cache_budget_bytes
    from workers.jobs import warming_enabled
    from workers.models.litemedsam import cpu_bf16_enabled
    from workers.propagation import propagation_views
    from workers.segmentation import prompt_views_from_env, propagation_settings_from_env, warm_prompt_views_from_env
    from workers.slice_views import view_names

    prompt_views = prompt_views_from_env()
    warm_views = [view for view in warm_prompt_views_from_env() if view not in prompt_views]
    shared_cache = os.environ.get(EMBEDDING_CACHE_ENV)
    return {"embedding_cache": f"{shared_cache} ({embedding_cache_budget_bytes() / 1e9:g} GB)" if shared_cache
            else "memory only",
            "propagation_views": ",".join(view_names(propagation_views(propagation_settings_from_env()))) or "none",
            "prompt_views": ",".join(view_names(prompt_views)) or "none",
            "warm_prompt_views": ",".join(view_names(warm_views)) or "none",
            "warm_embeddings": warming_enabled(), "cpu_bf16": cpu_bf16_enabled()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_dead_local_worker(worker: Any, host: str) -> bool:
    """Whether a registered worker was a process of this host that no longer runs.

    A worker with our own pid is dead too when it registered before this process started: a container
    restarted after a crash gives its worker the same host name and pid (1) again, and RQ would refuse
    the new worker's name for the old one's lifetime (about 8 minutes), crash after crash.
    """
    if worker.hostname != host or not worker.pid:
        return False
    if worker.pid != os.getpid():
        return not _pid_alive(worker.pid)
    born = worker.birth_date
    if born is None:
        return False
    return (born if born.tzinfo else born.replace(tzinfo=UTC)) < PROCESS_STARTED


def reap_dead_local_workers(connection: redis.Redis) -> list[str]:
    """Hand back the jobs of workers on this host whose process is gone.

    RQ would notice them only when their started-registry entry expires (the job's time limit plus
    60 s for a ``SimpleWorker``: 16 minutes for a pre-annotation). A registered worker whose host name
    is ours and whose process no longer exists is dead for sure (``_is_dead_local_worker``); its
    started jobs are expired now and RQ's own cleanup applies (requeue when retries are left, else
    FailedJobRegistry, ``AbandonedJobError``).

    Returns:
        Ids of the jobs handed back.
    """
    from rq import Worker
    from rq.job import Job
    from rq.registry import StartedJobRegistry

    host = socket.gethostname()
    dead = [w for w in Worker.all(connection=connection) if _is_dead_local_worker(w, host)]
    reaped: list[str] = []
    for worker in dead:
        for queue_name in worker.queue_names():
            registry = StartedJobRegistry(queue_name, connection=connection)
            members = connection.zrange(registry.key, 0, -1)
            expired = {}
            for member in members:
                job_id = registry.parse_job_id(member)
                job = Job.fetch(job_id, connection=connection) if Job.exists(job_id, connection=connection) else None
                if job is not None and job.worker_name == worker.name:
                    expired[member] = 0
                    reaped.append(job_id)
            if expired:
                connection.zadd(registry.key, expired, xx=True)
                StartedJobRegistry(queue_name, connection=connection).cleanup(timestamp=1)
        log.warning("worker %s (pid %s on this host) is gone: handed back %s", worker.name, worker.pid,
                    ", ".join(reaped) or "no jobs")
        worker.register_death()
        connection.delete(worker_info_key(worker.name))
    return reaped


# ------------------------------------------------------------------------------------------- status


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _iso(value: Any) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="seconds") if isinstance(value, datetime) else None


def status_report(connection: redis.Redis, failed_limit: int = FAILED_JOBS_SHOWN) -> dict[str, Any]:
    """Queues, workers (with the device each one described) and recent failed jobs, JSON-safe."""
    from rq import Queue, Worker
    from rq.job import Job
    from rq.registry import FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

    names = list(QUEUES_BY_PRIORITY) + sorted({q.name for q in Queue.all(connection=connection)}
                                              - set(QUEUES_BY_PRIORITY))
    queues, failed = [], []
    for name in names:
        queue = Queue(name, connection=connection)
        failed_registry = FailedJobRegistry(name, connection=connection)
        queues.append({
            "name": name, "queued": len(queue),
            "started": StartedJobRegistry(name, connection=connection).count,
            "scheduled": ScheduledJobRegistry(name, connection=connection).count,
            "finished": FinishedJobRegistry(name, connection=connection).count,
            "failed": failed_registry.count,
        })
        for job_id in failed_registry.get_job_ids(0, failed_limit - 1, desc=True):
            job = Job.fetch(job_id, connection=connection) if Job.exists(job_id, connection=connection) else None
            if job is None:
                continue
            latest = job.latest_result()
            failed.append({
                "queue": name, "id": job.id, "function": job.func_name, "description": job.description,
                "ended_at": _iso(job.ended_at), "error": _last_line(latest.exc_string if latest else None),
                "retries_left": job.retries_left,
            })
    workers = []
    for worker in sorted(Worker.all(connection=connection), key=lambda w: w.name):
        info = {k.decode(): v.decode() for k, v in connection.hgetall(worker_info_key(worker.name)).items()}
        workers.append({
            "name": worker.name, "state": str(worker.get_state()), "queues": worker.queue_names(),
            "device": info.get("device", "?"), "host": worker.hostname, "pid": worker.pid,
            "current_job": worker.get_current_job_id(), "last_heartbeat": _iso(worker.last_heartbeat),
            "segmentation_model": info.get("segmentation_model"),
        })
    failed.sort(key=lambda f: f["ended_at"] or "", reverse=True)
    return {"queues": queues, "workers": workers, "failed_jobs": failed[:failed_limit]}


def format_status(report: dict[str, Any]) -> str:
    """The status report as text for a terminal."""
    out = ["Queues:"]
    out.append(f"  {'name':<14}{'queued':>8}{'started':>9}{'scheduled':>11}{'finished':>10}{'failed':>8}")
    for q in report["queues"]:
        out.append(f"  {q['name']:<14}{q['queued']:>8}{q['started']:>9}{q['scheduled']:>11}{q['finished']:>10}"
                   f"{q['failed']:>8}")
    out.append(f"Workers ({len(report['workers'])}):")
    for w in report["workers"]:
        job = f", job {w['current_job']}" if w["current_job"] else ""
        out.append(f"  {w['name']}  {w['state']}  device {w['device']}  queues {','.join(w['queues'])}{job}"
                   f"  (last heartbeat {w['last_heartbeat']})")
    if not report["workers"]:
        out.append("  none: start one with `sts-worker`")
    out.append(f"Failed jobs ({len(report['failed_jobs'])} most recent):")
    for f in report["failed_jobs"]:
        out.append(f"  [{f['queue']}] {f['id']}  {f['function']}  ended {f['ended_at']}")
        out.append(f"      {f['error'] or '(no error recorded)'}")
    if not report["failed_jobs"]:
        out.append("  none")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- run


def run_worker(connection: redis.Redis, queue_names: Sequence[str], *, name: str | None = None, warm: bool = True,
               scheduler: bool = True, burst: bool = False, max_jobs: int | None = None,
               log_level: str = "INFO") -> bool:
    """Start a ``SimpleWorker`` on ``queue_names`` (in priority order) and work until stopped.

    Returns:
        Whether any job was processed (RQ's ``work`` return value).
    """
    from rq import SimpleWorker

    switches = worker_switches()
    log.info("switches: %s", ", ".join(
        f"{k}={v if isinstance(v, str) else ('on' if v else 'off')}" for k, v in switches.items()))
    device = detect_device()
    name = name or worker_name(device)
    info: dict[str, Any] = {**switches, "device": device, "host": socket.gethostname(), "pid": os.getpid(),
                            "queues": ",".join(queue_names), "started_at": datetime.now(UTC).isoformat()}
    reaped = reap_dead_local_workers(connection)
    if reaped:
        log.warning("handed back %d job(s) of dead workers: %s", len(reaped), ", ".join(reaped))
    if warm:
        info.update(warm_model())
        log.info("model warm on %s: %s", device, info)
    key = worker_info_key(name)
    connection.hset(key, mapping={k: str(v) for k, v in info.items()})
    connection.expire(key, WORKER_INFO_TTL_S)
    worker = SimpleWorker(list(queue_names), connection=connection, name=name, default_result_ttl=DEFAULT_RESULT_TTL_S)
    try:
        return worker.work(burst=burst, with_scheduler=scheduler, max_jobs=max_jobs, logging_level=log_level)
    finally:
        connection.delete(key)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--redis-url", envvar="REDIS_URL", default=None, help="Redis of the queues [env REDIS_URL].")
@click.option("--queues", "queue_list", default=",".join(QUEUES_BY_PRIORITY), show_default=True,
              help="Comma-separated queues, highest priority first.")
@click.option("--name", default=None, help="Worker name (default sts-<host>-<pid>-<device>).")
@click.option("--warm/--no-warm", default=True, show_default=True, help="Load and run the model once at start.")
@click.option("--scheduler/--no-scheduler", default=True, show_default=True,
              help="Run RQ's scheduler beside the worker (needed for retries with intervals).")
@click.option("--burst", is_flag=True, help="Exit when the queues are empty.")
@click.option("--max-jobs", type=int, default=None, help="Exit after this many jobs.")
@click.option("--status", is_flag=True, help="Print queues, workers and failed jobs, then exit.")
@click.option("--json", "as_json", is_flag=True, help="With --status: machine-readable output.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(redis_url: str | None, queue_list: str, name: str | None, warm: bool, scheduler: bool, burst: bool,
         max_jobs: int | None, status: bool, as_json: bool, log_level: str) -> None:
    """Run an RQ worker for the segmentation jobs (models stay loaded), or show the queues' status."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        url = redis_url or Settings.from_env().redis_url
        connection = redis.Redis.from_url(url)
        try:
            connection.ping()
        except redis.RedisError as exc:
            raise ProjectError(f"Redis at {url.rsplit('@', 1)[-1]} is unreachable: {exc}") from exc
        if status:
            report = status_report(connection)
            click.echo(json.dumps(report, indent=2) if as_json else format_status(report))
            return
        queue_names = [q.strip() for q in queue_list.split(",") if q.strip()]
        if not queue_names:
            raise ProjectError("--queues: no queue named")
        run_worker(connection, queue_names, name=name, warm=warm, scheduler=scheduler, burst=burst,
                   max_jobs=max_jobs, log_level=log_level.upper())
    except ProjectError as exc:
        click.echo(f"{type(exc).__name__}: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
