"""Errors the backend answers Label Studio with, each carrying its HTTP status.

::

    ProjectError (core.errors)
    └── BackendError                  http_status 500
        ├── PayloadError              400  malformed JSON or a missing/ill-typed key
        │   ├── PromptError           422  a prompt the backend cannot use (outside the image, zero size, rotated)
        │   ├── TaskDataError         422  a task that is not one of ours (no case_id, bad slice_index)
        │   └── LabelConfigError      422  a labeling config without our controls
        ├── WebhookAuthError          403  wrong or missing ``X-STS-Webhook-Secret``
        ├── QueueUnavailableError     503  Redis cannot be reached, or no worker listens
        ├── WorkerTimeoutError        504  no result within the deadline
        └── WorkerFailedError         502  the worker ran the job and it failed (422 for bad input)

The Flask app turns each into ``{"error": "<TypeName>", "reason": "<message>"}`` with its status;
nothing a caller sends can produce a 500.
"""

from __future__ import annotations

from core.errors import ProjectError


class BackendError(ProjectError):
    """Base class: an error with the HTTP status the backend answers with."""

    http_status = 500


class PayloadError(BackendError):
    """The request body is not what Label Studio sends (missing key, wrong type)."""

    http_status = 400


class PromptError(PayloadError):
    """An interactive prompt cannot be used: outside the image, zero size, rotated, no prompt at all."""

    http_status = 422


class TaskDataError(PayloadError):
    """A task's data does not name one of our slices (no ``case_id``, bad ``modality`` or ``slice_index``)."""

    http_status = 422


class LabelConfigError(PayloadError):
    """The project's labeling config lacks a control the backend answers for."""

    http_status = 422


class WebhookAuthError(BackendError):
    """A webhook without the shared secret the backend was configured with."""

    http_status = 403


class QueueUnavailableError(BackendError):
    """Redis is unreachable, or no worker listens on the queue an annotator is waiting on."""

    http_status = 503


class WorkerTimeoutError(BackendError):
    """The worker did not answer within the deadline."""

    http_status = 504


class WorkerFailedError(BackendError):
    """The job ran and raised; ``http_status`` is 422 when the worker rejected the input."""

    http_status = 502

    def __init__(self, message: str, http_status: int = 502) -> None:
        super().__init__(message)
        self.http_status = http_status
