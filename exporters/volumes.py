"""Reviewed slice annotations back into NIfTI volumes on the case's reference grid.

Input: Label Studio tasks as in a JSON export (``data`` with case_id / modality / slice_index,
``annotations`` with brush results). Output per case::

    <out>/<case_id>/<MODALITY>.nii.gz             the image the annotators saw (copied)
    <out>/<case_id>/<LABEL>__<MODALITY>.nii.gz    uint8 mask, 1 = label, on the same grid
    <out>/<case_id>/manifest.json                 annotated slice indices, who/when, measurements
    <out>/manifest.json                           all cases

Slices nobody annotated are NOT background: the manifest lists the annotated ones, and training
must only learn from those. A slice annotated with no brush region IS background (it was looked at).
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core.brush_rle import brush_result_to_mask
from core.case_store import CaseStore, atomic_write_json, sha256_file, staged_folder
from core.errors import AnnotationError, BrushDecodeError, InputError, ProjectError
from core.geometry import read_nifti, write_nifti
from core.labeling import BRUSH_CONTROL, REVIEW_CONTROL, REVIEWED_CHOICE, TUMOR_LABEL
from exporters.measurements import measure_label

log = logging.getLogger(__name__)

EXPORT_SCHEMA_VERSION = 1


@dataclass
class SliceAnnotation:
    """The annotation chosen for one task (one slice of one modality of one case)."""

    task_id: int
    annotation_id: int
    case_id: str
    modality: str
    slice_index: int
    masks: dict[str, np.ndarray]  # label -> [y, x] uint8
    reviewed: bool
    completed_by: Any = None
    updated_at: str | None = None


@dataclass
class ExportSummary:
    out_dir: str
    cases: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "cases": self.cases, "skipped": self.skipped, "failed": self.failed}


def _is_reviewed(result: list[dict[str, Any]]) -> bool:
    return any(r.get("type") == "choices" and r.get("from_name") == REVIEW_CONTROL
               and REVIEWED_CHOICE in (r.get("value") or {}).get("choices", []) for r in result)


def choose_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """Ground truth if marked, else the most recently updated non-cancelled annotation."""
    candidates = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not candidates:
        return None
    truth = [a for a in candidates if a.get("ground_truth")]
    pool = truth or candidates
    return max(pool, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id") or 0))


def slice_annotation(task: dict[str, Any], height: int, width: int) -> SliceAnnotation | None:
    """Decode the chosen annotation of ``task`` into per-label masks ``[y, x]``.

    Raises:
        AnnotationError: task data without case/modality/slice, or a brush of another size.
    """
    data = task.get("data") or {}
    missing = [k for k in ("case_id", "modality", "slice_index") if k not in data]
    if missing:
        raise AnnotationError(f"task {task.get('id')}: task data lacks {', '.join(missing)} (not imported by "
                              "import-patient?)")
    annotation = choose_annotation(task)
    if annotation is None:
        return None
    masks: dict[str, np.ndarray] = {}
    for result in annotation.get("result") or []:
        if result.get("type") != "brushlabels" or result.get("from_name") != BRUSH_CONTROL:
            continue
        try:
            mask = brush_result_to_mask(result)
        except BrushDecodeError as exc:
            raise AnnotationError(f"task {task.get('id')}, annotation {annotation.get('id')}: {exc}") from exc
        if mask.shape != (height, width):
            raise AnnotationError(
                f"task {task.get('id')}, annotation {annotation.get('id')}: brush is {mask.shape[1]}×{mask.shape[0]}, "
                f"the case's slices are {width}×{height}")
        for label in (result.get("value") or {}).get("brushlabels") or [TUMOR_LABEL]:
            masks[label] = np.maximum(masks.get(label, np.zeros_like(mask)), mask)
    return SliceAnnotation(
        task_id=int(task.get("id") or 0), annotation_id=int(annotation.get("id") or 0), case_id=str(data["case_id"]),
        modality=str(data["modality"]), slice_index=int(data["slice_index"]), masks=masks,
        reviewed=_is_reviewed(annotation.get("result") or []), completed_by=annotation.get("completed_by"),
        updated_at=annotation.get("updated_at"))


def export_volumes(tasks: list[dict[str, Any]], store: CaseStore, out_dir: Path, *, reviewed_only: bool = False,
                   cases: list[str] | None = None, copy_images: bool = True) -> ExportSummary:
    """Write one folder per case with label volumes and a manifest (see the module docstring)."""
    out_dir = Path(out_dir)
    summary = ExportSummary(out_dir=str(out_dir))
    by_case: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for task in tasks:
        case_id = (task.get("data") or {}).get("case_id")
        if case_id is None:
            summary.skipped.append({"task_id": task.get("id"), "reason": "no case_id in task data"})
            continue
        if cases is None or case_id in cases:
            by_case[str(case_id)].append(task)
    for case_id in sorted(by_case):
        try:
            exported = _export_case(case_id, by_case[case_id], store, out_dir, reviewed_only, copy_images, summary)
        except ProjectError as exc:  # one bad case does not stop the others; it is reported
            log.error("%s: %s", case_id, exc)
            summary.failed.append({"case_id": case_id, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if exported is not None:
            summary.cases.append(exported)
    atomic_write_json(out_dir / "manifest.json", {
        "schema_version": EXPORT_SCHEMA_VERSION,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "reviewed_only": reviewed_only,
        "cases": [{"case_id": c["case_id"], "labels": [lab["file"] for lab in c["labels"]]} for c in summary.cases],
    })
    return summary


def _export_case(case_id: str, tasks: list[dict[str, Any]], store: CaseStore, out_dir: Path, reviewed_only: bool,
                 copy_images: bool, summary: ExportSummary) -> dict[str, Any] | None:
    layout = store.case(case_id)
    case = layout.read_case_json()
    depth, height, width = case["reference_grid"]["shape_zyx"]
    chosen: dict[str, list[SliceAnnotation]] = defaultdict(list)
    for task in tasks:
        annotated = slice_annotation(task, height, width)
        if annotated is None:
            continue
        if reviewed_only and not annotated.reviewed:
            summary.skipped.append({"task_id": annotated.task_id, "reason": "not marked Reviewed"})
            continue
        if not 0 <= annotated.slice_index < depth:
            raise AnnotationError(f"task {annotated.task_id}: slice_index {annotated.slice_index} outside the "
                                  f"case's {depth} slices")
        chosen[annotated.modality].append(annotated)
    if not chosen:
        return None
    with staged_folder(out_dir / case_id) as staging:
        result = _write_case(case, layout, chosen, staging, copy_images)
    result["folder"] = str(out_dir / case_id)
    return result


def _write_case(case: dict[str, Any], layout: Any, chosen: dict[str, list[SliceAnnotation]], folder: Path,
                copy_images: bool) -> dict[str, Any]:
    case_id = case["case_id"]
    labels_json = []
    images_json = {}
    for modality, slices in sorted(chosen.items()):
        source = layout.volume(modality)
        if not source.is_file():
            raise InputError(f"{source}: case {case_id} has no {modality} volume, but {len(slices)} of its "
                             f"{modality} slices are annotated")
        grid = read_nifti(source)
        if copy_images:
            shutil.copyfile(source, folder / f"{modality}.nii.gz")
        images_json[modality] = {"file": f"{modality}.nii.gz", "sha256": case["modalities"][modality]["sha256"]}
        annotated = sorted({s.slice_index for s in slices})
        label_names = sorted({label for s in slices for label in s.masks} | {TUMOR_LABEL})
        for label in label_names:
            volume = np.zeros(grid.shape, np.uint8)
            for s in slices:
                if label in s.masks:
                    volume[s.slice_index] = s.masks[label]
            path = write_nifti(grid.with_array(volume), folder / f"{label}__{modality}.nii.gz")
            labels_json.append({
                "label": label, "modality": modality, "file": path.name, "sha256": sha256_file(path),
                "annotated_slices": annotated,
                "reviewed_slices": sorted({s.slice_index for s in slices if s.reviewed}),
                **measure_label(volume, grid.spacing, annotated),
            })
        log.info("%s %s: %d annotated slices", case_id, modality, len(annotated))
    manifest = {
        "schema_version": EXPORT_SCHEMA_VERSION,
        "case_id": case_id,
        "patient_id": case["patient_id"],
        "tumor_type": case.get("tumor_type"), "tissue": case.get("tissue"), "anatomy": case.get("anatomy"),
        "reference_modality": case["reference_modality"],
        "grid": case["reference_grid"],
        "images": images_json,
        "labels": labels_json,
        "sources": [{"task_id": s.task_id, "annotation_id": s.annotation_id, "modality": s.modality,
                     "slice_index": s.slice_index, "reviewed": s.reviewed, "completed_by": s.completed_by,
                     "updated_at": s.updated_at} for slices in chosen.values() for s in slices],
    }
    atomic_write_json(folder / "manifest.json", manifest)
    return {"case_id": case_id, "folder": str(folder), "labels": labels_json}
