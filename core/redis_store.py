"""What the backend and the workers keep in Redis besides RQ's own keys: one place for key names and formats.

Workers write, the backend reads (it never imports ``workers``; both import this module, which takes a
``redis.Redis`` connection as an argument and imports nothing beyond the standard library). Keys:

==============================================  ===========================================================
key                                             content
==============================================  ===========================================================
``sts:model:current``                           the automatic model version the workers serve (string);
                                                ``/setup`` reports it unless ``STS_MODEL_VERSION`` pins one
``sts:pre:<version>:<case>:<modality>``         hash ``slice_index -> JSON {"result": [...], "score": s}``:
                                                automatic pre-annotations of one case and modality
``sts:pre-status:<version>:<case>:<modality>``  JSON ``{"status": "done" | "no_model" | ..., "reason", "at"}``
``sts:annotations:<project id>``                hash ``created`` / ``updated``: annotation events counted
                                                from the webhook (the retraining trigger reads and resets it)
``sts:worker:<worker name>``                    hash describing a running worker (device, models, host)
==============================================  ===========================================================

A case's pre-annotations and its status are written in one MULTI/EXEC transaction, so a reader sees
all of a case or nothing; a worker killed before that leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

DEFAULT_MODEL_VERSION = "sts-initial"
"""Automatic model version reported before any model is promoted (no U-Net yet)."""
MODEL_VERSION_KEY = "sts:model:current"

STATUS_DONE = "done"
STATUS_NO_MODEL = "no_model"

DEFAULT_PREANNOTATION_TTL_S = 90 * 24 * 3600
"""Stored pre-annotations expire after 90 days unless the case is pre-annotated again."""
DEFAULT_NO_MODEL_TTL_S = 3600
"""A "no automatic model" answer is believed for an hour, then the case is tried again."""

_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def preannotation_key(version: str, case_id: str, modality: str) -> str:
    return f"sts:pre:{version}:{case_id}:{modality}"


def preannotation_status_key(version: str, case_id: str, modality: str) -> str:
    return f"sts:pre-status:{version}:{case_id}:{modality}"


def annotation_counter_key(project_id: int | str) -> str:
    return f"sts:annotations:{project_id}"


def worker_info_key(worker_name: str) -> str:
    return f"sts:worker:{worker_name}"


LATEST_PROPAGATION_TTL_S = 7 * 24 * 3600
"""How long the backend remembers a task's latest propagation job (longer than any job waits)."""


def latest_propagation_key(project_id: int | str, task_id: int | str) -> str:
    """The id of the propagation job of a task's latest save: an older job for that task stands down."""
    return f"sts:propagation:latest:{project_id}:{task_id}"


def propagation_lock_key(project_id: int | str, case_id: str, modality: str) -> str:
    """One propagation at a time per case and modality, so that two never write the same slices."""
    return f"sts:propagation:lock:{project_id}:{case_id}:{modality}"


def preannotate_job_id(version: str, case_id: str, modality: str) -> str:
    """RQ job id of a case's pre-annotation: the same inputs give the same id (enqueued once).

    >>> preannotate_job_id("unet.v2", "STS-0001", "T2")[:30]
    'preannotate-STS-0001-T2-unet_v'
    """
    digest = hashlib.sha1(f"{version}\0{case_id}\0{modality}".encode()).hexdigest()[:12]
    readable = _UNSAFE_ID_CHARS.sub("_", f"{case_id}-{modality}-{version}")[:80]
    return f"preannotate-{readable}-{digest}"


def current_model_version(connection: redis.Redis, pinned: str | None = None) -> str:
    """The automatic model version to report: ``pinned``, else the workers' ``sts:model:current``, else
    ``DEFAULT_MODEL_VERSION``. Raises ``redis.RedisError`` when Redis is down (and nothing is pinned)."""
    if pinned:
        return pinned
    raw = connection.get(MODEL_VERSION_KEY)
    return raw.decode() if raw else DEFAULT_MODEL_VERSION


class PreannotationStore:
    """Automatic pre-annotations per case, modality and model version.

    Args:
        connection: a ``redis.Redis`` (bytes responses).
    """

    def __init__(self, connection: redis.Redis) -> None:
        self.connection = connection

    def write_case(self, version: str, case_id: str, modality: str, predictions: Mapping[int, Mapping[str, Any]],
                   status: Mapping[str, Any], ttl_s: int = DEFAULT_PREANNOTATION_TTL_S) -> None:
        """Replace a case's pre-annotations and set its status, atomically.

        Args:
            predictions: ``{slice_index: {"result": [...], "score": s}}``; a slice with an empty result
                means "the model found no tumour here" and is stored too.
            status: JSON-safe dict with at least ``"status"``.
        """
        key = preannotation_key(version, case_id, modality)
        status_key = preannotation_status_key(version, case_id, modality)
        with self.connection.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if predictions:
                pipe.hset(key, mapping={str(int(z)): json.dumps(p, separators=(",", ":"))
                                        for z, p in predictions.items()})
                pipe.expire(key, ttl_s)
            pipe.set(status_key, json.dumps(_stamped(status)), ex=ttl_s)
            pipe.execute()

    def set_status(self, version: str, case_id: str, modality: str, status: Mapping[str, Any],
                   ttl_s: int = DEFAULT_NO_MODEL_TTL_S) -> None:
        """Record a status without predictions (e.g. ``no_model``), for ``ttl_s`` seconds."""
        self.connection.set(preannotation_status_key(version, case_id, modality), json.dumps(_stamped(status)),
                            ex=ttl_s)

    def status(self, version: str, case_id: str, modality: str) -> dict[str, Any] | None:
        raw = self.connection.get(preannotation_status_key(version, case_id, modality))
        return json.loads(raw) if raw else None

    def lookup(self, version: str, slices: Iterable[tuple[str, str, int]]
               ) -> tuple[dict[tuple[str, str, int], dict[str, Any]], dict[tuple[str, str], dict[str, Any] | None]]:
        """Stored predictions and statuses for many slices in one round trip.

        Args:
            slices: ``(case_id, modality, slice_index)`` triples.

        Returns:
            ``({(case, modality, z): prediction}, {(case, modality): status or None})``; slices without a
            stored prediction are absent from the first dict.
        """
        groups: dict[tuple[str, str], list[int]] = {}
        for case_id, modality, z in slices:
            groups.setdefault((case_id, modality), []).append(int(z))
        order = list(groups)
        with self.connection.pipeline(transaction=False) as pipe:
            for case_id, modality in order:
                indices = sorted(set(groups[(case_id, modality)]))
                groups[(case_id, modality)] = indices
                pipe.hmget(preannotation_key(version, case_id, modality), [str(z) for z in indices])
                pipe.get(preannotation_status_key(version, case_id, modality))
            replies = pipe.execute()
        found: dict[tuple[str, str, int], dict[str, Any]] = {}
        statuses: dict[tuple[str, str], dict[str, Any] | None] = {}
        for n, (case_id, modality) in enumerate(order):
            values, raw_status = replies[2 * n], replies[2 * n + 1]
            statuses[(case_id, modality)] = json.loads(raw_status) if raw_status else None
            for z, raw in zip(groups[(case_id, modality)], values, strict=True):
                if raw is not None:
                    found[(case_id, modality, z)] = json.loads(raw)
        return found, statuses


def count_annotation(connection: redis.Redis, project_id: int | str, field: str) -> int:
    """Add one to the project's ``created``/``updated`` annotation counter; returns the new count."""
    return int(connection.hincrby(annotation_counter_key(project_id), field, 1))


def annotation_counts(connection: redis.Redis, project_id: int | str) -> dict[str, int]:
    raw = connection.hgetall(annotation_counter_key(project_id))
    return {k.decode(): int(v) for k, v in raw.items()}


def _stamped(status: Mapping[str, Any]) -> dict[str, Any]:
    return {**status, "at": round(time.time(), 3)}
