"""RQ job functions: plain importable functions that take ids and paths and return JSON-safe dicts.

The backend enqueues them by dotted name (``core.queues``); tests call them directly, without Redis
or a worker. The model code (``workers.segmentation``, torch) is imported inside each function, so
importing this module is cheap and the backend could import it without torch (it does not).

* ``segment_interactive``: one slice and a prompt → a brush mask (an annotator is waiting).
* ``propagate_annotation``: a saved annotation → predictions on the neighbouring slices of the same
  case and modality that nobody annotated, written to Label Studio with the SDK.
* ``preannotate_case``: a whole case and modality with the automatic model → pre-annotations stored in
  Redis (``core.redis_store``), which the backend returns on "retrieve predictions". Without an
  automatic model it prepares the case for interactive use instead (``warm_embeddings``).
* ``warm_embeddings``: every slice of a case and modality through the image encoder ahead of the
  annotator, into the host's shared embedding cache, so the first box on a slice runs the decoder
  only; it gives way to waiting annotators between slices.

Images are the case store's PNG slices (``$STS_DATA_DIR/cases/<case>/slices/<MODALITY>/<z>.png``), the
very pixels the annotator sees, so prompts in Label Studio's pixel grid apply to them as they are.
Volumes are ``[z, y, x]``; masks ``[y, x]`` bool.

Failures: errors caused by the input (``core.errors.ProjectError`` other than ``LabelStudioError``)
cancel the job's remaining retries, since trying again cannot help; everything else (Label Studio or
Redis unreachable, a worker crash) is retried as the enqueuer's ``rq.Retry`` says. Failed jobs stay in
RQ's FailedJobRegistry (``sts-worker --status`` lists them).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import redis

from core.brush_rle import brush_result_to_mask, mask_to_brush_result
from core.case_store import CaseLayout, CaseStore
from core.errors import AnnotationError, InputError, LabelStudioError, ProjectError
from core.labeling import BRUSH_CONTROL, IMAGE_KEY, TUMOR_LABEL
from core.queues import (
    DEFAULT_FAILURE_TTL_S,
    DEFAULT_PREANNOTATE_TIMEOUT_S,
    DEFAULT_RESULT_TTL_S,
    INTERACTIVE_QUEUE,
    PREANNOTATE_QUEUE,
    WARM_EMBEDDINGS_JOB,
)
from core.redis_store import (
    DEFAULT_NO_MODEL_TTL_S,
    STATUS_DONE,
    STATUS_NO_MODEL,
    PreannotationStore,
    latest_propagation_key,
    propagation_lock_key,
)
from core.settings import Settings, env_flag

log = logging.getLogger(__name__)

PROPAGATED_PREFIX = "propagated-"
"""Model version prefix of predictions written by propagation (replaced, never duplicated)."""

F = TypeVar("F", bound=Callable[..., Any])


# ------------------------------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _no_retry_on_bad_input() -> Iterator[None]:
    """Inside an RQ job: an input error ends the job's retries (trying again gives the same error)."""
    try:
        yield
    except LabelStudioError:
        raise
    except ProjectError:
        from rq import get_current_job

        job = get_current_job()
        if job is not None and job.retries_left:
            log.info("job %s: input error, not retrying", job.id)
            job.retries_left = 0
        raise


def _job(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _no_retry_on_bad_input():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _case(data_dir: str | Path | None, case_id: str) -> CaseLayout:
    root = data_dir if data_dir is not None else Settings.from_env().require_data_dir()
    return CaseStore(root).case(case_id)


def read_slice(layout: CaseLayout, modality: str, slice_index: int) -> np.ndarray:
    """One PNG slice as ``[y, x]`` (uint8 or uint16, as written).

    Raises:
        InputError: no such slice, or an unreadable PNG.
    """
    import cv2

    path = layout.slice_png(modality, int(slice_index))
    if not path.is_file():
        raise InputError(f"{path}: no such slice ({layout.root.name} {modality} slice {slice_index}; import the case)")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim != 2:
        raise InputError(f"{path}: not a single-channel PNG")
    return image


def read_volume(layout: CaseLayout, modality: str) -> np.ndarray:
    """All PNG slices of one modality as ``[z, y, x]`` (the count from ``case.json``).

    Raises:
        InputError: no such case or modality, or a missing or mis-sized slice.
    """
    case = layout.read_case_json()
    if modality not in case.get("modalities", {}):
        raise InputError(f"{layout.case_json}: case {layout.root.name} has no {modality} series")
    depth = int(case["reference_grid"]["shape_zyx"][0])
    slices = [read_slice(layout, modality, z) for z in range(depth)]
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise InputError(f"{layout.slices_dir(modality)}: slices of different sizes {sorted(shapes)}")
    return np.stack(slices)


def seed_mask(brush_results: Sequence[dict[str, Any]], shape: tuple[int, int]) -> np.ndarray:
    """The union of an annotation's Tumor brush results as a bool ``[y, x]`` mask.

    Raises:
        AnnotationError: no result, a result whose size is not the slice's, or an RLE that does not decode.
    """
    if not brush_results:
        raise AnnotationError("the annotation has no brush result to propagate")
    mask = np.zeros(shape, bool)
    for result in brush_results:
        size = (result.get("original_height"), result.get("original_width"))
        if size != tuple(shape):
            raise AnnotationError(f"brush result of size {size[1]}×{size[0]} (width × height) on a slice of "
                                  f"{shape[1]}×{shape[0]}")
        mask |= brush_result_to_mask(result).astype(bool)
    return mask


def _connection(connection: redis.Redis | None) -> redis.Redis:
    """``connection``, else the running job's, else ``$REDIS_URL``."""
    if connection is not None:
        return connection
    from rq import get_current_job

    job = get_current_job()
    if job is not None:
        return job.connection
    return redis.Redis.from_url(Settings.from_env().redis_url)


@functools.lru_cache(maxsize=4)
def _label_studio(url: str, api_key: str) -> Any:
    from core.ls_client import connect

    return connect(url, api_key)


def label_studio_client() -> Any:
    """An SDK client from ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY``, one per process."""
    settings = Settings.from_env()
    return _label_studio(settings.label_studio_url, settings.require_api_key())


def _segmentation_version() -> str:
    from workers.segmentation import default_segmenter

    return str(default_segmenter().model.version)


def _elapsed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


# ------------------------------------------------------------------------------------- interactive


@_job
def segment_interactive(case_id: str, modality: str, slice_index: int, box: Sequence[float] | None = None,
                        points: Sequence[Sequence[Any]] | None = None, data_dir: str | Path | None = None
                        ) -> dict[str, Any]:
    """Segment one slice from a box and/or clicks.

    Args:
        case_id, modality, slice_index: the slice (Label Studio's task data).
        box: ``(x0, y0, x1, y1)`` in pixels (see ``backend.prompts`` for the convention).
        points: ``[(x, y, is_positive), ...]`` in pixels.
        data_dir: the data directory; default ``$STS_DATA_DIR``.

    Returns:
        ``{"rle", "height", "width", "score", "model_version", "views", "elapsed_ms", "pixels", "result"}``:
        ``rle`` is Label Studio's brush RLE of the mask, ``result`` the whole brushlabels result
        (``tumor`` → ``image``, label Tumor), ``score`` None until the model reports a confidence,
        ``views`` the names of the views averaged in with the slice (a CPU worker's warm views
        count only once warmed, so the same box can differ before and after a warm-up).

    Raises:
        InputError: no such slice, or a prompt the model cannot use (outside the image, zero size).
    """
    start = time.perf_counter()
    from workers.segmentation import default_segmenter, segment_slice
    from workers.slice_masks import as_slice
    from workers.slice_views import view_names

    image = read_slice(_case(data_dir, case_id), modality, slice_index)
    views = view_names(default_segmenter().views_for([as_slice(image)])) if box is not None else []
    mask = segment_slice(image, box=tuple(box) if box is not None else None,
                         points=[tuple(p) for p in points] if points else None)
    result = mask_to_brush_result(mask, from_name=BRUSH_CONTROL, to_name=IMAGE_KEY, label=TUMOR_LABEL)
    height, width = mask.shape
    return {
        "rle": result["value"]["rle"], "height": int(height), "width": int(width), "score": None,
        "model_version": _segmentation_version(), "views": views, "elapsed_ms": _elapsed_ms(start),
        "pixels": int(mask.sum()), "result": result,
    }


# ------------------------------------------------------------------------------------- propagation


def _record(item: Any) -> dict[str, Any]:
    return item if isinstance(item, dict) else item.model_dump()


def has_human_annotation(task: Any) -> bool:
    """True if the task has an annotation that was submitted, not skipped (an empty one counts:
    someone decided there is no tumour on that slice)."""
    annotations = getattr(task, "annotations", None) or []
    return any(not _record(a).get("was_cancelled") for a in annotations)


def case_tasks(client: Any, project_id: int, case_id: str, modality: str) -> dict[int, Any]:
    """``{slice_index: task}`` of one case and modality in a project, with annotations and predictions."""
    from core.ls_client import call

    query = {"filters": {"conjunction": "and", "items": [
        {"filter": "filter:tasks:data.case_id", "operator": "equal", "type": "String", "value": case_id},
        {"filter": "filter:tasks:data.modality", "operator": "equal", "type": "String", "value": modality}]}}
    pager = call(f"list the tasks of {case_id} {modality} in project {project_id}", client.tasks.list,
                 project=project_id, query=json.dumps(query), fields="all", page_size=500)
    tasks: dict[int, Any] = {}
    for task in pager:
        data = task.data or {}
        if data.get("case_id") == case_id and data.get("modality") == modality:  # the filter is a convenience
            tasks.setdefault(int(data.get("slice_index", -1)), task)
    return tasks


def propagation_range(seed_index: int, annotated: set[int], depth: int) -> tuple[int, int]:
    """Slices ``[first, last]`` propagation may fill: up to, not across, the nearest annotated slices.

    A human annotation on the way is a better seed for what lies beyond it.

    >>> propagation_range(10, {4, 10, 15}, 24)
    (5, 14)
    >>> propagation_range(3, {3}, 8)
    (0, 7)
    """
    below = [z for z in annotated if z < seed_index]
    above = [z for z in annotated if z > seed_index]
    return (max(below) + 1 if below else 0, min(above) - 1 if above else depth - 1)


PROPAGATION_LOCK_WAIT_S = DEFAULT_PREANNOTATE_TIMEOUT_S / 3
"""How long a propagation waits for another of the same case before it gives up and is retried."""


class PropagationBusyError(RuntimeError):
    """Another propagation of the same case held its lock too long: transient, so the job is retried
    (not a ``ProjectError``, which ends the retries)."""


@contextlib.contextmanager
def _propagation_turn(connection: redis.Redis | None, project_id: int, task_id: int, case_id: str,
                      modality: str) -> Iterator[bool]:
    """Wait for the case's propagation lock; yield whether this job is still its task's latest.

    Two preannotate workers must not propagate into the same slices at once (each would add its
    prediction before deleting the other's), and a job of an earlier save of the task must not
    write over a later one: the backend records each task's latest job (``enqueue_propagation``).
    Outside an RQ job, with no connection given, there is nothing to coordinate with: yields True.
    """
    from rq import get_current_job

    job = get_current_job()
    connection = connection if connection is not None else (job.connection if job is not None else None)
    if connection is None:
        yield True
        return
    lock = connection.lock(propagation_lock_key(project_id, case_id, modality), timeout=DEFAULT_PREANNOTATE_TIMEOUT_S,
                           blocking_timeout=PROPAGATION_LOCK_WAIT_S)
    if not lock.acquire():
        raise PropagationBusyError(f"{case_id} {modality}: another propagation held the case for "
                                   f"{PROPAGATION_LOCK_WAIT_S:g} s")
    try:
        latest = connection.get(latest_propagation_key(project_id, task_id))
        yield job is None or latest is None or latest.decode() == job.id
    finally:
        with contextlib.suppress(redis.exceptions.LockError):  # expired meanwhile: nothing to release
            lock.release()


@_job
def propagate_annotation(project_id: int, task_id: int, case_id: str, modality: str, slice_index: int,
                         brush_results: Sequence[dict[str, Any]], annotation_id: int | None = None,
                         data_dir: str | Path | None = None, client: Any = None,
                         connection: redis.Redis | None = None) -> dict[str, Any]:
    """Propagate one annotated slice to its neighbours and write them to Label Studio as predictions.

    Only tasks of the same case and modality without a human annotation get a prediction, and only
    between the nearest annotated slices (``propagation_range``). On each of them, earlier propagated
    predictions (``propagated-*``) are replaced: the new one is created first, then the old ones are
    deleted, so a crash in between leaves a duplicate that the retry removes, never a gap. A slice
    where the tumour ended loses its old propagated prediction. One propagation of a case and
    modality runs at a time, and a job whose task was saved again since stands down
    (``"superseded": True``): the later save's job propagates the newer outline.

    Args:
        project_id, task_id: where the annotation was saved.
        case_id, modality, slice_index: the annotated slice.
        brush_results: the annotation's Tumor brush results (unioned).
        annotation_id: for the log.
        data_dir: default ``$STS_DATA_DIR``.
        client: a ``label_studio_sdk.LabelStudio``; default from ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY``.
        connection: Redis for the lock; default the running job's (none outside a job: no lock).

    Returns:
        Counts: ``written``, ``cleared`` (old predictions removed where the tumour ended),
        ``deleted`` (old predictions replaced), ``skipped_annotated``, plus ``range``, ``model_version``
        and ``superseded``.
    """
    with _propagation_turn(connection, project_id, task_id, case_id, modality) as latest:
        if not latest:
            log.info("propagation of annotation %s (task %s) superseded by a later save", annotation_id, task_id)
            return {"superseded": True, "written": 0, "cleared": 0, "deleted": 0, "skipped_annotated": 0}
        return _propagate_annotation(project_id, task_id, case_id, modality, slice_index, brush_results,
                                     annotation_id, data_dir, client)


def _propagate_annotation(project_id: int, task_id: int, case_id: str, modality: str, slice_index: int,
                          brush_results: Sequence[dict[str, Any]], annotation_id: int | None,
                          data_dir: str | Path | None, client: Any) -> dict[str, Any]:
    start = time.perf_counter()
    from core.ls_client import call
    from workers.segmentation import propagate, propagation_settings_from_env

    settings = propagation_settings_from_env()  # before any work: a bad $STS_PROPAGATION_VIEWS fails at once
    volume = read_volume(_case(data_dir, case_id), modality)
    depth = volume.shape[0]
    if not 0 <= slice_index < depth:
        raise InputError(f"{case_id} {modality}: slice {slice_index} outside its {depth} slices")
    seed = seed_mask(brush_results, volume.shape[1:])
    client = client if client is not None else label_studio_client()
    tasks = case_tasks(client, project_id, case_id, modality)
    annotated = {z for z, task in tasks.items() if has_human_annotation(task)} | {slice_index}
    first, last = propagation_range(slice_index, annotated, depth)
    version = PROPAGATED_PREFIX + _segmentation_version()
    counts = {"superseded": False, "written": 0, "cleared": 0, "deleted": 0, "skipped_annotated": 0,
              "range": [first, last], "model_version": version, "seed_pixels": int(seed.sum())}
    if not seed.any() or first == last:
        counts["elapsed_ms"] = _elapsed_ms(start)
        return counts
    masks = np.asarray(propagate(volume[first:last + 1], slice_index - first, seed, settings=settings), dtype=bool)

    tasks = case_tasks(client, project_id, case_id, modality)  # fresh: someone may have annotated meanwhile
    for z in range(first, last + 1):
        task = tasks.get(z)
        if z == slice_index or task is None:
            continue
        if has_human_annotation(task):
            counts["skipped_annotated"] += 1
            continue
        old = [_record(p) for p in (getattr(task, "predictions", None) or [])
               if (_record(p).get("model_version") or "").startswith(PROPAGATED_PREFIX)]
        mask = masks[z - first]
        if mask.any():
            result = mask_to_brush_result(mask, from_name=BRUSH_CONTROL, to_name=IMAGE_KEY, label=TUMOR_LABEL)
            call(f"add a propagated prediction to task {task.id}", client.predictions.create, task=task.id,
                 result=[result], model_version=version)
            counts["written"] += 1
        elif old:
            counts["cleared"] += 1
        for record in old:
            call(f"delete prediction {record['id']}", client.predictions.delete, id=record["id"])
            counts["deleted"] += 1
    counts["elapsed_ms"] = _elapsed_ms(start)
    log.info("propagated annotation %s (task %s, %s %s slice %s) over slices %d-%d: %s", annotation_id, task_id,
             case_id, modality, slice_index, first, last, counts)
    return counts


# ---------------------------------------------------------------------------------- pre-annotation


@_job
def preannotate_case(case_id: str, modality: str, model_version: str, data_dir: str | Path | None = None,
                     connection: redis.Redis | None = None) -> dict[str, Any]:
    """Segment a whole case and modality with the automatic model; store the result for the backend.

    All slices' predictions (empty results where the model found no tumour) and the status are written
    in one Redis transaction. Without an automatic model the status ``no_model`` is stored for an hour
    (``DEFAULT_NO_MODEL_TTL_S``), so "retrieve predictions" does not enqueue the case again meanwhile,
    and the job succeeds with that status instead of failing again and again; it then warms the case's
    embeddings for interactive use (``warm_embeddings``; ``$STS_WARM_EMBEDDINGS=0`` turns that off).

    Args:
        model_version: the version the backend reported in ``/setup``; predictions are stored under it.
        connection: Redis; default the running job's, else ``$REDIS_URL``.

    Returns:
        ``{"status": "done", "slices", "slices_with_tumour", ...}`` or ``{"status": "no_model", "reason", "warm"}``.
    """
    start = time.perf_counter()
    from workers.segmentation import NoAutomaticModelError, segment_volume

    store = PreannotationStore(_connection(connection))
    layout = _case(data_dir, case_id)
    volume = read_volume(layout, modality)
    spacing = layout.read_case_json()["reference_grid"].get("spacing_xyz_mm")
    base = {"case_id": case_id, "modality": modality, "model_version": model_version}
    try:
        masks = np.asarray(segment_volume(volume, spacing=spacing), dtype=bool)
    except NoAutomaticModelError as exc:
        status = {**base, "status": STATUS_NO_MODEL, "reason": str(exc)}
        store.set_status(model_version, case_id, modality, status, ttl_s=DEFAULT_NO_MODEL_TTL_S)
        warmed = _warm(volume, case_id, modality, data_dir, connection) if warming_enabled() else None
        return {**status, "warm": warmed, "elapsed_ms": _elapsed_ms(start)}
    if masks.shape != volume.shape:
        raise ProjectError(f"segment_volume returned shape {masks.shape} for a volume of shape {volume.shape}")
    predictions = {}
    for z, mask in enumerate(masks):
        result = [mask_to_brush_result(mask, from_name=BRUSH_CONTROL, to_name=IMAGE_KEY, label=TUMOR_LABEL)]
        predictions[z] = {"result": result if mask.any() else [], "score": None}
    status = {**base, "status": STATUS_DONE, "slices": len(masks),
              "slices_with_tumour": int(masks.reshape(len(masks), -1).any(axis=1).sum())}
    store.write_case(model_version, case_id, modality, predictions, status)
    return {**status, "elapsed_ms": _elapsed_ms(start)}


# ------------------------------------------------------------------------------ embedding warm-up


def middle_out(count: int, centre: int | None = None) -> list[int]:
    """Slice indices from ``centre`` (default the middle) outwards, alternating up and down.

    Annotators start where the tumour is largest, usually near the middle of the imaged range.

    >>> middle_out(5)
    [2, 3, 1, 4, 0]
    """
    centre = count // 2 if centre is None else min(max(int(centre), 0), count - 1)
    order = [centre]
    for step in range(1, count):
        order += [z for z in (centre + step, centre - step) if 0 <= z < count]
    return order


WARM_ENV = "STS_WARM_EMBEDDINGS"
"""Set to 0/false/off to stop ``preannotate_case`` from warming embeddings when no automatic model exists."""


def warming_enabled() -> bool:
    """``$STS_WARM_EMBEDDINGS`` (default on; a value that is not an on/off word is a ``ConfigError``)."""
    return env_flag(WARM_ENV)


def _others_waiting(connection: redis.Redis | None) -> bool:
    """Anyone queued for this worker: an annotator (interactive) or a propagation / whole-case job.

    Another case's warm-up is not a reason to give way: two warm-ups yielding to each other would
    take turns one slice at a time, each turn re-reading its case (they run one after the other).
    """
    from rq import Queue
    from rq.job import Job

    conn = _connection(connection)
    if Queue(INTERACTIVE_QUEUE, connection=conn).count > 0:
        return True
    waiting = Queue(PREANNOTATE_QUEUE, connection=conn).get_job_ids(0, 63)
    return any(job is not None and job.func_name != WARM_EMBEDDINGS_JOB
               for job in Job.fetch_many(waiting, connection=conn))


def _warm(volume: np.ndarray, case_id: str, modality: str, data_dir: str | Path | None,
          connection: redis.Redis | None, centre: int | None = None) -> dict[str, Any]:
    """Embed ``volume``'s uncached slices; inside an RQ job, make way for other jobs and enqueue the rest.

    Slices go through the encoder one at a time on CPU (one slice is the longest an annotator waits
    behind this job) and 16 at a time on a GPU. The slices as they are come first (a click needs
    them), then each other view that propagation or the prompts use (``$STS_PROPAGATION_VIEWS``: rot180 and
    antitranspose by default; ``$STS_PROMPT_VIEWS``; ``$STS_WARM_PROMPT_VIEWS``, which box prompts use only
    once warmed), one view of every slice after another.
    When a job waits on the interactive or pre-annotation queue (an annotator, a propagation), or
    half the job's time limit has passed, the rest is enqueued as a new ``warm_embeddings`` job at
    the back of the pre-annotation queue.
    """
    from rq import get_current_job

    from workers.embedding_cache import DiskEmbeddingCache
    from workers.propagation import propagation_views
    from workers.segmentation import default_segmenter, propagation_settings_from_env
    from workers.slice_views import SliceView

    segmenter = default_segmenter()
    batch = 16 if segmenter.model.device.type == "cuda" else 1
    order = middle_out(len(volume), centre)
    used = propagation_views(propagation_settings_from_env()) + segmenter.views + segmenter.warm_views
    # a zoomed view's window follows the annotator's box: nothing of it can be computed ahead
    other_views = [view for view in dict.fromkeys(used) if view.zoom is None]
    views = [(z, None) for z in order] + [(z, other) for other in other_views for z in order]

    def view(z: int, other: SliceView | None) -> np.ndarray:
        return volume[z] if other is None else other.image(volume[z])

    pending = [v for v in views if segmenter.prepare(view(*v))[3] not in segmenter.cache]
    in_job = get_current_job() is not None
    deadline = time.monotonic() + DEFAULT_PREANNOTATE_TIMEOUT_S / 2
    done, yielded = 0, False
    while pending:
        if in_job and done and (time.monotonic() > deadline or _others_waiting(connection)):
            from rq import Queue

            Queue(PREANNOTATE_QUEUE, connection=_connection(connection)).enqueue(
                WARM_EMBEDDINGS_JOB, case_id, modality, data_dir=None if data_dir is None else str(data_dir),
                centre=order[0], job_timeout=DEFAULT_PREANNOTATE_TIMEOUT_S, result_ttl=DEFAULT_RESULT_TTL_S,
                failure_ttl=DEFAULT_FAILURE_TTL_S)
            yielded = True
            break
        chunk, pending = pending[:batch], pending[batch:]
        segmenter.embed_many([view(*v) for v in chunk], batch_size=batch)
        done += len(chunk)
    pruned = 0
    if isinstance(segmenter.cache, DiskEmbeddingCache) and done:
        pruned = segmenter.cache.prune()
    return {"slices": len(volume), "views": 1 + len(other_views), "embedded": done, "left": len(pending),
            "yielded": yielded, "pruned": pruned,
            "shared": isinstance(segmenter.cache, DiskEmbeddingCache)}


@_job
def warm_embeddings(case_id: str, modality: str, data_dir: str | Path | None = None, centre: int | None = None,
                    connection: redis.Redis | None = None) -> dict[str, Any]:
    """Run a case's slices through the image encoder before anyone clicks on them.

    Without ``$STS_EMBEDDING_CACHE`` the embeddings stay in this worker's memory only (still useful
    with a single worker). Between slices the job looks for waiting jobs: if an annotator or a
    propagation is waiting, it enqueues itself again (from the next slice) behind them and returns.

    Args:
        centre: the slice to start from (then outwards); default the middle one.

    Returns:
        ``{"slices", "views", "embedded", "left", "yielded", "pruned", "shared", "elapsed_ms"}``:
        ``views`` counts the views of each slice warmed (1: the slices alone; 2: and mirrored, ...);
        ``embedded`` and ``left`` count views of slices.
    """
    start = time.perf_counter()
    volume = read_volume(_case(data_dir, case_id), modality)
    return {"case_id": case_id, "modality": modality, **_warm(volume, case_id, modality, data_dir, connection, centre),
            "elapsed_ms": _elapsed_ms(start)}
