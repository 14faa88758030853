"""The worker command's start-up checks (``workers.worker``)."""

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from rq import Retry, Worker
from rq.utils import utcformat

from core.errors import ConfigError
from workers.models.litemedsam import cpu_has_bf16_units
from workers.worker import worker_switches

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_worker_switches_report_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STS_MIRROR_VIEW", raising=False)
    monkeypatch.setenv("STS_PROMPT_VIEWS", "flip_x,transpose")
    monkeypatch.setenv("STS_WARM_EMBEDDINGS", "off")
    monkeypatch.setenv("STS_WARM_PROMPT_VIEWS", "rot180,transpose")  # transpose is in the prompt views already
    monkeypatch.setenv("STS_CPU_BF16", "on")
    monkeypatch.delenv("STS_EMBEDDING_CACHE", raising=False)
    assert worker_switches() == {"embedding_cache": "memory only", "propagation_views": "rot180,antitranspose",
                                 "prompt_views": "flip_x,transpose",
                                 "warm_prompt_views": "rot180", "warm_embeddings": False, "cpu_bf16": True}
    monkeypatch.setenv("STS_CPU_BF16", "auto")
    assert worker_switches()["cpu_bf16"] == cpu_has_bf16_units()
    monkeypatch.setenv("STS_MIRROR_VIEW", "off")
    assert worker_switches()["propagation_views"] == "none"
    monkeypatch.delenv("STS_MIRROR_VIEW")
    monkeypatch.setenv("STS_CPU_BF16", "sometimes")
    with pytest.raises(ConfigError, match=r"STS_CPU_BF16='sometimes'.*or auto"):
        worker_switches()
    monkeypatch.delenv("STS_CPU_BF16")
    monkeypatch.setenv("STS_PROMPT_VIEWS", "off")
    monkeypatch.setenv("STS_WARM_PROMPT_VIEWS", "off")
    assert worker_switches()["prompt_views"] == worker_switches()["warm_prompt_views"] == "none"
    monkeypatch.setenv("STS_WARM_PROMPT_VIEWS", "zoom")
    with pytest.raises(ConfigError, match="STS_WARM_PROMPT_VIEWS"):
        worker_switches()
    monkeypatch.setenv("STS_WARM_PROMPT_VIEWS", "")
    monkeypatch.setenv("STS_PROMPT_VIEWS", "flip_z")
    with pytest.raises(ConfigError, match="STS_PROMPT_VIEWS"):
        worker_switches()
    monkeypatch.setenv("STS_PROMPT_VIEWS", "")
    monkeypatch.setenv("STS_WARM_EMBEDDINGS", "maybe")
    with pytest.raises(ConfigError, match="STS_WARM_EMBEDDINGS"):
        worker_switches()
    monkeypatch.setenv("STS_WARM_EMBEDDINGS", "on")
    monkeypatch.setenv("STS_EMBEDDING_CACHE", "/srv/cache")
    monkeypatch.setenv("STS_EMBEDDING_CACHE_GB", "2.5")
    assert worker_switches()["embedding_cache"] == "/srv/cache (2.5 GB)"
    monkeypatch.setenv("STS_EMBEDDING_CACHE_GB", "20GB")  # a typo stops the worker at start, not its warm-ups
    with pytest.raises(ConfigError, match="STS_EMBEDDING_CACHE_GB"):
        worker_switches()


def test_a_mistyped_switch_stops_the_worker_at_start(redis_url: str) -> None:
    """Exit 1 with the variable named, before any job could fail on it."""
    env = {**os.environ, "STS_MIRROR_VIEW": "of"}
    done = subprocess.run([sys.executable, "-m", "workers.worker", "--redis-url", redis_url, "--burst", "--no-warm",
                           "--queues", "sts-test-none"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert "ConfigError: $STS_MIRROR_VIEW='of'" in done.stderr


def test_a_worker_restarted_under_the_same_pid_reaps_its_earlier_self(redis_db: redis.Redis) -> None:
    """A container restarted after a crash runs its worker as pid 1 again under the same host name:
    the earlier registration must be handed back, not block the new worker's birth until it expires."""
    from rq import Queue, SimpleWorker
    from rq.registry import StartedJobRegistry

    from workers.worker import PROCESS_STARTED, reap_dead_local_workers

    queue = Queue("sts-test-restart", connection=redis_db)
    job = queue.enqueue("builtins.len", [1, 2], retry=Retry(max=1))
    earlier = SimpleWorker([queue], connection=redis_db, name="sts-restarted")
    earlier.register_birth()
    redis_db.hset(earlier.key, "birth", utcformat(PROCESS_STARTED - timedelta(minutes=5)))
    queue.remove(job.id)
    earlier.prepare_execution(job)  # what a worker does when it takes a job: now in the started registry
    earlier.prepare_job_execution(job)
    assert job.id in StartedJobRegistry(queue.name, connection=redis_db).get_job_ids()
    assert Worker.find_by_key(earlier.key, connection=redis_db).pid == os.getpid()

    alive = SimpleWorker([queue], connection=redis_db, name="sts-alive")  # born now, same pid: not reaped
    alive.register_birth()
    assert reap_dead_local_workers(redis_db) == [job.id]
    assert {w.name for w in Worker.all(connection=redis_db)} == {"sts-alive"}
    assert job.id in queue.job_ids  # requeued: it had a retry left
    SimpleWorker([queue], connection=redis_db, name="sts-restarted").register_birth()  # the name is free again
