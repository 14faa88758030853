"""The backend's HTTP app against a real Redis (DB 15), with RQ jobs run by an in-process SimpleWorker.

Job functions are replaced by small fakes (``workers.jobs`` is resolved by name when the job runs),
so these tests need no model and no torch; ``tests/integration/test_backend_e2e.py`` runs the real ones.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis
from rq import Queue, SimpleWorker, Worker

import workers.jobs
from backend.app import create_app
from backend.settings import BackendSettings
from core.brush_rle import brush_result_to_mask, mask_to_brush_result
from core.errors import InputError
from core.labeling import LABEL_CONFIG
from core.queues import INTERACTIVE_QUEUE, PREANNOTATE_CASE_JOB, PREANNOTATE_QUEUE, PROPAGATE_ANNOTATION_JOB
from core.redis_store import (
    DEFAULT_MODEL_VERSION,
    MODEL_VERSION_KEY,
    STATUS_NO_MODEL,
    PreannotationStore,
    annotation_counts,
    latest_propagation_key,
    preannotate_job_id,
)
from core.settings import Settings
from tests.backend.test_prompts import keypoint, rectangle

W, H = 200, 100


@pytest.fixture
def make_client(redis_db: redis.Redis, redis_url: str) -> Callable[..., Any]:
    def make(**overrides: Any):
        settings = BackendSettings(core=Settings(redis_url=redis_url), **overrides)
        return create_app(settings).test_client()

    return make


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def listener(redis_db: redis.Redis) -> Iterator[Worker]:
    """A worker registered on the interactive queue that runs nothing (the backend refuses to enqueue
    for an annotator when nobody listens)."""
    worker = Worker([INTERACTIVE_QUEUE], connection=redis_db, name="test-listener")
    worker.register_birth()
    yield worker
    worker.register_death()


def task(case_id: str = "STS-0001", modality: str = "T2", z: int = 13, task_id: int = 1) -> dict:
    return {"id": task_id, "project": 3, "data": {"case_id": case_id, "modality": modality, "slice_index": z,
                                                  "n_slices": 40, "image": f"/data/local-files/?d={z}.png"}}


def interactive_payload(*regions: dict, tasks: list | None = None) -> dict:
    return {"tasks": tasks or [task()], "project": "3.1700000000", "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": {"result": list(regions)}}}


def fake_result(width: int = W, height: int = H, calls: list | None = None) -> Callable[..., dict]:
    """A stand-in for ``segment_interactive``: the mask is the box itself."""

    def segment_interactive(case_id, modality, slice_index, box=None, points=None, data_dir=None):
        if calls is not None:
            calls.append({"case_id": case_id, "modality": modality, "slice_index": slice_index, "box": box,
                          "points": points})
        mask = np.zeros((height, width), bool)
        if box:
            x0, y0, x1, y1 = (round(v) for v in box)
            mask[y0:y1 + 1, x0:x1 + 1] = True
        result = mask_to_brush_result(mask, from_name="tumor", to_name="image", label="Tumor")
        return {"rle": result["value"]["rle"], "height": height, "width": width, "score": 0.9,
                "model_version": "fake", "elapsed_ms": 1.0, "result": result}

    return segment_interactive


def post_while_worker_runs(client, connection: redis.Redis, payload: dict) -> Any:
    """POST /predict in a thread, run the enqueued job with a SimpleWorker here (signals need the main
    thread), return the response."""
    reply: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: reply.setdefault("r", client.post("/predict", json=payload)))
    thread.start()
    queue = Queue(INTERACTIVE_QUEUE, connection=connection)
    deadline = time.monotonic() + 10
    while len(queue) == 0 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    SimpleWorker([queue], connection=connection).work(burst=True, with_scheduler=False)
    thread.join(timeout=20)
    assert not thread.is_alive()
    return reply["r"]


# ------------------------------------------------------------------------------------ interactive


def test_box_prompt_gives_one_brush_result_in_pixels(client, redis_db, listener, monkeypatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(workers.jobs, "segment_interactive", fake_result(calls=calls))
    response = post_while_worker_runs(client, redis_db, interactive_payload(rectangle(), keypoint()))
    assert response.status_code == 200, response.json
    body = response.json
    assert calls == [{"case_id": "STS-0001", "modality": "T2", "slice_index": 13, "box": [50.0, 50.0, 149.0, 74.0],
                      "points": [[99.5, 49.5, True]]}]
    assert len(body["results"]) == 1
    prediction = body["results"][0]
    assert prediction["model_version"] == body["model_version"] == DEFAULT_MODEL_VERSION
    assert prediction["score"] == 0.9
    (result,) = prediction["result"]
    assert (result["from_name"], result["to_name"], result["type"]) == ("tumor", "image", "brushlabels")
    assert result["value"]["brushlabels"] == ["Tumor"]
    assert (result["original_width"], result["original_height"]) == (W, H)
    mask = brush_result_to_mask(result)
    assert mask[50:75, 50:150].all() and mask.sum() == 25 * 100


def test_worker_rejecting_the_input_is_422(client, redis_db, listener, monkeypatch) -> None:
    def segment_interactive(**kwargs):
        raise InputError("cases/STS-0001/slices/T2/0013.png: no such slice")

    monkeypatch.setattr(workers.jobs, "segment_interactive", segment_interactive)
    response = post_while_worker_runs(client, redis_db, interactive_payload(rectangle()))
    assert response.status_code == 422
    assert response.json["error"] == "WorkerFailedError" and "no such slice" in response.json["reason"]


def test_worker_crash_is_502(client, redis_db, listener, monkeypatch) -> None:
    def segment_interactive(**kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(workers.jobs, "segment_interactive", segment_interactive)
    response = post_while_worker_runs(client, redis_db, interactive_payload(rectangle()))
    assert response.status_code == 502 and "CUDA out of memory" in response.json["reason"]


def test_slice_size_disagreeing_with_label_studio_is_422(client, redis_db, listener, monkeypatch) -> None:
    monkeypatch.setattr(workers.jobs, "segment_interactive", fake_result(width=W // 2))
    response = post_while_worker_runs(client, redis_db, interactive_payload(rectangle()))
    assert response.status_code == 422 and "re-import" in response.json["reason"]


def test_no_answer_within_the_deadline_is_504_and_the_job_is_dropped(make_client, redis_db, listener) -> None:
    client = make_client(interactive_wait_s=0.5)
    start = time.monotonic()
    response = client.post("/predict", json=interactive_payload(rectangle()))
    elapsed = time.monotonic() - start
    assert response.status_code == 504 and "no segmentation within 0.5 s" in response.json["reason"]
    assert elapsed < 3
    assert len(Queue(INTERACTIVE_QUEUE, connection=redis_db)) == 0, "a job nobody waits for must not run"


def test_no_worker_listening_is_503_at_once(client, redis_db) -> None:
    response = client.post("/predict", json=interactive_payload(rectangle()))
    assert response.status_code == 503 and "sts-worker" in response.json["reason"]
    assert len(Queue(INTERACTIVE_QUEUE, connection=redis_db)) == 0


@pytest.mark.parametrize(("payload", "status", "fragment"), [
    (interactive_payload(rectangle(x=90)), 422, "outside the image"),
    (interactive_payload(rectangle(width=0)), 422, "zero-size"),
    (interactive_payload(rectangle(image_rotation=90)), 422, "rotated"),
    (interactive_payload(rectangle(), tasks=[task(), task(z=14)]), 400, "exactly one task"),
    (interactive_payload(rectangle(), tasks=[{"id": 1, "data": {"image": "x.png"}}]), 422, "no case_id"),
    ({"tasks": "all"}, 400, "must be a list"),
    ({"params": {}}, 400, "must be a list"),
    ({"tasks": [task()], "params": "x"}, 400, "'params' must be an object"),
    ([1, 2], 400, "JSON object"),
])
def test_malformed_predict_payloads_are_4xx(client, listener, payload, status: int, fragment: str) -> None:
    response = client.post("/predict", json=payload)
    assert response.status_code == status, response.json
    assert fragment in response.json["reason"] and response.json["error"]


def test_body_that_is_not_json_is_400(client) -> None:
    for body in ("", "{not json", "\x00", "[" * 100_000):
        response = client.post("/predict", data=body, content_type="application/json")
        assert response.status_code == 400 and response.json["error"] == "PayloadError"


# ----------------------------------------------------------------------------- retrieve predictions


def thousand_tasks() -> list[dict]:
    """25 cases × 2 modalities × 20 slices, as Label Studio sends them (with predictions and metadata)."""
    tasks = []
    for c in range(25):
        for modality in ("T1", "T2"):
            for z in range(20):
                t = task(f"STS-{c:04d}", modality, z, task_id=len(tasks) + 1)
                t.update({"annotations": [], "predictions": [], "meta": {}, "created_at": "2026-01-01T00:00:00Z",
                          "inner_id": t["id"], "total_annotations": 0})
                t["data"].update({"patient_id": f"STS-{c:04d}", "tumor_type": "liposarcoma", "tissue": "Fat",
                                  "anatomy": "thigh", "instance_number": z + 1, "annotate_on": "T1"})
                tasks.append(t)
    return tasks


def test_retrieving_1000_tasks_never_blocks_and_enqueues_one_job_per_case(client, redis_db) -> None:
    tasks = thousand_tasks()
    start = time.perf_counter()
    response = client.post("/predict", json={"tasks": tasks, "project": "3.1", "params": {"context": None}})
    first_s = time.perf_counter() - start
    assert response.status_code == 200
    assert response.json["results"] == [[]] * 1000  # nothing stored yet: Label Studio stores nothing, asks again
    queue = Queue(PREANNOTATE_QUEUE, connection=redis_db)
    assert len(queue) == 50
    jobs = queue.get_jobs()
    assert {j.func_name for j in jobs} == {PREANNOTATE_CASE_JOB}
    assert {(j.kwargs["case_id"], j.kwargs["modality"]) for j in jobs} == {
        (f"STS-{c:04d}", m) for c in range(25) for m in ("T1", "T2")}
    assert all(j.kwargs["model_version"] == DEFAULT_MODEL_VERSION for j in jobs)
    assert all(j.retries_left == 2 for j in jobs)

    start = time.perf_counter()
    again = client.post("/predict", json={"tasks": tasks, "project": "3.1"})
    second_s = time.perf_counter() - start
    assert again.status_code == 200 and len(queue) == 50, "the same cases must not be enqueued twice"
    print(f"\n/predict, 1000 tasks: first call {first_s * 1000:.0f} ms (50 jobs enqueued), "
          f"second {second_s * 1000:.0f} ms")
    assert first_s < 30 and second_s < 30  # Label Studio gives up after 100 s; real figures: benchmarks/


def test_stored_preannotations_are_returned_with_the_setup_version(client, redis_db) -> None:
    version = client.post("/setup", json={"project": "3.1", "schema": LABEL_CONFIG}).json["model_version"]
    mask = np.zeros((H, W), bool)
    mask[10:20, 30:60] = True
    brush = mask_to_brush_result(mask, from_name="tumor", to_name="image", label="Tumor")
    PreannotationStore(redis_db).write_case(version, "STS-0001", "T2", {13: {"result": [brush], "score": 0.7},
                                                                         14: {"result": [], "score": None}},
                                            {"status": "done"})
    tasks = [task(z=13), task(z=14), task(z=15), task("STS-0002", z=13)]
    body = client.post("/predict", json={"tasks": tasks}).json
    assert body["results"][0] == {"result": [brush], "score": 0.7, "model_version": version}
    assert body["results"][1] == {"result": [], "score": None, "model_version": version}  # "no tumour here"
    assert body["results"][2] == [] and body["results"][3] == []
    queued = Queue(PREANNOTATE_QUEUE, connection=redis_db).get_jobs()
    assert [(j.kwargs["case_id"], j.kwargs["modality"]) for j in queued] == [("STS-0002", "T2")]


def test_no_model_status_stops_enqueueing(client, redis_db) -> None:
    PreannotationStore(redis_db).set_status(DEFAULT_MODEL_VERSION, "STS-0001", "T2", {"status": STATUS_NO_MODEL})
    body = client.post("/predict", json={"tasks": [task(z=z) for z in range(5)]}).json
    assert body["results"] == [[]] * 5
    assert len(Queue(PREANNOTATE_QUEUE, connection=redis_db)) == 0


def test_model_version_follows_the_workers_unless_pinned(make_client, redis_db) -> None:
    client = make_client()
    assert client.post("/setup", json={"project": "3.1"}).json == {"model_version": DEFAULT_MODEL_VERSION}
    redis_db.set(MODEL_VERSION_KEY, "unet25d-0003")
    assert client.post("/setup", json={"project": "3.1"}).json == {"model_version": "unet25d-0003"}
    client.post("/predict", json={"tasks": [task()]})
    (job,) = Queue(PREANNOTATE_QUEUE, connection=redis_db).get_jobs()
    assert job.id == preannotate_job_id("unet25d-0003", "STS-0001", "T2")
    assert job.kwargs["model_version"] == "unet25d-0003"
    pinned = make_client(model_version="pinned-1")
    assert pinned.post("/setup", json={}).json == {"model_version": "pinned-1"}
    assert pinned.get("/versions").json["versions"] == ["pinned-1"]


# ----------------------------------------------------------------------------------------- setup


def test_setup_checks_the_labeling_config(client) -> None:
    assert client.post("/setup", json={"project": "3.1", "schema": LABEL_CONFIG, "hostname": "http://ls",
                                       "access_token": "x" * 40}).status_code == 200
    response = client.post("/setup", json={"project": "3.1", "schema": "<View><Image name='img' value='$i'/></View>"})
    assert response.status_code == 422 and "BrushLabels" in response.json["reason"]
    assert client.post("/setup", json=["x"]).status_code == 400
    assert client.post("/setup", json={"schema": 3}).status_code == 400


def test_setup_answers_a_schema_of_unclosed_tags_at_once(client) -> None:
    """The control search is linear in the schema's length: 2 MB of tags that never close took hours
    with a quadratic pattern (34 s at 260 kB), holding the GIL of every thread of the worker."""
    answers: list = []
    schema = "<BrushLabels " * 160_000
    thread = threading.Thread(target=lambda: answers.append(client.post("/setup", json={"schema": schema})),
                              daemon=True)
    thread.start()
    thread.join(timeout=60)  # a guard against a hang, not a timing: the answer takes milliseconds
    assert answers and answers[0].status_code == 422 and "BrushLabels" in answers[0].json["reason"]


# --------------------------------------------------------------------------------------- webhook


def annotation_event(action: str = "ANNOTATION_CREATED", result: list | None = None, **annotation: Any) -> dict:
    mask = np.zeros((H, W), bool)
    mask[40:60, 80:120] = True
    brush = mask_to_brush_result(mask, from_name="tumor", to_name="image", label="Tumor")
    return {"action": action, "project": {"id": 3, "title": "STS"},
            "task": task(z=13, task_id=101),
            "annotation": {"id": 55, "result": [brush] if result is None else result, "ground_truth": False,
                           "completed_by": 1, "was_cancelled": False, **annotation}}


def test_saved_annotation_enqueues_propagation_and_is_counted(client, redis_db) -> None:
    event = annotation_event()
    response = client.post("/webhook", json=event)
    assert response.status_code == 200 and response.json["status"] == "queued"
    (job,) = Queue(PREANNOTATE_QUEUE, connection=redis_db).get_jobs()
    assert job.id == response.json["job_id"] and job.func_name == PROPAGATE_ANNOTATION_JOB
    assert redis_db.get(latest_propagation_key(3, 101)).decode() == job.id  # an older job of the task stands down
    assert job.kwargs == {"project_id": 3, "task_id": 101, "case_id": "STS-0001", "modality": "T2",
                          "slice_index": 13, "brush_results": event["annotation"]["result"], "annotation_id": 55}
    assert job.retries_left == 3
    client.post("/webhook", json=annotation_event("ANNOTATION_UPDATED"))
    client.post("/webhook", json=annotation_event("ANNOTATION_UPDATED"))
    assert annotation_counts(redis_db, 3) == {"created": 1, "updated": 2}


@pytest.mark.parametrize(("event", "reason"), [
    (annotation_event(result=[]), "no Tumor brush"),
    (annotation_event(result=[{"type": "choices", "from_name": "review", "value": {"choices": ["Reviewed"]}}]),
     "no Tumor brush"),
    (annotation_event(was_cancelled=True), "skipped"),
])
def test_annotations_without_a_tumour_brush_are_not_propagated(client, redis_db, event, reason: str) -> None:
    response = client.post("/webhook", json=event)
    assert response.status_code == 200 and response.json["status"] == "ignored" and reason in response.json["reason"]
    assert len(Queue(PREANNOTATE_QUEUE, connection=redis_db)) == 0


@pytest.mark.parametrize("action", ["PROJECT_UPDATED", "START_TRAINING", "ANNOTATIONS_DELETED", "TASKS_CREATED"])
def test_other_actions_are_acknowledged(client, redis_db, action: str) -> None:
    response = client.post("/webhook", json={"action": action, "project": {"id": 3}})
    assert response.status_code == 200 and response.json == {"status": "ignored", "action": action}


@pytest.mark.parametrize(("payload", "status", "fragment"), [
    ({"project": {"id": 3}}, 400, "no 'action'"),
    ({"action": "ANNOTATION_CREATED", "task": task()}, 400, "must be objects"),
    ({**annotation_event(), "task": {"id": 1, "data": {"image": "x"}}}, 422, "no case_id"),
    ({**annotation_event(), "task": {**task(), "id": "one"}}, 400, "task id"),
    ({**annotation_event(), "project": None, "task": {**task(), "project": None}}, 400, "project id"),
    ({**annotation_event(), "annotation": {"id": 1, "result": "x"}}, 400, "must be a list"),
    (annotation_event(result=[{"type": "brushlabels", "from_name": "tumor", "value": {"brushlabels": 5}}]), 200,
     "no Tumor brush"),
])
def test_malformed_webhooks_are_4xx(client, payload, status: int, fragment: str) -> None:
    response = client.post("/webhook", json=payload)
    assert response.status_code == status and fragment in response.json["reason"]


def test_webhook_secret(make_client, redis_db) -> None:
    client = make_client(webhook_secret="s3cret")
    event = annotation_event()
    assert client.post("/webhook", json=event).status_code == 403
    assert client.post("/webhook", json=event, headers={"X-STS-Webhook-Secret": "wrong"}).status_code == 403
    assert client.post("/webhook", data="not json", headers={"X-STS-Webhook-Secret": ""}).status_code == 403
    ok = client.post("/webhook", json=event, headers={"X-STS-Webhook-Secret": "s3cret"})
    assert ok.status_code == 200 and ok.json["status"] == "queued"
    assert len(Queue(PREANNOTATE_QUEUE, connection=redis_db)) == 1


# ------------------------------------------------------------------------------------------ misc


def test_health_and_unknown_routes_answer_json(client) -> None:
    assert client.get("/health").json["status"] == "UP"
    assert client.get("/").status_code == 200
    assert client.get("/metrics").json == {}
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json["error"] == "Not Found"
    assert client.get("/predict").status_code == 405 and client.get("/predict").json["error"]


def test_backend_imports_neither_torch_nor_workers() -> None:
    code = ("import sys; from backend.app import create_app; create_app(); "
            "bad = [m for m in ('torch', 'workers', 'label_studio_ml') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
