"""Putting a case's slices into Label Studio as tasks, idempotently.

One task per slice per modality, keyed on ``(case_id, modality, slice_index)``: a re-import
updates tasks whose data changed and creates none that exist. Existing contours become
predictions (``model_version = imported-<ROI>``) on the slices they cover; a re-import
replaces only those predictions, never annotations or other models' predictions.

PNGs reach Label Studio either from a shared disk (``local-files``: the data directory
lies under Label Studio's local-files document root) or by upload.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
from label_studio_sdk import LabelStudio

from core.brush_rle import mask_to_brush_result
from core.case_store import CaseLayout
from core.errors import ConfigError, LabelStudioError
from core.geometry import read_nifti
from core.labeling import BRUSH_CONTROL, IMAGE_KEY, LABEL_CONFIG, roi_label
from core.ls_client import call as _call
from core.ls_client import find_project

log = logging.getLogger(__name__)

IMPORTED_PREFIX = "imported-"
IMPORT_BATCH = 200
"""Tasks per import request: large enough to be quick, small enough to stay under request limits."""


@dataclass
class SyncResult:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    predictions_written: int = 0
    predictions_deleted: int = 0


def ensure_project(client: LabelStudio, title: str) -> int:
    """The id of the project called ``title``, created with our labeling config if missing."""
    existing = find_project(client, title)
    if existing is not None:
        return existing
    project = _call(f"create project {title!r}", client.projects.create, title=title, label_config=LABEL_CONFIG,
                    description="Soft-tissue tumour segmentation on axial MRI (imported by import-patient)")
    return int(project.id)


def _image_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class TaskSync:
    """Creates and updates one case's tasks in one project."""

    def __init__(self, client: LabelStudio, project_id: int, *, serving: str = "local-files",
                 document_root: Path | None = None, base_url: str = "", api_key: str = "") -> None:
        self.client = client
        self.project_id = project_id
        self.serving = serving
        self.document_root = Path(document_root).resolve() if document_root else None
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key

    # -- images ---------------------------------------------------------------------------
    def ensure_local_storage(self, folder: Path) -> None:
        """Register ``folder`` as local-files storage (Label Studio serves nothing outside one)."""
        folder = folder.resolve()
        if self.document_root is None:
            raise ConfigError("local-files serving needs LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (the folder Label "
                              "Studio serves from), or use STS_IMAGE_SERVING=upload")
        if not folder.is_relative_to(self.document_root):
            raise ConfigError(f"{folder}: the data directory must lie under Label Studio's local-files document "
                              f"root {self.document_root}, or use STS_IMAGE_SERVING=upload")
        for storage in _call("list local storages", self.client.import_storage.local.list, project=self.project_id):
            if storage.path and Path(storage.path).resolve() == folder:
                return
        _call(f"add local-files storage {folder}", self.client.import_storage.local.create,
              project=self.project_id, path=str(folder), title="case store", use_blob_urls=True,
              description="PNG slices written by import-patient")

    def local_url(self, png: Path) -> str:
        assert self.document_root is not None
        relative = png.resolve().relative_to(self.document_root).as_posix()
        return f"/data/local-files/?d={quote(relative)}"

    def upload(self, pngs: list[Path]) -> list[str]:
        """Upload PNGs without creating tasks; returns their ``/data/upload/...`` URLs in order."""
        urls: list[str] = []
        headers = {"Authorization": f"Token {self.api_key}"}
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=120) as http:
            for start in range(0, len(pngs), 50):
                chunk = pngs[start:start + 50]
                # Label Studio reads request.FILES by field name: one distinct field per file.
                names = [f"{p.parent.parent.parent.name}_{p.parent.name}_{p.name}" for p in chunk]
                files = [(name, (name, p.read_bytes(), "image/png")) for name, p in zip(names, chunk, strict=True)]
                try:
                    response = http.post(f"/api/projects/{self.project_id}/import",
                                         params={"commit_to_project": "false"}, files=files)
                    response.raise_for_status()
                    ids = response.json()["file_upload_ids"]
                    listed = http.get(f"/api/projects/{self.project_id}/file-uploads",
                                      params={"ids": json.dumps(ids)})
                    listed.raise_for_status()
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    raise LabelStudioError(f"uploading {len(chunk)} slices to project {self.project_id} failed: "
                                           f"{exc}") from exc
                by_id = {item["id"]: item["file"] for item in listed.json()}
                urls.extend(f"/data/{by_id[i]}" for i in ids)
        return urls

    # -- tasks ----------------------------------------------------------------------------
    def existing_tasks(self, case_id: str) -> dict[tuple[str, int], Any]:
        query = {"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:data.case_id", "operator": "equal", "type": "String", "value": case_id}]}}
        pager = _call("list tasks", self.client.tasks.list, project=self.project_id, query=json.dumps(query),
                      fields="all", page_size=500)
        tasks = {}
        for task in pager:
            data = task.data or {}
            if data.get("case_id") != case_id:  # the filter is a convenience; the key is what counts
                continue
            key = (str(data.get("modality")), int(data.get("slice_index", -1)))
            if key in tasks:
                log.warning("duplicate task for %s %s slice %s (ids %s, %s); keeping the first", case_id, *key,
                            tasks[key].id, task.id)
                continue
            tasks[key] = task
        return tasks

    def sync_case(self, layout: CaseLayout, case: dict[str, Any],
                  on_progress: Callable[[int], None] | None = None) -> SyncResult:
        """Create or update every task of the case, then its imported-contour predictions."""
        case_id = case["case_id"]
        result = SyncResult()
        existing = self.existing_tasks(case_id)
        wanted = list(self._task_specs(layout, case))
        predictions = self._contour_predictions(layout, case)
        if self.serving == "local-files":
            self.ensure_local_storage(layout.root.parent)
        to_upload = [spec for spec in wanted if self.serving == "upload" and not (
            (key := (spec["modality"], spec["slice_index"])) in existing
            and (existing[key].data or {}).get("image_sha256") == spec["image_sha256"])]
        uploaded = dict(zip([id(s) for s in to_upload], self.upload([s["_png"] for s in to_upload]), strict=True))

        new_tasks = []
        for spec in wanted:
            key = (spec["modality"], spec["slice_index"])
            png = spec.pop("_png")
            task = existing.get(key)
            if self.serving == "local-files":
                spec[IMAGE_KEY] = self.local_url(png)
            elif id(spec) in uploaded:
                spec[IMAGE_KEY] = uploaded[id(spec)]
            else:
                spec[IMAGE_KEY] = task.data[IMAGE_KEY]
            if task is None:
                preds = [self._prediction_payload(v, r) for v, r in predictions.get(key, {}).items()]
                new_tasks.append({"data": spec, "predictions": preds})
                result.predictions_written += len(preds)
                continue
            if {k: task.data.get(k) for k in spec} != spec or set(task.data) - set(spec):
                _call(f"update task {task.id}", self.client.tasks.update, id=task.id, data=spec,
                      project=self.project_id)
                result.updated += 1
            else:
                result.unchanged += 1
            self._sync_predictions(task, predictions.get(key, {}), result)
            if on_progress:
                on_progress(1)
        for start in range(0, len(new_tasks), IMPORT_BATCH):
            batch = new_tasks[start:start + IMPORT_BATCH]
            _call(f"import {len(batch)} tasks into project {self.project_id}", self.client.projects.import_tasks,
                  id=self.project_id, request=batch, return_task_ids=True)
            result.created += len(batch)
            if on_progress:
                on_progress(len(batch))
        return result

    def _task_specs(self, layout: CaseLayout, case: dict[str, Any]) -> Iterable[dict[str, Any]]:
        n_slices = case["reference_grid"]["shape_zyx"][0]
        for modality, info in case["modalities"].items():
            for z in range(n_slices):
                png = layout.slice_png(modality, z)
                yield {
                    "_png": png,
                    "patient_id": case["patient_id"],
                    "case_id": case["case_id"],
                    "modality": modality,
                    "tumor_type": case.get("tumor_type") or "",
                    "tissue": case.get("tissue") or "unknown",
                    "anatomy": case.get("anatomy") or "",
                    "slice_index": z,
                    "n_slices": n_slices,
                    "instance_number": info["instance_numbers"][z] if info.get("instance_numbers") else None,
                    "annotate_on": case["annotate_on"],
                    "image_sha256": _image_sha(png),
                }

    @staticmethod
    def _contour_predictions(layout: CaseLayout, case: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
        """``{(modality, z): {model_version: brush result}}`` from the case's label files."""
        out: dict[tuple[str, int], dict[str, Any]] = {}
        for label in case.get("labels", []):
            mask = read_nifti(layout.root / label["file"]).array
            version = f"{IMPORTED_PREFIX}{label['roi']}"
            for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
                result = mask_to_brush_result(mask[z], from_name=BRUSH_CONTROL, to_name=IMAGE_KEY,
                                              label=roi_label(label["roi"]))
                out.setdefault((label["modality"], int(z)), {})[version] = result
        return out

    @staticmethod
    def _prediction_payload(version: str, result: dict[str, Any]) -> dict[str, Any]:
        return {"model_version": version, "score": 1.0, "result": [result]}

    def _sync_predictions(self, task: Any, wanted: dict[str, Any], result: SyncResult) -> None:
        have = {}
        for prediction in getattr(task, "predictions", None) or []:
            record = prediction if isinstance(prediction, dict) else prediction.model_dump()
            version = record.get("model_version") or ""
            if version.startswith(IMPORTED_PREFIX):
                have.setdefault(version, []).append(record)
        for version, records in have.items():
            keep = version in wanted and len(records) == 1 and records[0].get("result") == [wanted[version]]
            if keep:
                continue
            for record in records:
                _call(f"delete prediction {record['id']}", self.client.predictions.delete, id=record["id"])
                result.predictions_deleted += 1
        for version, brush in wanted.items():
            records = have.get(version, [])
            if len(records) == 1 and records[0].get("result") == [brush]:
                continue
            _call(f"add prediction to task {task.id}", self.client.predictions.create, task=task.id,
                  result=[brush], score=1.0, model_version=version)
            result.predictions_written += 1
