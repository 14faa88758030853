"""Job functions called directly, as plain functions: no worker, and Label Studio replaced by a stub of
the SDK's seam (``tasks.list``, ``predictions.create/delete``). The phantom case is imported into a
temporary case store; the real LiteMedSAM runs on CPU for ``segment_interactive``."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from rq import Queue, Retry, SimpleWorker
from rq.registry import FailedJobRegistry

import workers.segmentation
from core.brush_rle import brush_result_to_mask, decode_rle, mask_to_brush_result
from core.case_store import CaseStore
from core.errors import AnnotationError, InputError
from core.queues import INTERACTIVE_QUEUE, PREANNOTATE_QUEUE, SEGMENT_INTERACTIVE_JOB, WARM_EMBEDDINGS_JOB
from core.redis_store import (
    STATUS_DONE,
    STATUS_NO_MODEL,
    PreannotationStore,
    latest_propagation_key,
    propagation_lock_key,
)
from importers.pipeline import ImportOptions, import_patient
from workers.jobs import (
    PROPAGATED_PREFIX,
    WARM_ENV,
    middle_out,
    preannotate_case,
    propagate_annotation,
    propagation_range,
    seed_mask,
    segment_interactive,
)
from workers.propagation import propagation_settings_from_env, propagation_views
from workers.slice_views import VIEWS, ZOOM_VIEWS

CASE = "PH-JOBS"
SEED = 13


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def case(phantom_patient, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """``(data_dir, truth[z, y, x])``: the phantom imported without Label Studio."""
    folder, truth = phantom_patient
    data_dir = tmp_path_factory.mktemp("jobs-data")
    import_patient(folder, ImportOptions(CASE, tissue="Myxoid"), CaseStore(data_dir), sync=None)
    return data_dir, truth.t1.array.astype(bool)


def truth_box(mask: np.ndarray, margin: int = 3) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min() - margin), float(ys.min() - margin), float(xs.max() + margin), float(ys.max() + margin)]


# ------------------------------------------------------------------------------------- interactive


def test_box_prompt_segments_the_tumour(case) -> None:
    data_dir, truth = case
    out = segment_interactive(CASE, "T2", SEED, box=truth_box(truth[SEED]), data_dir=data_dir)
    assert set(out) >= {"rle", "height", "width", "score", "model_version", "elapsed_ms", "result"}
    assert (out["height"], out["width"]) == truth.shape[1:]
    mask = decode_rle(out["rle"], out["height"], out["width"])
    np.testing.assert_array_equal(brush_result_to_mask(out["result"]), mask)
    assert out["result"]["from_name"] == "tumor" and out["result"]["value"]["brushlabels"] == ["Tumor"]
    assert out["model_version"].startswith("litemedsam") and out["elapsed_ms"] > 0
    score = dice(mask, truth[SEED])
    print(f"\nbox prompt on the phantom, slice {SEED}: Dice {score:.3f}")
    assert score > 0.85


def test_a_click_averages_in_the_warm_views_once_the_slice_is_warmed(case, monkeypatch) -> None:
    """A CPU worker (prompt views off, ``$STS_WARM_PROMPT_VIEWS`` on): before the warm-up a box is
    decoded on the slice alone; once the slice's views are embedded, the same box is decoded on them
    too, with no encoder pass, and the job says which views it averaged."""
    from workers.jobs import read_slice
    from workers.segmentation import SliceSegmenter

    data_dir, truth = case
    monkeypatch.setenv("STS_PROMPT_VIEWS", "off")
    monkeypatch.setenv("STS_WARM_PROMPT_VIEWS", "rot180,antitranspose")
    monkeypatch.setattr(workers.segmentation, "_DEFAULT_SEGMENTER", None)
    box = truth_box(truth[SEED])
    before = segment_interactive(CASE, "T2", SEED, box=box, data_dir=data_dir)
    assert before["views"] == []
    segmenter = workers.segmentation.default_segmenter()
    image = read_slice(CaseStore(data_dir).case(CASE), "T2", SEED)
    segmenter.embed_many([VIEWS["rot180"].image(image), VIEWS["antitranspose"].image(image)])  # the warm-up's work
    calls = segmenter.encoder_calls
    after = segment_interactive(CASE, "T2", SEED, box=box, data_dir=data_dir)
    assert after["views"] == ["rot180", "antitranspose"] and segmenter.encoder_calls == calls
    mask = decode_rle(after["rle"], after["height"], after["width"])
    expected = SliceSegmenter(model=segmenter.model, cache=segmenter.cache, views="rot180,antitranspose")
    np.testing.assert_array_equal(mask, expected.segment(image, box=box))
    assert dice(mask, truth[SEED]) > 0.85
    clicked = segment_interactive(CASE, "T2", SEED, points=[[float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2,
                                                             True]], data_dir=data_dir)
    assert clicked["views"] == []  # clicks alone keep one view
    monkeypatch.setattr(workers.segmentation, "_DEFAULT_SEGMENTER", None)


def test_clicks_alone_segment_the_tumour(case) -> None:
    data_dir, truth = case
    ys, xs = np.nonzero(truth[SEED])
    out = segment_interactive(CASE, "T2", SEED, points=[[float(xs.mean()), float(ys.mean()), True]], data_dir=data_dir)
    score = dice(decode_rle(out["rle"], out["height"], out["width"]), truth[SEED])
    print(f"\none click on the phantom, slice {SEED}: Dice {score:.3f}")
    assert score > 0.6


@pytest.mark.parametrize(("case_id", "z", "box", "fragment"), [
    (CASE, 99, [10, 10, 50, 50], "no such slice"),
    ("PH-NOPE", 3, [10, 10, 50, 50], "no such slice"),
    (CASE, 3, [500, 500, 600, 600], "outside"),
    (CASE, 3, [10, 10, 10, 50], "zero width"),
])
def test_bad_input_is_an_input_error(case, case_id: str, z: int, box, fragment: str) -> None:
    data_dir, _ = case
    with pytest.raises(InputError, match=fragment):
        segment_interactive(case_id, "T2", z, box=box, data_dir=data_dir)


def test_input_errors_are_not_retried_by_rq(case, redis_db, monkeypatch) -> None:
    data_dir, _ = case
    monkeypatch.setenv("STS_DATA_DIR", str(data_dir))
    queue = Queue(INTERACTIVE_QUEUE, connection=redis_db)
    job = queue.enqueue_call(SEGMENT_INTERACTIVE_JOB, kwargs={"case_id": CASE, "modality": "T2", "slice_index": 99,
                                                              "box": [1, 1, 9, 9]}, retry=Retry(max=3))
    SimpleWorker([queue], connection=redis_db).work(burst=True, with_scheduler=False)
    job.refresh()
    assert job.is_failed and job.retries_left == 0
    assert job.id in FailedJobRegistry(INTERACTIVE_QUEUE, connection=redis_db).get_job_ids()
    assert "no such slice" in job.latest_result().exc_string


# ---------------------------------------------------------------------------------- pre-annotation


def test_without_an_automatic_model_the_case_gets_a_clear_status(case, redis_db, monkeypatch) -> None:
    data_dir, _ = case
    monkeypatch.setenv(WARM_ENV, "0")  # warming is tested below, with a worker
    out = preannotate_case(CASE, "T2", "sts-initial", data_dir=data_dir, connection=redis_db)
    assert out["status"] == STATUS_NO_MODEL and "no automatic model" in out["reason"] and out["warm"] is None
    status = PreannotationStore(redis_db).status("sts-initial", CASE, "T2")
    assert status["status"] == STATUS_NO_MODEL
    assert 0 < redis_db.ttl(f"sts:pre-status:sts-initial:{CASE}:T2") <= 3600


def test_automatic_masks_are_stored_for_every_slice(case, redis_db, monkeypatch) -> None:
    data_dir, truth = case
    monkeypatch.setattr(workers.segmentation, "segment_volume", lambda volume, spacing=None: truth.copy())
    out = preannotate_case(CASE, "T1", "unet-7", data_dir=data_dir, connection=redis_db)
    assert out["status"] == STATUS_DONE and out["slices"] == truth.shape[0]
    assert out["slices_with_tumour"] == int(truth.any(axis=(1, 2)).sum())
    found, statuses = PreannotationStore(redis_db).lookup("unet-7", [(CASE, "T1", z) for z in range(truth.shape[0])])
    assert statuses[(CASE, "T1")]["status"] == STATUS_DONE
    assert len(found) == truth.shape[0]
    np.testing.assert_array_equal(brush_result_to_mask(found[(CASE, "T1", SEED)]["result"][0]), truth[SEED])
    assert found[(CASE, "T1", 0)]["result"] == []


# ------------------------------------------------------------------------------------- propagation


def test_propagation_range_stops_before_annotated_slices() -> None:
    assert propagation_range(13, {8, 13, 16}, 24) == (9, 15)
    assert propagation_range(13, {13}, 24) == (0, 23)
    assert propagation_range(0, {0, 1}, 24) == (0, 0)


def test_seed_of_the_wrong_size_is_an_annotation_error() -> None:
    brush = mask_to_brush_result(np.ones((10, 12), bool), from_name="tumor", to_name="image", label="Tumor")
    with pytest.raises(AnnotationError, match="12×10"):
        seed_mask([brush], (192, 192))
    with pytest.raises(AnnotationError, match="no brush result"):
        seed_mask([], (192, 192))


class FakeLabelStudio:
    """The SDK calls propagation makes, over an in-memory project. ``listings[i]`` is what the i-th
    ``tasks.list`` returns (the last one repeats), so a test can change the tasks between the first and
    the second listing, as someone annotating meanwhile would."""

    def __init__(self, listings: list[list[SimpleNamespace]]) -> None:
        self.log: list[tuple] = []
        ids = itertools.count(1000)
        log = self.log
        listed = itertools.chain(listings, itertools.repeat(listings[-1]))

        class Tasks:
            def list(self, **kwargs: Any):
                log.append(("list", kwargs["project"]))
                return iter(next(listed))

        class Predictions:
            def create(self, task: int, result: list, model_version: str, **kwargs: Any):
                log.append(("create", task, model_version))
                return SimpleNamespace(id=next(ids))

            def delete(self, id: int):
                log.append(("delete", id))

        self.tasks, self.predictions = Tasks(), Predictions()


def ls_task(z: int, annotated: bool = False, predictions: list | None = None, modality: str = "T2") -> SimpleNamespace:
    return SimpleNamespace(id=100 + z, data={"case_id": CASE, "modality": modality, "slice_index": z},
                           annotations=[{"id": z, "was_cancelled": False, "result": []}] if annotated else [],
                           predictions=predictions or [])


def test_propagation_writes_neighbours_without_human_annotations(case, monkeypatch) -> None:
    data_dir, truth = case
    calls = []

    def propagate(volume, seed_index, seed, settings):
        calls.append((volume.shape, seed_index, int(seed.sum()), settings.views))
        return truth[9:16].copy()

    monkeypatch.setattr(workers.segmentation, "propagate", propagate, raising=False)
    monkeypatch.setenv("STS_MIRROR_VIEW", "0")  # the worker's setting reaches propagation
    old = {"id": 900, "model_version": PROPAGATED_PREFIX + "old", "result": []}
    imported = {"id": 901, "model_version": "imported-GTV", "result": []}
    tasks = [ls_task(z, annotated=z in (8, 16), predictions=[old] if z == 10 else [imported] if z == 15 else None)
             for z in range(truth.shape[0])]
    seed_brush = mask_to_brush_result(truth[SEED], from_name="tumor", to_name="image", label="Tumor")
    client = FakeLabelStudio([tasks])
    out = propagate_annotation(3, 113, CASE, "T2", SEED, [seed_brush], annotation_id=5, data_dir=data_dir,
                               client=client)
    assert calls == [((7, *truth.shape[1:]), SEED - 9, int(truth[SEED].sum()), "")]  # slices 9..15 only
    assert out["range"] == [9, 15] and out["written"] == 6 and out["deleted"] == 1
    assert out["model_version"].startswith(PROPAGATED_PREFIX + "litemedsam")
    created = [e[1] for e in client.log if e[0] == "create"]
    assert created == [100 + z for z in (9, 10, 11, 12, 14, 15)]
    # The old propagated prediction on slice 10 is deleted only after its replacement exists;
    # the imported contour on slice 15 is left alone.
    assert client.log.index(("delete", 900)) > client.log.index(("create", 110, out["model_version"]))
    assert ("delete", 901) not in client.log


def test_a_slice_annotated_during_propagation_is_left_alone(case, monkeypatch) -> None:
    data_dir, truth = case
    monkeypatch.setattr(workers.segmentation, "propagate", lambda volume, seed_index, seed, settings: truth.copy(),
                        raising=False)
    before = [ls_task(z) for z in range(truth.shape[0])]
    after = [ls_task(z, annotated=z == 12) for z in range(truth.shape[0])]
    seed_brush = mask_to_brush_result(truth[SEED], from_name="tumor", to_name="image", label="Tumor")
    client = FakeLabelStudio([before, after])
    out = propagate_annotation(3, 113, CASE, "T2", SEED, [seed_brush], data_dir=data_dir, client=client)
    assert out["skipped_annotated"] == 1
    created = {e[1] for e in client.log if e[0] == "create"}
    assert 112 not in created
    assert created == {100 + z for z in range(truth.shape[0]) if truth[z].any() and z not in (12, SEED)}


# ------------------------------------------------------------------------------ embedding warm-up


def test_slices_are_warmed_from_the_centre_outwards() -> None:
    assert middle_out(5) == [2, 3, 1, 4, 0]
    assert middle_out(4, centre=0) == [0, 1, 2, 3]
    assert middle_out(3, centre=9) == [2, 1, 0]


def test_warming_makes_way_for_annotators_and_serves_another_worker(case, redis_db, monkeypatch, tmp_path) -> None:
    """A warm-up job embeds one slice, sees an annotator waiting, enqueues the rest behind them; the
    embedding it stored on disk then answers a first click in a fresh process without the encoder."""
    data_dir, truth = case
    monkeypatch.setenv("STS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("STS_EMBEDDING_CACHE", str(tmp_path / "embeddings"))
    monkeypatch.setattr(workers.segmentation, "_DEFAULT_SEGMENTER", None)
    interactive = Queue(INTERACTIVE_QUEUE, connection=redis_db)
    interactive.enqueue_call(SEGMENT_INTERACTIVE_JOB, kwargs={"case_id": CASE, "modality": "T2", "slice_index": 0,
                                                              "box": [1, 1, 9, 9]})  # an annotator waiting
    preannotate = Queue(PREANNOTATE_QUEUE, connection=redis_db)
    first = preannotate.enqueue_call(WARM_EMBEDDINGS_JOB, kwargs={"case_id": CASE, "modality": "T2",
                                                                   "centre": SEED})
    SimpleWorker([preannotate], connection=redis_db).work(burst=True, max_jobs=2, with_scheduler=False)
    first.refresh()
    result = first.return_value()
    assert first.is_finished and result["yielded"] and result["embedded"] == 1 and result["shared"]
    # on CPU: the slice, then rot180 and antitranspose, which propagation and box prompts share
    used = {*propagation_views(propagation_settings_from_env()), *workers.segmentation.warm_prompt_views_from_env()}
    views = 1 + len(used)
    assert result["views"] == views and result["left"] == views * truth.shape[0] - 1  # each slice, then each view
    assert preannotate.count == 1  # the third part waits behind the annotator
    rest = preannotate.jobs[0]
    assert rest.func_name == WARM_EMBEDDINGS_JOB and rest.kwargs["centre"] == SEED  # same order: SEED - 1 next
    stored = list((tmp_path / "embeddings").rglob("*.npz"))
    assert len(stored) == 2  # SEED, then SEED + 1 by the second job

    monkeypatch.setattr(workers.segmentation, "_DEFAULT_SEGMENTER", None)  # another worker process
    segment_interactive(CASE, "T2", SEED, box=truth_box(truth[SEED]), data_dir=data_dir)
    assert workers.segmentation.default_segmenter().encoder_calls == 0
    segment_interactive(CASE, "T2", SEED + 3, box=truth_box(truth[SEED + 3]), data_dir=data_dir)
    assert workers.segmentation.default_segmenter().encoder_calls == 1


def test_warming_embeds_each_view_the_worker_uses_once(case, redis_db, monkeypatch) -> None:
    """Propagation's views (rot180, antitranspose) and the box prompts' views (``$STS_PROMPT_VIEWS``, and
    ``$STS_WARM_PROMPT_VIEWS``, which prompts use once warm) are all warmed, a view that several use
    only once: the slices first, then one view of all slices after another. A zoomed view is not
    warmed: its window follows the annotator's box."""
    data_dir, truth = case
    monkeypatch.setenv("STS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("STS_PROMPT_VIEWS", "flip_x,rot180,zoom")
    monkeypatch.setenv("STS_WARM_PROMPT_VIEWS", "rot180,transpose")
    monkeypatch.setattr(workers.segmentation, "_DEFAULT_SEGMENTER", None)
    Queue(INTERACTIVE_QUEUE, connection=redis_db).enqueue_call(
        SEGMENT_INTERACTIVE_JOB, kwargs={"case_id": CASE, "modality": "T2", "slice_index": 0, "box": [1, 1, 9, 9]})
    preannotate = Queue(PREANNOTATE_QUEUE, connection=redis_db)
    job = preannotate.enqueue_call(WARM_EMBEDDINGS_JOB, kwargs={"case_id": CASE, "modality": "T2", "centre": SEED})
    SimpleWorker([preannotate], connection=redis_db).work(burst=True, max_jobs=1, with_scheduler=False)
    result = job.return_value()
    # the slice; rot180 and antitranspose (propagation; rot180 for prompts too), flip_x, transpose
    assert result["views"] == 5 and result["embedded"] == 1 and result["left"] == 5 * truth.shape[0] - 1
    assert workers.segmentation.default_segmenter().views == (VIEWS["flip_x"], VIEWS["rot180"], ZOOM_VIEWS["zoom"])
    assert workers.segmentation.default_segmenter().warm_views == (VIEWS["transpose"],)
    monkeypatch.setattr(workers.segmentation, "_DEFAULT_SEGMENTER", None)


def test_the_disk_cache_is_pruned_least_recently_used_first(tmp_path, monkeypatch) -> None:
    import os

    import torch

    from core.errors import ConfigError
    from workers.embedding_cache import DiskEmbeddingCache, embedding_cache_budget_bytes

    cache = DiskEmbeddingCache(tmp_path, "v1", max_entries=8)
    for age, key in enumerate(["aa1", "bb2", "cc3"]):
        cache.put(key, torch.full((1, 4, 2, 2), float(age)))
        os.utime(cache.path_for(key), (1000 + age, 1000 + age))
    cache.clear()
    assert float(cache.get("aa1").float().mean()) == 0.0  # read from disk: now the most recent
    size = cache.path_for("aa1").stat().st_size
    assert cache.prune(2 * size) == 1
    assert not cache.path_for("bb2").exists() and cache.path_for("aa1").exists() and cache.path_for("cc3").exists()
    assert "bb2" not in cache and "cc3" in cache
    monkeypatch.setenv("STS_EMBEDDING_CACHE_GB", "0.5")
    assert embedding_cache_budget_bytes() == 500_000_000
    monkeypatch.setenv("STS_EMBEDDING_CACHE_GB", "lots")
    with pytest.raises(ConfigError, match="STS_EMBEDDING_CACHE_GB"):
        embedding_cache_budget_bytes()


def test_the_disk_cache_counts_every_model_version_and_spares_writes_in_progress(tmp_path) -> None:
    import os
    import time

    import torch

    from workers.embedding_cache import STALE_TEMP_S, DiskEmbeddingCache

    old_encoder = DiskEmbeddingCache(tmp_path, "v1")
    old_encoder.put("aa1", torch.zeros((1, 4, 2, 2)))
    os.utime(old_encoder.path_for("aa1"), (1000, 1000))
    size = old_encoder.path_for("aa1").stat().st_size
    cache = DiskEmbeddingCache(tmp_path, "v2", max_bytes=2 * size)
    cache.put("bb2", torch.ones((1, 4, 2, 2)))
    writing = cache.path_for("bb2").parent / ".cc3.tmp123.npz"  # another worker's write, under way
    writing.write_bytes(b"partial")
    left_behind = cache.path_for("bb2").parent / ".dd4.tmp456.npz"  # a killed worker's
    left_behind.write_bytes(b"partial")
    stale = time.time() - STALE_TEMP_S - 60
    os.utime(left_behind, (stale, stale))
    cache.put("ee5", torch.ones((1, 4, 2, 2)))
    assert cache.prune() == 1  # the old encoder's embedding, least recently used, though in another folder
    assert not old_encoder.path_for("aa1").exists()
    assert cache.path_for("bb2").exists() and cache.path_for("ee5").exists()
    assert writing.exists() and not left_behind.exists()


def test_the_disk_cache_prunes_itself_as_it_fills(tmp_path, monkeypatch) -> None:
    import torch

    import workers.embedding_cache
    from workers.embedding_cache import DiskEmbeddingCache

    monkeypatch.setattr(workers.embedding_cache, "PRUNE_EVERY_PUTS", 4)
    cache = DiskEmbeddingCache(tmp_path, "v1", max_entries=2)
    cache.put("aa0", torch.zeros((1, 4, 2, 2)))
    size = cache.path_for("aa0").stat().st_size
    cache.max_bytes = 3 * size
    for i in range(1, 11):
        cache.put(f"a{i:02d}", torch.full((1, 4, 2, 2), float(i)))
    files = list((tmp_path / "v1").glob("*/*.npz"))
    assert 3 <= len(files) < 3 + 4  # pruned back to 3 every 4 writes; never more than 3 + 3 between prunes


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", b"not a zip at all"])
def test_an_unreadable_cache_file_is_a_miss_and_is_replaced(tmp_path, content: bytes) -> None:
    """A power loss can leave an empty or truncated file (writes are renamed, not synced): it must not
    break the slice for good."""
    import numpy as np
    import torch

    from workers.embedding_cache import DiskEmbeddingCache

    cache = DiskEmbeddingCache(tmp_path, "v1")
    path = cache.path_for("ab1")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert cache.get("ab1") is None and not path.exists()
    cache.put("ab1", torch.full((1, 4, 2, 2), 3.0))
    cache.clear()
    assert float(cache.get("ab1").float().mean()) == 3.0
    np.savez(path.with_suffix(".tmp.npz"), embedding=np.zeros(5, np.float16))  # readable, but not an embedding
    path.with_suffix(".tmp.npz").replace(path)
    cache.clear()
    assert cache.get("ab1") is None and not path.exists()


def turn_of_propagation(project_id: int, task_id: int, case_id: str, modality: str) -> bool:
    """An RQ job that takes its turn as ``propagate_annotation`` does and says whether it would propagate."""
    from workers.jobs import _propagation_turn

    with _propagation_turn(None, project_id, task_id, case_id, modality) as latest:
        return latest


def test_an_earlier_save_of_a_task_stands_down_for_the_later_one(redis_db) -> None:
    queue = Queue(PREANNOTATE_QUEUE, connection=redis_db)
    first = queue.enqueue(turn_of_propagation, 3, 101, CASE, "T2")
    second = queue.enqueue(turn_of_propagation, 3, 101, CASE, "T2")
    redis_db.set(latest_propagation_key(3, 101), second.id)  # as the backend records the later save
    other_task = queue.enqueue(turn_of_propagation, 3, 102, CASE, "T2")  # nothing recorded: it runs
    SimpleWorker([queue], connection=redis_db).work(burst=True, with_scheduler=False)
    assert (first.return_value(), second.return_value(), other_task.return_value()) == (False, True, True)
    assert not redis_db.exists(propagation_lock_key(3, CASE, "T2"))  # released after each


def test_a_propagation_waiting_too_long_for_its_case_is_retried_not_failed(redis_db, monkeypatch) -> None:
    import workers.jobs

    monkeypatch.setattr(workers.jobs, "PROPAGATION_LOCK_WAIT_S", 0.2)
    held = redis_db.lock(propagation_lock_key(3, CASE, "T2"), timeout=60)
    assert held.acquire(blocking=False)
    queue = Queue(PREANNOTATE_QUEUE, connection=redis_db)
    job = queue.enqueue(turn_of_propagation, 3, 101, CASE, "T2", retry=Retry(max=1))
    SimpleWorker([queue], connection=redis_db).work(burst=True, max_jobs=1, with_scheduler=False)
    job.refresh()
    assert job.get_status() == "queued" and job.retries_left == 0  # a transient failure: tried again
    held.release()
    SimpleWorker([queue], connection=redis_db).work(burst=True, with_scheduler=False)
    assert job.return_value() is True


def test_a_warm_up_gives_way_to_annotators_and_propagations_not_to_other_warm_ups(redis_db) -> None:
    from core.queues import PROPAGATE_ANNOTATION_JOB
    from workers.jobs import _others_waiting

    preannotate = Queue(PREANNOTATE_QUEUE, connection=redis_db)
    preannotate.enqueue_call(WARM_EMBEDDINGS_JOB, kwargs={"case_id": "PH-OTHER", "modality": "T1"})
    assert not _others_waiting(redis_db)  # another case's warm-up waits its turn: no slice-by-slice relay
    preannotate.enqueue_call(PROPAGATE_ANNOTATION_JOB, kwargs={"case_id": CASE})
    assert _others_waiting(redis_db)
    preannotate.empty()
    Queue(INTERACTIVE_QUEUE, connection=redis_db).enqueue_call(SEGMENT_INTERACTIVE_JOB, kwargs={})
    assert _others_waiting(redis_db)
