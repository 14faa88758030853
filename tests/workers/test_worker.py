"""The worker command's start-up checks (``workers.worker``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert worker_switches() == {"propagation_views": "rot180,antitranspose", "prompt_views": "flip_x,transpose",
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


def test_a_mistyped_switch_stops_the_worker_at_start(redis_url: str) -> None:
    """Exit 1 with the variable named, before any job could fail on it."""
    env = {**os.environ, "STS_MIRROR_VIEW": "of"}
    done = subprocess.run([sys.executable, "-m", "workers.worker", "--redis-url", redis_url, "--burst", "--no-warm",
                           "--queues", "sts-test-none"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert "ConfigError: $STS_MIRROR_VIEW='of'" in done.stderr
