"""Enqueueing jobs by dotted name (``core.queues``) and waiting for an interactive result with a deadline.

The backend never imports ``workers``: it names job functions, gives them concrete arguments
(ids, pixels), and reads results from Redis. Two Redis clients are used: one with a short socket
timeout for ordinary calls (a dead Redis is reported within seconds, as a 503) and one whose socket
timeout outlasts the interactive deadline, for the blocking read of a job's result stream.

Retry policies live here because the enqueuer chooses them (RQ stores them on the job); intervals
need a worker started with the scheduler (``sts-worker`` starts it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry, Worker
from rq.exceptions import DuplicateJobError
from rq.job import Job, JobStatus
from rq.results import Result

from backend.errors import QueueUnavailableError, WorkerFailedError, WorkerTimeoutError
from core.queues import (
    DEFAULT_FAILURE_TTL_S,
    DEFAULT_INTERACTIVE_TIMEOUT_S,
    DEFAULT_PREANNOTATE_TIMEOUT_S,
    DEFAULT_RESULT_TTL_S,
    INTERACTIVE_QUEUE,
    PREANNOTATE_CASE_JOB,
    PREANNOTATE_QUEUE,
    PROPAGATE_ANNOTATION_JOB,
    SEGMENT_INTERACTIVE_JOB,
)
from core.redis_store import LATEST_PROPAGATION_TTL_S, latest_propagation_key, preannotate_job_id

log = logging.getLogger(__name__)

PREANNOTATE_RETRY = Retry(max=2, interval=[30, 120])
"""A whole-case job that raised is tried twice more, 30 s and 2 min later."""
PROPAGATE_RETRY = Retry(max=3, interval=[5, 30, 120])
"""Propagation writes to Label Studio: retried for transient HTTP failures."""

INPUT_ERROR_TYPES = frozenset({
    "InputError", "SeriesError", "GeometryError", "ContourError", "AnnotationError", "BrushDecodeError",
})
"""Exception names (``core.errors``) that mean the worker rejected the input: answered as 422, not 502."""

_RESULT_WAIT_SLACK_S = 5.0


def connect_redis(url: str, socket_timeout_s: float | None) -> redis.Redis:
    """A client that fails fast when Redis is down (one immediate retry, no backoff) and reconnects by
    itself when it is back."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=min(socket_timeout_s or 2.0, 2.0),
        socket_timeout=socket_timeout_s,
        retry=RedisRetry(NoBackoff(), 1),
        health_check_interval=30,
    )


def describe_redis(connection: redis.Redis) -> str:
    """``host:port/db`` of a client, without its password."""
    kwargs = connection.connection_pool.connection_kwargs
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


@contextlib.contextmanager
def redis_guard(connection: redis.Redis) -> Iterator[None]:
    """Turn Redis connection failures into ``QueueUnavailableError`` (503) that names the server."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise QueueUnavailableError(f"Redis at {describe_redis(connection)} is unreachable: {exc}") from exc


@dataclass
class JobQueues:
    """The backend's side of the queues.

    Args:
        connection: client for ordinary calls (short socket timeout).
        wait_connection: client for blocking result reads (socket timeout above the longest wait).
    """

    connection: redis.Redis
    wait_connection: redis.Redis

    @classmethod
    def from_url(cls, url: str, timeout_s: float, longest_wait_s: float) -> JobQueues:
        return cls(connect_redis(url, timeout_s), connect_redis(url, longest_wait_s + _RESULT_WAIT_SLACK_S))

    def queue(self, name: str) -> Queue:
        return Queue(name, connection=self.connection)

    # ----------------------------------------------------------------------------------- interactive

    def run_interactive(self, kwargs: Mapping[str, Any], wait_s: float) -> dict[str, Any]:
        """Enqueue ``segment_interactive`` and wait for its return value.

        The job may wait in the queue at most ``wait_s`` (then RQ drops it: nobody is waiting for it
        any more), and runs at most ``DEFAULT_INTERACTIVE_TIMEOUT_S``.

        Raises:
            QueueUnavailableError: Redis is down, or no worker listens on the interactive queue.
            WorkerTimeoutError: no result within ``wait_s``.
            WorkerFailedError: the job raised (422 when it rejected the input).
        """
        deadline = time.monotonic() + wait_s
        with redis_guard(self.connection):
            queue = self.queue(INTERACTIVE_QUEUE)
            if Worker.count(connection=self.connection, queue=queue) == 0:
                raise QueueUnavailableError(
                    f"no worker listens on queue '{INTERACTIVE_QUEUE}' at {describe_redis(self.connection)}: "
                    "start one with `sts-worker`"
                )
            job = queue.enqueue_call(
                SEGMENT_INTERACTIVE_JOB, kwargs=dict(kwargs), timeout=DEFAULT_INTERACTIVE_TIMEOUT_S,
                result_ttl=DEFAULT_RESULT_TTL_S, ttl=max(1, math.ceil(wait_s)), failure_ttl=DEFAULT_FAILURE_TTL_S,
                description=f"interactive {kwargs.get('case_id')} {kwargs.get('modality')} "
                            f"slice {kwargs.get('slice_index')}",
            )
        result = self._wait_for_result(job, deadline)
        if result is None:
            with redis_guard(self.connection), contextlib.suppress(Exception):
                if job.get_status(refresh=True) == JobStatus.QUEUED:
                    job.cancel()
            with redis_guard(self.connection):
                waiting = len(queue)
                workers = Worker.count(connection=self.connection, queue=queue)
            raise WorkerTimeoutError(
                f"no segmentation within {wait_s:g} s (job {job.id}; {waiting} job(s) queued on "
                f"'{INTERACTIVE_QUEUE}', {workers} worker(s) listening)"
            )
        if result.type == Result.Type.SUCCESSFUL:
            value = result.return_value
            if not isinstance(value, dict):
                raise WorkerFailedError(f"job {job.id} returned {type(value).__name__}, not a dict")
            return value
        raise _failure(job.id, result)

    def _wait_for_result(self, job: Job, deadline: float) -> Result | None:
        """Block on the job's result stream (no polling) until a final result or the deadline."""
        key = Result.get_key(job.id)
        last_id = "0-0"
        with redis_guard(self.wait_connection):
            while True:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0:
                    return None
                reply = self.wait_connection.xread({key: last_id}, block=remaining_ms)
                if not reply:
                    return None
                entries = reply[0][1]
                result_id, payload = entries[-1]
                last_id = result_id.decode()
                result = Result.restore(job.id, last_id, payload, connection=self.wait_connection)
                if result.type != Result.Type.RETRIED:
                    return result

    # ---------------------------------------------------------------------------------- batch work

    def enqueue_preannotate(self, model_version: str, case_id: str, modality: str) -> bool:
        """Enqueue one ``preannotate_case`` job for a case and modality, unless one exists already.

        The job id is derived from (version, case, modality) and enqueued with RQ's atomic
        ``unique=True``: a thousand tasks of one case make one job, and a finished or failed job is not
        repeated while RQ keeps it (``result_ttl``; ``failure_ttl`` for failures, visible in the failed
        registry, requeue with ``rq requeue``).

        Returns:
            True if a job was enqueued now.
        """
        job_id = preannotate_job_id(model_version, case_id, modality)
        with redis_guard(self.connection):
            try:
                self.queue(PREANNOTATE_QUEUE).enqueue_call(
                    PREANNOTATE_CASE_JOB, kwargs={"case_id": case_id, "modality": modality,
                                                  "model_version": model_version},
                    timeout=DEFAULT_PREANNOTATE_TIMEOUT_S, result_ttl=DEFAULT_RESULT_TTL_S,
                    failure_ttl=DEFAULT_FAILURE_TTL_S, job_id=job_id, unique=True, retry=PREANNOTATE_RETRY,
                    description=f"pre-annotate {case_id} {modality} with {model_version}",
                )
            except DuplicateJobError:
                return False
        return True

    def enqueue_propagation(self, kwargs: Mapping[str, Any]) -> str:
        """Enqueue ``propagate_annotation`` on the pre-annotation queue; returns the job id.

        The job is recorded as the task's latest propagation in the same transaction, so a job of an
        earlier save of the same task that has not run yet stands down instead of writing an
        outdated outline after this one (``workers.jobs.propagate_annotation``).
        """
        with redis_guard(self.connection), self.connection.pipeline() as pipeline:
            job = self.queue(PREANNOTATE_QUEUE).enqueue_call(
                PROPAGATE_ANNOTATION_JOB, kwargs=dict(kwargs), timeout=DEFAULT_PREANNOTATE_TIMEOUT_S,
                result_ttl=DEFAULT_RESULT_TTL_S, failure_ttl=DEFAULT_FAILURE_TTL_S, retry=PROPAGATE_RETRY,
                description=f"propagate task {kwargs.get('task_id')} ({kwargs.get('case_id')} "
                            f"{kwargs.get('modality')} slice {kwargs.get('slice_index')})",
                pipeline=pipeline,
            )
            pipeline.set(latest_propagation_key(kwargs["project_id"], kwargs["task_id"]), job.id,
                         ex=LATEST_PROPAGATION_TTL_S)
            pipeline.execute()
        return job.id


def _failure(job_id: str, result: Result) -> WorkerFailedError:
    """A ``WorkerFailedError`` from a failed result: the exception's last line, 422 for input errors."""
    lines = [line for line in (result.exc_string or "").strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else f"job {job_id} ended as {result.type.name}"
    type_name = last.split(":", 1)[0].rsplit(".", 1)[-1]
    status = 422 if type_name in INPUT_ERROR_TYPES else 502
    return WorkerFailedError(f"segmentation failed on the worker (job {job_id}): {last}", http_status=status)
