"""The whole loop on CPU: Label Studio 1.23 → backend (HTTP) → Redis → ``sts-worker`` process → back.

A phantom patient is imported into a real Label Studio; the backend runs on a loopback port
(werkzeug, in a thread) and is connected to the project as an interactive ML backend; a real worker
process (``python -m workers.worker``) serves the queues from Redis DB 15. Tests run in file order and
share that stack; the last one kills workers mid-job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import requests
from click.testing import CliRunner
from rq import Queue, Retry, Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from werkzeug.serving import make_server

from backend.app import create_app
from backend.settings import BackendSettings
from core.brush_rle import brush_result_to_mask, mask_to_brush_result
from core.case_store import CaseStore
from core.queues import PREANNOTATE_CASE_JOB, PREANNOTATE_QUEUE, PROPAGATE_ANNOTATION_JOB, TRAIN_QUEUE
from core.redis_store import DEFAULT_MODEL_VERSION, STATUS_NO_MODEL, PreannotationStore
from core.settings import Settings
from importers.cli import main as import_main
from tests.services import find_free_port
from workers.embedding_cache import DiskEmbeddingCache, embedding_key
from workers.jobs import PROPAGATED_PREFIX, read_slice
from workers.models.litemedsam import preprocess_slice

pytestmark = [pytest.mark.label_studio, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
CASE = "PH-E2E"
PROJECT = "STS backend e2e"
SEED = 13               # the annotated slice (the phantom's tumour spans slices 6-19)
REVIEWED = (10, 16)     # slices a person annotated without a brush: propagation stays between them
SLEEPY = "tests.integration.test_backend_e2e.sleepy"


def sleepy(marker: str, seconds: float) -> str:
    """A long job for the kill test: sleeps the first time, returns at once when run again."""
    path = Path(marker)
    if path.exists():
        return "second attempt"
    path.write_text("started")
    time.sleep(seconds)
    return "not killed"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, stack: Stack | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    detail = f"\nworker log:\n{stack.worker_log_tail()}" if stack else ""
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}{detail}")


@dataclass
class Stack:
    label_studio: Any
    ls: Any
    redis: redis.Redis
    redis_url: str
    data_dir: Path
    log_dir: Path
    truth: np.ndarray
    project_id: int = 0
    ml_id: int = 0
    backend_url: str = ""
    worker: subprocess.Popen | None = None
    worker_logs: list[Path] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.label_studio.token}"}

    @property
    def embedding_dir(self) -> Path:
        """The workers' shared embedding cache (as ``STS_EMBEDDING_CACHE`` in the stack and compose)."""
        return self.log_dir.parent / f"{self.log_dir.name}-embeddings"

    def preannotate_idle(self) -> bool:
        queue = Queue(PREANNOTATE_QUEUE, connection=self.redis)
        return queue.count == 0 and StartedJobRegistry(PREANNOTATE_QUEUE, connection=self.redis).count == 0

    def tasks(self, modality: str = "T2") -> dict[int, Any]:
        listed = self.ls.tasks.list(project=self.project_id, fields="all", page_size=500)
        return {t.data["slice_index"]: t for t in listed if t.data["modality"] == modality}

    def start_worker(self, *args: str) -> subprocess.Popen:
        env = {**os.environ, "REDIS_URL": self.redis_url, "STS_DATA_DIR": str(self.data_dir),
               "LABEL_STUDIO_URL": self.label_studio.url, "LABEL_STUDIO_API_KEY": self.label_studio.token,
               "STS_EMBEDDING_CACHE": str(self.embedding_dir),
               # the slices and their mirrored views only: warming both modalities' warm prompt views too
               # doubles this test's encoder time on 2 cores (tests/workers cover those views)
               "STS_WARM_PROMPT_VIEWS": "off"}
        log = self.log_dir / f"worker-{len(self.worker_logs)}.log"
        self.worker_logs.append(log)
        with open(log, "wb") as handle:
            self.worker = subprocess.Popen([sys.executable, "-m", "workers.worker", *args], cwd=REPO_ROOT, env=env,
                                           stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        pid = self.worker.pid
        wait_for(lambda: any(w.pid == pid for w in Worker.all(connection=self.redis)) or self.worker.poll() is not None,
                 240, "the worker to register", self)
        assert self.worker.poll() is None, self.worker_log_tail()
        return self.worker

    def kill_worker(self) -> None:
        """SIGKILL the worker and its scheduler (its process group), and reap it (a zombie's pid is alive)."""
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait(timeout=30)

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGTERM)
            try:
                self.worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill_worker()

    def worker_log_tail(self, lines: int = 40) -> str:
        if not self.worker_logs:
            return "<no worker started>"
        return "\n".join(self.worker_logs[-1].read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def stack(label_studio, ls_client, redis_url: str, redis_conn: redis.Redis, phantom_patient,
          tmp_path_factory) -> Iterator[Stack]:
    redis_conn.flushdb()
    folder, truth = phantom_patient
    data_dir = label_studio.document_root / "data-backend-e2e"
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(label_studio.document_root), "STS_DATA_DIR": str(data_dir),
           "STS_LS_PROJECT": PROJECT}
    imported = CliRunner().invoke(import_main, [str(folder), "--patient-id", CASE, "--tissue", "Myxoid", "--json"],
                                  env=env)
    assert imported.exit_code == 0, imported.output
    s = Stack(label_studio, ls_client, redis_conn, redis_url, data_dir, tmp_path_factory.mktemp("e2e-logs"),
              truth.t1.array.astype(bool))
    s.project_id = next(p.id for p in ls_client.projects.list(title=PROJECT) if p.title == PROJECT)

    s.start_worker("--log-level", "INFO")
    port = find_free_port()
    server = make_server("127.0.0.1", port, create_app(BackendSettings(core=Settings(redis_url=redis_url))),
                         threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    s.backend_url = f"http://127.0.0.1:{port}"
    try:
        ml = ls_client.ml.create(project=s.project_id, url=s.backend_url, title="sts", is_interactive=True)
        s.ml_id = ml.id
        yield s
    finally:
        server.shutdown()
        s.stop_worker()
        redis_conn.flushdb()


def box_region(mask: np.ndarray, margin_px: int = 3) -> dict:
    """A smart-rectangle region (percent) around ``mask``, as the browser sends it."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    x0, y0 = xs.min() - margin_px, ys.min() - margin_px
    x1, y1 = xs.max() + 1 + margin_px, ys.max() + 1 + margin_px
    return {"original_width": width, "original_height": height, "image_rotation": 0, "from_name": "box",
            "to_name": "image", "type": "rectanglelabels", "id": "prompt1",
            "value": {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
                      "height": 100 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": ["Tumor"]}}


def interactive(stack: Stack, task_id: int, region: dict) -> dict:
    response = requests.post(f"{stack.label_studio.url}/api/ml/{stack.ml_id}/interactive-annotating",
                             json={"task": task_id, "context": {"result": [region]}}, headers=stack.headers(),
                             timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def propagated(task: Any) -> list[dict]:
    return [p.model_dump() for p in task.predictions if (p.model_version or "").startswith(PROPAGATED_PREFIX)]


# ------------------------------------------------------------------------------------------- tests


def test_label_studio_connects_the_backend(stack: Stack) -> None:
    ml = stack.ls.ml.get(id=stack.ml_id)
    assert ml.state == "CO", ml
    assert ml.model_version == DEFAULT_MODEL_VERSION


def test_a_box_drawn_in_label_studio_comes_back_as_the_tumour(stack: Stack) -> None:
    task = stack.tasks()[SEED]
    start = time.perf_counter()
    reply = interactive(stack, task.id, box_region(stack.truth[SEED]))
    elapsed = time.perf_counter() - start
    assert "errors" not in reply, reply
    data = reply["data"]
    assert data["model_version"] == DEFAULT_MODEL_VERSION
    (result,) = data["result"]
    mask = brush_result_to_mask(result)
    score = dice(mask, stack.truth[SEED])
    print(f"\ninteractive through Label Studio: {elapsed:.2f} s, Dice {score:.3f}")
    assert score > 0.85


def test_a_prompt_outside_the_image_is_an_error_in_label_studio(stack: Stack) -> None:
    region = box_region(stack.truth[SEED])
    region["value"]["x"] = 95.0
    reply = interactive(stack, stack.tasks()[SEED].id, region)
    assert "422" in " ".join(reply.get("errors", [])), reply


def test_retrieve_predictions_enqueues_the_cases_once_and_warms_them_without_a_model(stack: Stack) -> None:
    """No automatic model: each case and modality is marked so, once, and its slices are embedded
    ahead of the annotator's first click (every slice of both modalities ends in the shared cache)."""
    def retrieve() -> requests.Response:
        return requests.post(f"{stack.label_studio.url}/api/dm/actions",
                             params={"id": "retrieve_tasks_predictions", "project": stack.project_id},
                             json={"selectedItems": {"all": True, "excluded": []}}, headers=stack.headers(),
                             timeout=120)

    store = PreannotationStore(stack.redis)
    response = retrieve()
    assert response.status_code == 200, response.text
    wait_for(lambda: all((store.status(DEFAULT_MODEL_VERSION, CASE, m) or {}).get("status") == STATUS_NO_MODEL
                         for m in ("T1", "T2")), 60, "both modalities to be marked no_model", stack)
    wait_for(stack.preannotate_idle, 600, "the slices to be warmed", stack)
    finished = FinishedJobRegistry(PREANNOTATE_QUEUE, connection=stack.redis)
    cases = [j for j in Job.fetch_many(finished.get_job_ids(), connection=stack.redis)
             if j is not None and j.func_name == PREANNOTATE_CASE_JOB]
    assert len(cases) == 2 and FailedJobRegistry(PREANNOTATE_QUEUE, connection=stack.redis).count == 0
    (version_dir,) = stack.embedding_dir.iterdir()  # one encoder version
    cache = DiskEmbeddingCache(stack.embedding_dir, version_dir.name)
    layout = CaseStore(stack.data_dir).case(CASE)
    for modality in ("T1", "T2"):
        for z in stack.tasks(modality):
            model_input, _ = preprocess_slice(read_slice(layout, modality, z))
            assert cache.path_for(embedding_key(model_input, version_dir.name)).is_file(), (modality, z)
    assert retrieve().status_code == 200
    assert len(Queue(PREANNOTATE_QUEUE, connection=stack.redis)) == 0
    assert len([i for i in finished.get_job_ids() if i in {j.id for j in cases}]) == 2
    assert stack.preannotate_idle()
    for task in stack.tasks().values():
        assert not [p for p in task.predictions if p.model_version == DEFAULT_MODEL_VERSION]


def test_a_saved_annotation_is_propagated_to_unannotated_neighbours(stack: Stack) -> None:
    tasks = stack.tasks()
    # A person reviewed slices 10 and 16 without drawing: human annotations (no brush, so nothing to
    # propagate from them), which propagation from slice 13 must neither overwrite nor cross.
    for z in REVIEWED:
        stack.ls.annotations.create(id=tasks[z].id, result=[
            {"from_name": "review", "to_name": "image", "type": "choices", "value": {"choices": ["Reviewed"]}}])
    brush = mask_to_brush_result(stack.truth[SEED], from_name="tumor", to_name="image", label="Tumor")
    annotation = stack.ls.annotations.create(id=tasks[SEED].id, result=[brush], ground_truth=False)
    finished = FinishedJobRegistry(PREANNOTATE_QUEUE, connection=stack.redis)

    def propagation_finished(count: int) -> Callable[[], bool]:
        def done() -> bool:
            failed = FailedJobRegistry(PREANNOTATE_QUEUE, connection=stack.redis).get_job_ids()
            assert not failed, Job.fetch(failed[0], connection=stack.redis).latest_result().exc_string
            jobs = Job.fetch_many(finished.get_job_ids(), connection=stack.redis)
            return sum(j is not None and j.func_name == PROPAGATE_ANNOTATION_JOB for j in jobs) >= count
        return done

    start = time.perf_counter()
    wait_for(propagation_finished(1), 150, "the propagation job to finish", stack)
    tasks = stack.tasks()
    print(f"\npropagation over slices {REVIEWED[0] + 1}-{REVIEWED[1] - 1} took {time.perf_counter() - start:.1f} s")
    between = [z for z in range(REVIEWED[0] + 1, REVIEWED[1]) if z != SEED]
    for z in between:
        (prediction,) = propagated(tasks[z])
        assert prediction["model_version"].startswith(PROPAGATED_PREFIX + "litemedsam")
        score = dice(brush_result_to_mask(prediction["result"][0]), stack.truth[z])
        print(f"slice {z}: Dice {score:.3f}")
        assert score > 0.7
    assert not propagated(tasks[SEED]), "the annotated slice itself gets no prediction"
    for z in range(len(tasks)):
        if z not in between:
            assert not propagated(tasks[z]), f"slice {z} is annotated or beyond an annotated slice"
    assert all(not propagated(t) for t in stack.tasks("T1").values()), "nor the other modality"

    # Saving the annotation again replaces the propagated predictions, never duplicates them.
    stack.ls.annotations.update(id=annotation.id, result=[brush])
    wait_for(propagation_finished(2), 120, "the second propagation", stack)
    again = stack.tasks()
    for z in between:
        (replaced,) = propagated(again[z])
        assert replaced["id"] != propagated(tasks[z])[0]["id"]
    counts = {k.decode(): int(v) for k, v in stack.redis.hgetall(f"sts:annotations:{stack.project_id}").items()}
    assert counts == {"created": 3, "updated": 1}


def test_status_view_lists_the_worker_and_its_device(stack: Stack) -> None:
    run = subprocess.run([sys.executable, "-m", "workers.worker", "--status", "--redis-url", stack.redis_url],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "device cpu" in run.stdout and "interactive" in run.stdout and "Failed jobs (0" in run.stdout


def test_a_worker_killed_mid_job_leaves_the_job_failed_or_retried(stack: Stack, tmp_path: Path) -> None:
    queue = Queue(TRAIN_QUEUE, connection=stack.redis)
    # Without retries: the job ends in the FailedJobRegistry as abandoned, as soon as a new worker starts.
    marker = tmp_path / "first"
    job = queue.enqueue_call(SLEEPY, args=(str(marker), 120), timeout=300)
    wait_for(marker.exists, 30, "the long job to start", stack)
    stack.kill_worker()
    stack.start_worker("--no-warm", "--no-scheduler", "--queues", TRAIN_QUEUE)
    job.refresh()
    assert job.is_failed, job.get_status()
    assert job.id in FailedJobRegistry(TRAIN_QUEUE, connection=stack.redis).get_job_ids()
    assert "AbandonedJobError" in (job.latest_result().exc_string or "")

    # With a retry left: it goes back to the queue and the new worker finishes it.
    marker = tmp_path / "second"
    job = queue.enqueue_call(SLEEPY, args=(str(marker), 120), timeout=300, retry=Retry(max=1))
    wait_for(marker.exists, 30, "the second long job to start", stack)
    stack.kill_worker()
    stack.start_worker("--no-warm", "--no-scheduler", "--queues", TRAIN_QUEUE)
    wait_for(lambda: job.get_status(refresh=True) == "finished", 30, "the retried job to finish", stack)
    assert job.return_value() == "second attempt"
    status = subprocess.run([sys.executable, "-m", "workers.worker", "--status", "--json", "--redis-url",
                             stack.redis_url], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert '"AbandonedJobError' in status.stdout or "AbandonedJobError" in status.stdout
