"""What the backend does for each Label Studio call, without Flask: parse, enqueue, wait, format.

``SegmentationBackend`` answers the label-studio-ml protocol (``/setup``, ``/predict``, ``/webhook``,
``/health``; payloads in ``shared/docs/label-studio.md``):

* ``setup`` checks the labeling config names our controls and reports the automatic model version.
  Every prediction the backend returns carries exactly that version (Label Studio duplicates
  predictions whose version differs from what ``/setup`` said).
* ``predict`` with a prompt in ``params.context`` (smart rectangle / keypoints) enqueues
  ``segment_interactive`` on the ``interactive`` queue and waits for it: one brush result back.
* ``predict`` without a prompt ("retrieve predictions", up to thousands of tasks in one call) never
  waits: it returns the pre-annotations the workers stored for the current version, and enqueues one
  ``preannotate_case`` job per case and modality that has none. A task whose pre-annotation is not
  ready gets an empty list: Label Studio then stores nothing for it and asks again next time. (An
  empty ``{"result": []}`` would be stored as a prediction of the current version, and Label Studio
  would never ask for that task again.)
* ``webhook`` turns ``ANNOTATION_CREATED``/``ANNOTATION_UPDATED`` into a ``propagate_annotation`` job
  and counts annotations per project; other actions are acknowledged and ignored.

Why not ``label_studio_ml.api.init_app`` and ``LabelStudioMLBase``: version 1.0.9 keeps a module-level
Flask app and class-level model state (one configuration per process, untestable side by side);
importing ``label_studio_ml.model`` imports torch when it is installed and sets multiprocessing's
start method at import time; its ``/setup`` derives ``model_version`` from job folders (``INITIAL``),
its webhook route answers a payload without ``action`` with a 500 and forks a process per event.
So the backend speaks the same wire protocol (same routes, same reply shapes) with its own small app
(``backend.app``), and keeps torch and ``workers`` out of its process.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from backend.errors import LabelConfigError, PayloadError, WebhookAuthError, WorkerFailedError
from backend.prompts import Prompt, SliceRef, parse_prompt, slice_ref
from backend.queueing import JobQueues, redis_guard
from backend.settings import BackendSettings
from core.labeling import BRUSH_CONTROL, IMAGE_KEY, TUMOR_LABEL
from core.redis_store import PreannotationStore, count_annotation, current_model_version

log = logging.getLogger(__name__)

WEBHOOK_SECRET_HEADER = "X-STS-Webhook-Secret"
ANNOTATION_ACTIONS = {"ANNOTATION_CREATED": "created", "ANNOTATION_UPDATED": "updated"}


class SegmentationBackend:
    """The backend's behaviour, one instance per app; connections are passed in.

    Args:
        settings: the backend's settings.
        queues: Redis clients and job submission.
    """

    def __init__(self, settings: BackendSettings, queues: JobQueues) -> None:
        self.settings = settings
        self.queues = queues
        self.store = PreannotationStore(queues.connection)

    # -------------------------------------------------------------------------------------- health

    def model_version(self) -> str:
        with redis_guard(self.queues.connection):
            return current_model_version(self.queues.connection, self.settings.model_version)

    def health(self) -> dict[str, Any]:
        """``{"status": "UP", ...}``; raises ``QueueUnavailableError`` (503) when Redis is down."""
        with redis_guard(self.queues.connection):
            self.queues.connection.ping()
        return {"status": "UP", "model_class": type(self).__name__, "redis": "up", "v2": True}

    # --------------------------------------------------------------------------------------- setup

    def setup(self, payload: Any) -> dict[str, Any]:
        """Answer ``/setup``: check the labeling config (when sent) and report the model version."""
        if not isinstance(payload, Mapping):
            raise PayloadError(f"/setup expects a JSON object, got {type(payload).__name__}")
        schema = payload.get("schema")
        if schema is not None:
            if not isinstance(schema, str):
                raise PayloadError(f"/setup: schema must be a string, not {type(schema).__name__}")
            check_label_config(schema)
        return {"model_version": self.model_version()}

    # ------------------------------------------------------------------------------------- predict

    def predict(self, payload: Any) -> dict[str, Any]:
        """Answer ``/predict``: interactive when ``params.context`` holds a prompt, else stored pre-annotations."""
        if not isinstance(payload, Mapping):
            raise PayloadError(f"/predict expects a JSON object, got {type(payload).__name__}")
        tasks = payload.get("tasks")
        if not isinstance(tasks, list):
            raise PayloadError("/predict: 'tasks' must be a list of tasks")
        params = payload.get("params") or {}
        if not isinstance(params, Mapping):
            raise PayloadError(f"/predict: 'params' must be an object, got {type(params).__name__}")
        prompt = parse_prompt(params.get("context"))
        if prompt is not None:
            if len(tasks) != 1:
                raise PayloadError(f"/predict: an interactive request needs exactly one task, got {len(tasks)}")
            return self.predict_interactive(slice_ref(tasks[0]), prompt)
        return self.predict_stored([slice_ref(task) for task in tasks])

    def predict_interactive(self, ref: SliceRef, prompt: Prompt) -> dict[str, Any]:
        """Segment one slice from a prompt on a worker; one brush result with score and model version."""
        version = self.model_version()
        value = self.queues.run_interactive({
            "case_id": ref.case_id, "modality": ref.modality, "slice_index": ref.slice_index,
            "box": list(prompt.box) if prompt.box else None,
            "points": [list(p) for p in prompt.points] or None,
        }, self.settings.interactive_wait_s)
        result = value.get("result")
        if not isinstance(result, dict):
            raise WorkerFailedError("the worker's reply has no brush 'result'")
        if (value.get("width"), value.get("height")) != (prompt.width, prompt.height):
            raise WorkerFailedError(
                f"{ref.case_id} {ref.modality} slice {ref.slice_index} is {value.get('width')}×{value.get('height')} "
                f"in the case store but {prompt.width}×{prompt.height} in Label Studio: re-import the case",
                http_status=422,
            )
        prediction = {"result": [result], "score": value.get("score"), "model_version": version}
        return {"results": [prediction], "model_version": version}

    def predict_stored(self, refs: Sequence[SliceRef]) -> dict[str, Any]:
        """Stored pre-annotations for many tasks; one ``preannotate_case`` job per case lacking them.

        Never waits for a model. A task without a stored pre-annotation gets ``[]`` (see the module
        docstring for why not an empty result).
        """
        version = self.model_version()
        with redis_guard(self.queues.connection):
            found, statuses = self.store.lookup(version, [(r.case_id, r.modality, r.slice_index) for r in refs])
        enqueued = [key for key, status in statuses.items()
                    if status is None and self.queues.enqueue_preannotate(version, *key)]
        if enqueued:
            log.info("enqueued pre-annotation of %d case/modality pair(s) with model %s: %s", len(enqueued), version,
                     ", ".join(f"{c} {m}" for c, m in enqueued))
        results: list[Any] = []
        for ref in refs:
            stored = found.get((ref.case_id, ref.modality, ref.slice_index))
            if stored is None:
                results.append([])
            else:
                results.append({"result": stored.get("result", []), "score": stored.get("score"),
                                "model_version": version})
        return {"results": results, "model_version": version}

    # ------------------------------------------------------------------------------------- webhook

    def check_webhook_secret(self, secret: str | None) -> None:
        """Raise ``WebhookAuthError`` when ``STS_WEBHOOK_SECRET`` is set and ``secret`` differs (constant time)."""
        expected = self.settings.webhook_secret
        if expected is not None and not hmac.compare_digest((secret or "").encode(), expected.encode()):
            raise WebhookAuthError(f"/webhook: missing or wrong {WEBHOOK_SECRET_HEADER} header")

    def webhook(self, payload: Any, secret: str | None = None) -> dict[str, Any]:
        """Answer ``/webhook``: enqueue propagation of a saved annotation; ignore other actions.

        Args:
            payload: the webhook body.
            secret: the ``X-STS-Webhook-Secret`` header, checked when ``STS_WEBHOOK_SECRET`` is set.

        Raises:
            WebhookAuthError: a secret is configured and ``secret`` does not match it.
            PayloadError, TaskDataError: a malformed annotation event.
        """
        self.check_webhook_secret(secret)
        if not isinstance(payload, Mapping):
            raise PayloadError(f"/webhook expects a JSON object, got {type(payload).__name__}")
        action = payload.get("action")
        if not isinstance(action, str) or not action:
            raise PayloadError("/webhook: no 'action' in the payload")
        if action not in ANNOTATION_ACTIONS:
            return {"status": "ignored", "action": action}
        annotation, task = payload.get("annotation"), payload.get("task")
        if not isinstance(annotation, Mapping) or not isinstance(task, Mapping):
            raise PayloadError(f"/webhook {action}: 'annotation' and 'task' must be objects")
        task_id, project_id = task.get("id"), _project_id(payload, task)
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise PayloadError(f"/webhook {action}: task id {task_id!r} is not an integer")
        ref = slice_ref(task)
        regions = annotation.get("result") or []
        if not isinstance(regions, list):
            raise PayloadError(f"/webhook {action}: annotation.result must be a list")
        with redis_guard(self.queues.connection):
            count_annotation(self.queues.connection, project_id, ANNOTATION_ACTIONS[action])
        if annotation.get("was_cancelled"):
            return {"status": "ignored", "action": action, "reason": "the task was skipped"}
        brushes = [r for r in regions if _is_tumour_brush(r)]
        if not brushes:
            return {"status": "ignored", "action": action, "reason": f"no {TUMOR_LABEL} brush stroke to propagate"}
        job_id = self.queues.enqueue_propagation({
            "project_id": project_id, "task_id": task_id, "case_id": ref.case_id, "modality": ref.modality,
            "slice_index": ref.slice_index, "brush_results": brushes, "annotation_id": annotation.get("id"),
        })
        return {"status": "queued", "action": action, "job_id": job_id}


def _project_id(payload: Mapping[str, Any], task: Mapping[str, Any]) -> int:
    project = payload.get("project")
    candidate = project.get("id") if isinstance(project, Mapping) else project
    if candidate is None:
        candidate = task.get("project")
    if isinstance(candidate, bool) or not isinstance(candidate, int):
        raise PayloadError(f"/webhook: project id {candidate!r} is not an integer")
    return candidate


def _is_tumour_brush(region: Any) -> bool:
    if not isinstance(region, Mapping) or region.get("type") != "brushlabels":
        return False
    if region.get("from_name") != BRUSH_CONTROL:
        return False
    value = region.get("value")
    labels = value.get("brushlabels") if isinstance(value, Mapping) else None
    return isinstance(labels, list) and TUMOR_LABEL in labels


# ``[^<>]*``, not ``[^>]*``: a tag that never closes must not make the search quadratic in the schema's length.
_CONTROL = r"<{tag}\b[^<>]*\bname\s*=\s*[\"']{name}[\"']"


def check_label_config(schema: str) -> None:
    """Refuse a labeling config without the controls the backend answers for.

    Raises:
        LabelConfigError: no ``BrushLabels`` named ``tumor`` or no ``Image`` named ``image``.
    """
    missing = [f"<{tag} name=\"{name}\">" for tag, name in (("BrushLabels", BRUSH_CONTROL), ("Image", IMAGE_KEY))
               if not re.search(_CONTROL.format(tag=tag, name=re.escape(name)), schema)]
    if missing:
        raise LabelConfigError(f"the labeling config lacks {' and '.join(missing)}: use core.labeling.LABEL_CONFIG")
