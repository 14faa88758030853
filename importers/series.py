"""Finding a patient's axial T1 and T2 (DICOM or NIfTI) and their existing contours.

``find_patient_series(folder, t1=None, t2=None)`` returns each modality read into a volume
on its own native grid, with the contours drawn on it. ``--t1``/``--t2`` overrides accept a
folder, a file or a SeriesInstanceUID. Only technical, non-identifying facts about the
sources are kept (UIDs, descriptions, file names, never patient fields or full paths).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.case_store import check_roi_name
from core.errors import ContourError, SeriesError
from core.geometry import Volume, grid_mismatches, read_nifti, reorient_lps
from importers.contours import DEFAULT_MASK_GRID_ATOL_MM, Contour, read_mask_nifti, read_rtstruct
from importers.dicom import SeriesInfo, discover_series, read_series_volume
from importers.sequences import describe_candidates, pick_series

log = logging.getLogger(__name__)

MODALITIES = ("T1", "T2")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_MASK_WORDS = {"mask", "masks", "label", "labels", "seg", "segmentation", "roi", "gtv", "contour", "contours"}
_MODALITY_WORDS = {"T1": {"t1", "t1w", "t1we"}, "T2": {"t2", "t2w", "t2fs", "t2we", "stir", "fs"}}


@dataclass
class SourceSeries:
    """One modality on its native grid, where it came from, and contours drawn on it."""

    modality: str
    volume: Volume
    source: dict[str, Any]
    instance_numbers: list[int] | None = None
    frame_of_reference_uid: str = ""
    contours: list[Contour] = field(default_factory=list)


@dataclass
class PatientSeries:
    series: dict[str, SourceSeries]
    warnings: list[str] = field(default_factory=list)


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _tokens(path: Path) -> set[str]:
    return {t for t in re.split(r"[^a-z0-9]+", _stem(path).lower()) if t}


def _nifti_modality(path: Path) -> str | None:
    tokens = _tokens(path)
    hits = [m for m, words in _MODALITY_WORDS.items() if tokens & words]
    return hits[0] if len(hits) == 1 else None


def _is_mask_name(path: Path) -> bool:
    return bool(_tokens(path) & _MASK_WORDS)


def _mask_roi(path: Path) -> str:
    words = [w for w in re.split(r"[^A-Za-z0-9]+", _stem(path)) if w]
    noise = {"mask", "masks", "label", "labels", "seg", "segmentation", "contour", "contours", "mr", "image"}
    kept = [w for w in words if w.lower() not in noise and
            not any(w.lower() in ws for ws in _MODALITY_WORDS.values())]
    return check_roi_name("_".join(kept)) if kept else "mask"


def _dicom_source(modality: str, info: SeriesInfo) -> SourceSeries:
    read = read_series_volume(info)
    return SourceSeries(
        modality=modality,
        volume=read.volume,
        instance_numbers=read.instance_numbers,
        frame_of_reference_uid=info.frame_of_reference_uid,
        source={
            "format": "dicom",
            "series_instance_uid": info.uid,
            "series_description": info.description,
            "sop_class_uid": info.sop_class_uid,
            "frame_of_reference_uid": info.frame_of_reference_uid,
            "n_files": len(info.files),
            "native_grid": read.volume.grid_dict(),
        },
    )


def _nifti_source(modality: str, path: Path) -> SourceSeries:
    stored = read_nifti(path)
    if int(np.argmax(np.abs(stored.normal))) != 2:
        log.warning("%s: not an axial acquisition (slice normal %s); showing axial slices of it",
                    path, np.round(stored.normal, 3).tolist())
    volume = reorient_lps(stored)
    return SourceSeries(modality=modality, volume=volume,
                        source={"format": "nifti", "file": path.name, "stored_grid": stored.grid_dict(),
                                "native_grid": volume.grid_dict()})


def _resolve_override(value: str, folder: Path, dicom: dict[str, SeriesInfo], modality: str) -> SeriesInfo | Path:
    """An override names a SeriesInstanceUID, a NIfTI file or a folder holding one image series."""
    if value in dicom:
        return dicom[value]
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = folder / value
    if not path.exists():
        raise SeriesError(f"--{modality.lower()} {value}: neither a SeriesInstanceUID found under {folder} nor a path")
    if _is_nifti(path):
        return path
    found = discover_series(path)
    images = [s for s in found.values() if s.is_image]
    if len(images) == 1:
        dicom.setdefault(images[0].uid, images[0])
        return images[0]
    if not images and found:
        # Let the reader say precisely what the series is (an RTSTRUCT, an SR, ...).
        return next(iter(found.values()))
    raise SeriesError(
        f"--{modality.lower()} {path}: holds {len(images)} image series; name one by SeriesInstanceUID:\n"
        + describe_candidates(list(found.values()))
    )


def find_patient_series(folder: str | Path, t1: str | None = None, t2: str | None = None) -> PatientSeries:
    """Pick, read and check the patient's T1 and T2, and rasterise their contours.

    Raises:
        SeriesError: nothing usable found (the message lists every series seen), an ambiguous
            choice, or a series that cannot be read.
        GeometryError, ContourError: see ``importers.dicom`` and ``importers.contours``.
    """
    folder = Path(folder)
    if not folder.exists():
        raise SeriesError(f"{folder}: no such file or folder")
    dicom = discover_series(folder)
    niftis = sorted(p for p in folder.rglob("*") if _is_nifti(p)) if folder.is_dir() else []
    nifti_images = [p for p in niftis if not _is_mask_name(p)]
    nifti_masks = [p for p in niftis if _is_mask_name(p)]

    chosen: dict[str, SeriesInfo | Path] = {}
    for modality, override in (("T1", t1), ("T2", t2)):
        if override:
            chosen[modality] = _resolve_override(override, folder, dicom, modality)
    images = [s for s in dicom.values() if s.is_image and s not in chosen.values()]
    for modality in MODALITIES:
        if modality in chosen:
            continue
        best, ties = pick_series(images, modality)
        if best is not None and ties:
            raise SeriesError(
                f"{folder}: {len(ties) + 1} series look equally like the axial {modality}; choose one with "
                f"--{modality.lower()} <folder or SeriesInstanceUID>:\n" + describe_candidates([best, *ties]))
        if best is not None:
            chosen[modality] = best
            images.remove(best)
            continue
        by_name = [p for p in nifti_images if _nifti_modality(p) == modality and p not in chosen.values()]
        if len(by_name) > 1:
            raise SeriesError(f"{folder}: several NIfTI files look like {modality}: "
                              f"{', '.join(p.name for p in by_name)}; choose one with --{modality.lower()}")
        if by_name:
            chosen[modality] = by_name[0]

    if not chosen:
        listing = describe_candidates(list(dicom.values()))
        nifti_list = "\n".join(f"  - {p.name} (NIfTI)" for p in niftis)
        raise SeriesError(
            f"{folder}: no axial T1 or T2 series found. Series seen:\n{listing}"
            + (f"\n{nifti_list}" if nifti_list else "")
            + "\nName them with --t1/--t2 (a folder, a NIfTI file or a SeriesInstanceUID)."
        )

    result = PatientSeries(series={})
    for modality, choice in chosen.items():
        if isinstance(choice, Path):
            result.series[modality] = _nifti_source(modality, choice)
        else:
            result.series[modality] = _dicom_source(modality, choice)
    missing = [m for m in MODALITIES if m not in result.series]
    for modality in missing:
        warning = f"no axial {modality} series found in {folder}; importing {', '.join(result.series)} only"
        log.warning(warning)
        result.warnings.append(warning)

    _attach_rtstructs(dicom, result)
    _attach_nifti_masks(nifti_masks, result)
    return result


def _attach_rtstructs(dicom: dict[str, SeriesInfo], result: PatientSeries) -> None:
    by_uid = {s.source.get("series_instance_uid"): s for s in result.series.values()}
    for info in dicom.values():
        if not info.is_rtstruct:
            continue
        targets = [by_uid[uid] for uid in info.referenced_series_uids if uid in by_uid]
        if not targets:
            warning = (f"{info.folder}: RTSTRUCT '{info.description}' refers to a series that is not imported; "
                       "its contours are skipped")
            log.warning(warning)
            result.warnings.append(warning)
            continue
        for path in info.files:
            targets[0].contours.extend(read_rtstruct(path, targets[0].volume))


def _attach_nifti_masks(masks: list[Path], result: PatientSeries) -> None:
    for path in masks:
        named = _nifti_modality(path)
        candidates = [result.series[named]] if named in result.series else list(result.series.values())
        volume_grid = reorient_lps(read_nifti(path))
        matching = [s for s in candidates if not grid_mismatches(volume_grid, s.volume, DEFAULT_MASK_GRID_ATOL_MM)]
        if not matching:
            raise ContourError(
                f"{path}: mask is on none of the imported grids ("
                + "; ".join(f"{s.modality}: " + ", ".join(grid_mismatches(volume_grid, s.volume)) for s in candidates)
                + ")")
        target = matching[0]
        target.contours.append(read_mask_nifti(path, target.volume, _mask_roi(path)))
