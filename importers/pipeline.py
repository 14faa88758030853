"""``import_patient``: series → one reference grid → case store → Label Studio tasks.

Stages (each timed, for the summary and the benchmark): ``read`` (discover, read and check
series, rasterise contours), ``register``, ``resample`` (images and contours onto the
reference grid), ``write`` (NIfTI volumes and labels), ``png`` and ``label_studio``.
The case store is written in a staging folder and swapped in only when everything
before Label Studio succeeded, so a failed import leaves the previous case untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core.case_store import CaseLayout, CaseStore, atomic_write_json, check_patient_id, sha256_file
from core.errors import InputError
from core.geometry import Volume, write_nifti
from core.labeling import TISSUE_CLASSES, annotate_on
from importers.registration import RegistrationResult, register, resample_to
from importers.series import PatientSeries, SourceSeries, find_patient_series
from importers.slices import intensity_window, write_slices

log = logging.getLogger(__name__)

IMPORT_VERSION = "1"
"""Bump when the case store's content for the same input changes (tasks are then updated)."""
CASE_SCHEMA_VERSION = 1


@dataclass
class ImportOptions:
    patient_id: str
    tumor_type: str = ""
    tissue: str = "unknown"
    anatomy: str = ""
    t1: str | None = None
    t2: str | None = None
    reference: str = "auto"
    affine: bool = False
    interpolation: str = "linear"

    def __post_init__(self) -> None:
        check_patient_id(self.patient_id)
        canonical = {t.lower(): t for t in TISSUE_CLASSES}
        tissue = (self.tissue or "unknown").strip()
        if tissue.lower() not in canonical:
            raise InputError(f"--tissue {tissue!r}: must be one of {', '.join(TISSUE_CLASSES)}")
        self.tissue = canonical[tissue.lower()]
        if self.reference not in ("auto", "T1", "T2"):
            raise InputError(f"--reference {self.reference!r}: must be auto, T1 or T2")


@dataclass
class ImportResult:
    case_id: str
    reference_modality: str
    shape: list[int]
    spacing: list[float]
    registration: dict[str, Any] | None
    slices: dict[str, int]
    tasks_created: int = 0
    tasks_updated: int = 0
    tasks_unchanged: int = 0
    labels: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    case_dir: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[str, int, int], None]
"""``(stage, done, total)``: called as stages advance, for progress bars."""


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 3)


def choose_reference(series: dict[str, SourceSeries], requested: str = "auto") -> str:
    """The modality whose grid everything is resampled onto: the larger in-plane matrix.

    Resampling the smaller matrix up loses nothing; the reverse would blur the finer image.
    Ties go to T1 (the anatomical reference).
    """
    if requested != "auto":
        if requested not in series:
            raise InputError(f"--reference {requested}: that series was not found")
        return requested
    return max(series, key=lambda m: (series[m].volume.shape[1] * series[m].volume.shape[2], m == "T1"))


def _instance_numbers_on(reference: Volume, source: SourceSeries, matrix: np.ndarray) -> list[int | None] | None:
    """For each reference slice, the InstanceNumber of the nearest native slice of ``source``."""
    if not source.instance_numbers:
        return None
    depth, height, width = reference.shape
    centres = reference.index_to_physical([((width - 1) / 2, (height - 1) / 2, z) for z in range(depth)])
    moved = centres @ matrix[:3, :3].T + matrix[:3, 3]
    k = np.rint(source.volume.physical_to_index(moved)[:, 2]).astype(int)
    n = len(source.instance_numbers)
    return [int(source.instance_numbers[i]) if 0 <= i < n else None for i in k]


def build_case(folder: str | Path, options: ImportOptions, store: CaseStore,
               progress: ProgressCallback | None = None, timer: _Timer | None = None) -> ImportResult:
    """Read, register and resample a patient, and write its case folder (atomically)."""
    timer = timer or _Timer()
    report = progress or (lambda stage, done, total: None)
    report("read", 0, 1)
    with timer.stage("read"):
        patient: PatientSeries = find_patient_series(folder, t1=options.t1, t2=options.t2)
    report("read", 1, 1)
    series = patient.series
    ref_mod = choose_reference(series, options.reference)
    reference = series[ref_mod].volume
    warnings = list(patient.warnings)

    registration: RegistrationResult | None = None
    on_reference: dict[str, Volume] = {ref_mod: reference}
    matrices: dict[str, np.ndarray] = {ref_mod: np.eye(4)}
    for modality, source in series.items():
        if modality == ref_mod:
            continue
        report("register", 0, 1)
        same_for = bool(source.frame_of_reference_uid) and (
            source.frame_of_reference_uid == series[ref_mod].frame_of_reference_uid)
        with timer.stage("register"):
            registration = register(reference, source.volume, same_frame_of_reference=same_for,
                                    affine=options.affine)
        warnings.extend(f"registration: {w}" for w in registration.warnings)
        matrices[modality] = registration.matrix
        report("register", 1, 1)
        with timer.stage("resample"):
            on_reference[modality] = resample_to(source.volume, reference, registration.transform,
                                                 options.interpolation)

    labels: list[tuple[str, str, np.ndarray]] = []
    with timer.stage("resample"):
        for modality, source in series.items():
            for contour in source.contours:
                if modality == ref_mod:
                    mask = contour.mask
                else:
                    mask = resample_to(source.volume.with_array(contour.mask), reference,
                                       registration.transform if registration else None, "nearest").array
                labels.append((contour.roi, modality, mask.astype(np.uint8)))

    case_id = options.patient_id
    with store.staged_case(case_id) as layout:
        with timer.stage("write"):
            modalities_json = {}
            for modality, volume in on_reference.items():
                write_nifti(volume, layout.volume(modality))
            label_json = _write_labels(layout, reference, labels)
        n_done = 0
        total = sum(v.shape[0] for v in on_reference.values())
        for modality, volume in on_reference.items():
            with timer.stage("png"):
                window = intensity_window(volume.array)
                write_slices(volume.array, layout.slices_dir(modality), window)
            n_done += volume.shape[0]
            report("png", n_done, total)
            modalities_json[modality] = {
                "source": series[modality].source,
                "resampled": modality != ref_mod,
                "interpolation": None if modality == ref_mod else options.interpolation,
                "intensity_window": {"percentiles": [0.05, 99.95], "values": [round(w, 4) for w in window]},
                "instance_numbers": _instance_numbers_on(reference, series[modality], matrices[modality]),
                "file": layout.volume(modality).name,
                "sha256": sha256_file(layout.volume(modality)),
            }
        case_json = {
            "schema_version": CASE_SCHEMA_VERSION,
            "import_version": IMPORT_VERSION,
            "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "case_id": case_id,
            "patient_id": options.patient_id,
            "tumor_type": options.tumor_type,
            "tissue": options.tissue,
            "anatomy": options.anatomy,
            "annotate_on": annotate_on(options.tissue) if annotate_on(options.tissue) in on_reference else ref_mod,
            "reference_modality": ref_mod,
            "reference_grid": reference.grid_dict(),
            "modalities": modalities_json,
            "registration": None if registration is None else {
                "fixed": ref_mod, "moving": next(m for m in series if m != ref_mod), **registration.to_json()},
            "labels": label_json,
            "warnings": warnings,
        }
        atomic_write_json(layout.case_json, case_json)

    return ImportResult(
        case_id=case_id,
        reference_modality=ref_mod,
        shape=list(reference.shape),
        spacing=[round(s, 6) for s in reference.spacing],
        registration=case_json["registration"],
        slices={m: v.shape[0] for m, v in on_reference.items()},
        labels=label_json,
        warnings=warnings,
        timings_s=timer.timings,
        case_dir=str(store.case(case_id).root),
    )


def _write_labels(layout: CaseLayout, reference: Volume, labels: list[tuple[str, str, np.ndarray]]) -> list[dict]:
    voxel_ml = float(np.prod(reference.spacing)) / 1000.0
    out = []
    for roi, modality, mask in labels:
        path = write_nifti(reference.with_array(mask), layout.label(roi, modality))
        slices = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)).tolist()
        out.append({
            "roi": roi,
            "modality": modality,
            "file": path.relative_to(layout.root).as_posix(),
            "voxels": int(mask.sum()),
            "volume_ml": round(int(mask.sum()) * voxel_ml, 3),
            "slices": slices,
            "sha256": sha256_file(path),
        })
    return out


def import_patient(folder: str | Path, options: ImportOptions, store: CaseStore, sync: Any | None = None,
                   progress: ProgressCallback | None = None) -> ImportResult:
    """Build the case, then (unless ``sync`` is None) create or update its Label Studio tasks.

    Args:
        sync: an ``importers.tasks.TaskSync`` bound to a project, or None for ``--no-upload``.
    """
    timer = _Timer()
    result = build_case(folder, options, store, progress, timer)
    if sync is not None:
        layout = store.case(result.case_id)
        case = layout.read_case_json()
        total = sum(result.slices.values())
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress("label_studio", done, total)

        with timer.stage("label_studio"):
            synced = sync.sync_case(layout, case, on_progress=advance)
        result.tasks_created = synced.created
        result.tasks_updated = synced.updated
        result.tasks_unchanged = synced.unchanged
    result.timings_s = dict(timer.timings)
    result.timings_s["total"] = round(sum(v for k, v in timer.timings.items()), 3)
    return result
