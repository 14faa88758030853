"""Reading DICOM: find the series in a folder, and build one volume with correct geometry.

Geometry comes only from ImagePositionPatient / ImageOrientationPatient / PixelSpacing
(per frame for enhanced multi-frame files): slices are ordered by their position along
the slice normal, never by InstanceNumber or file name, and the slice spacing is measured
from positions (SliceThickness is often smaller than the real spacing).

Only technical fields are kept from headers; nothing patient-identifying is read into
the objects returned here.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from core.errors import GeometryError, SeriesError
from core.geometry import Volume

log = logging.getLogger(__name__)

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
DEFAULT_ORIENTATION_TOL = 1e-4
"""Largest difference between two slices' direction cosines still called the same orientation."""
DEFAULT_SPACING_REL_TOL = 0.01
"""Largest relative deviation of one slice gap from the series' gap still called uniform."""
DEFAULT_SPACING_ABS_TOL_MM = 0.02
_IGNORED_SUFFIXES = {".txt", ".md", ".json", ".csv", ".xml", ".html", ".pdf", ".jpg", ".jpeg", ".png",
                     ".gz", ".nii", ".zip", ".py", ".log", ".ini", ".yaml", ".yml"}
_IGNORED_NAMES = {"DICOMDIR", "LICENSE", "README", "Thumbs.db", "VERSION"}


@dataclass
class SeriesInfo:
    """What the headers of one series say (technical fields only, no PHI)."""

    uid: str
    sop_class_uid: str
    files: list[Path] = field(default_factory=list)
    description: str = ""
    protocol_name: str = ""
    scanning_sequence: str = ""
    sequence_variant: str = ""
    sequence_name: str = ""
    scan_options: str = ""
    image_type: str = ""
    repetition_time_ms: float | None = None
    echo_time_ms: float | None = None
    inversion_time_ms: float | None = None
    orientation: tuple[float, ...] | None = None
    frame_of_reference_uid: str = ""
    rows: int = 0
    columns: int = 0
    n_frames: int = 0
    referenced_series_uids: tuple[str, ...] = ()

    @property
    def is_image(self) -> bool:
        return self.sop_class_uid in IMAGE_SOP_CLASSES

    @property
    def is_rtstruct(self) -> bool:
        return self.sop_class_uid == RTSTRUCT_SOP_CLASS

    @property
    def folder(self) -> Path:
        return Path(os.path.commonpath([str(f.parent) for f in self.files])) if self.files else Path()

    @property
    def normal(self) -> np.ndarray | None:
        if self.orientation is None:
            return None
        row, col = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        return np.cross(row, col)

    @property
    def plane(self) -> str:
        """``axial``, ``coronal`` or ``sagittal`` from the dominant component of the normal."""
        normal = self.normal
        if normal is None:
            return "unknown"
        return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]

    def summary(self) -> str:
        kind = "image" if self.is_image else ("RTSTRUCT" if self.is_rtstruct else f"SOP {self.sop_class_uid}")
        size = f", {self.columns}×{self.rows}" if self.rows else ""
        return (f"{self.uid} '{self.description}' ({kind}, {self.n_frames or len(self.files)} images{size}, "
                f"{self.plane}, in {self.folder})")


@dataclass
class DicomSeriesVolume:
    """A series read into a volume, with the per-slice InstanceNumbers people navigate by."""

    info: SeriesInfo
    volume: Volume
    instance_numbers: list[int]


def _is_candidate(path: Path) -> bool:
    if path.name.startswith(".") or path.name in _IGNORED_NAMES:
        return False
    return path.suffix.lower() not in _IGNORED_SUFFIXES


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _float(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _frame_orientation(ds: pydicom.Dataset) -> tuple[float, ...] | None:
    if "ImageOrientationPatient" in ds:
        return tuple(float(v) for v in ds.ImageOrientationPatient)
    for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(seq_name)
        if groups and "PlaneOrientationSequence" in groups[0]:
            return tuple(float(v) for v in groups[0].PlaneOrientationSequence[0].ImageOrientationPatient)
    return None


def _update_info(info: SeriesInfo, ds: pydicom.Dataset, path: Path) -> None:
    info.files.append(path)
    info.n_frames += int(ds.get("NumberOfFrames", 1) or 1) if info.sop_class_uid in IMAGE_SOP_CLASSES else 1
    if len(info.files) > 1:
        return
    info.description = _text(ds.get("SeriesDescription"))
    info.protocol_name = _text(ds.get("ProtocolName"))
    info.scanning_sequence = _text(ds.get("ScanningSequence"))
    info.sequence_variant = _text(ds.get("SequenceVariant"))
    info.sequence_name = _text(ds.get("SequenceName") or ds.get("PulseSequenceName"))
    info.scan_options = _text(ds.get("ScanOptions"))
    info.image_type = _text(ds.get("ImageType"))
    info.repetition_time_ms = _float(ds.get("RepetitionTime"))
    info.echo_time_ms = _float(ds.get("EchoTime"))
    info.inversion_time_ms = _float(ds.get("InversionTime"))
    info.orientation = _frame_orientation(ds)
    info.frame_of_reference_uid = _text(ds.get("FrameOfReferenceUID"))
    info.rows = int(ds.get("Rows", 0) or 0)
    info.columns = int(ds.get("Columns", 0) or 0)
    if info.is_rtstruct:
        refs = []
        for frame_ref in ds.get("ReferencedFrameOfReferenceSequence", []):
            if not info.frame_of_reference_uid:
                info.frame_of_reference_uid = _text(frame_ref.get("FrameOfReferenceUID"))
            for study in frame_ref.get("RTReferencedStudySequence", []):
                refs.extend(_text(s.get("SeriesInstanceUID")) for s in study.get("RTReferencedSeriesSequence", []))
        info.referenced_series_uids = tuple(r for r in refs if r)


def discover_series(folder: str | os.PathLike[str]) -> dict[str, SeriesInfo]:
    """Group every DICOM file under ``folder`` by SeriesInstanceUID (headers only).

    Files that look like DICOM (``.dcm``, no suffix, or a ``DICM`` preamble) but cannot be
    parsed are an error naming the file: silently skipping one would hide a missing slice.

    Raises:
        SeriesError: the folder does not exist, or a file is corrupt or truncated.
    """
    root = Path(folder)
    if not root.exists():
        raise SeriesError(f"{root}: no such file or folder")
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    series: dict[str, SeriesInfo] = {}
    for path in paths:
        if not _is_candidate(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError as exc:
            if path.suffix.lower() in {".dcm", ".ima", ".dicom"}:
                raise SeriesError(f"{path}: not a DICOM file ({exc})") from exc
            log.debug("skipping %s: not DICOM", path)
            continue
        except Exception as exc:  # pydicom raises many types on truncated headers
            raise SeriesError(f"{path}: corrupt or truncated DICOM file ({type(exc).__name__}: {exc})") from exc
        uid = _text(ds.get("SeriesInstanceUID"))
        if not uid:
            raise SeriesError(f"{path}: DICOM file without SeriesInstanceUID")
        sop_class = _text(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID"))
        info = series.setdefault(uid, SeriesInfo(uid=uid, sop_class_uid=sop_class))
        if info.sop_class_uid != sop_class:
            raise SeriesError(f"{path}: series {uid} mixes SOP classes {info.sop_class_uid} and {sop_class}")
        _update_info(info, ds, path)
    return series


@dataclass
class _Frame:
    path: Path
    frame: int | None
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    instance_number: int


def _functional(ds: pydicom.Dataset, index: int, sequence: str) -> pydicom.Dataset | None:
    """Look a functional-group macro up per frame first, then in the shared groups."""
    for groups_name, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_name)
        if groups and len(groups) > i and sequence in groups[i]:
            return groups[i][sequence][0]
    return None


def _frames_of(ds: pydicom.Dataset, path: Path) -> list[_Frame]:
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    instance = int(ds.get("InstanceNumber", 0) or 0)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if n_frames > 1:
            raise SeriesError(f"{path}: multi-frame file ({n_frames} frames) without per-frame positions")
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if missing:
            raise GeometryError(f"{path}: missing {', '.join(missing)}; cannot place the slice in space")
        return [_Frame(path, None, np.asarray(ds.ImagePositionPatient, float),
                       np.asarray(ds.ImageOrientationPatient, float),
                       (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                       float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0), instance)]
    frames = []
    for i in range(n_frames):
        position = _functional(ds, i, "PlanePositionSequence")
        orientation = _functional(ds, i, "PlaneOrientationSequence")
        measures = _functional(ds, i, "PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            raise GeometryError(f"{path}: frame {i + 1} lacks plane position, orientation or pixel measures")
        rescale = _functional(ds, i, "PixelValueTransformationSequence")
        slope = float(rescale.get("RescaleSlope", 1)) if rescale is not None else float(ds.get("RescaleSlope", 1) or 1)
        intercept = (float(rescale.get("RescaleIntercept", 0)) if rescale is not None
                     else float(ds.get("RescaleIntercept", 0) or 0))
        frames.append(_Frame(path, i, np.asarray(position.ImagePositionPatient, float),
                             np.asarray(orientation.ImageOrientationPatient, float),
                             (float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1])),
                             slope, intercept, instance * 10000 + i + 1 if n_frames > 1 else instance))
    return frames


def _pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    try:
        array = ds.pixel_array
    except Exception as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID", "?")
        raise SeriesError(
            f"{path}: cannot decode pixel data (transfer syntax {syntax}; truncated file, or a compressed "
            f"syntax needing pylibjpeg/gdcm): {exc}"
        ) from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] != n_frames:
        raise SeriesError(f"{path}: pixel data of shape {array.shape} is not {n_frames} grey-level frame(s)")
    return array


def read_series_volume(
    info: SeriesInfo,
    spacing_rel_tol: float = DEFAULT_SPACING_REL_TOL,
    spacing_abs_tol_mm: float = DEFAULT_SPACING_ABS_TOL_MM,
    orientation_tol: float = DEFAULT_ORIENTATION_TOL,
) -> DicomSeriesVolume:
    """Read the pixels of an image series into a ``Volume`` and check it is a proper stack.

    Raises:
        SeriesError: not an image series, unreadable pixels, missing or duplicate slices.
        GeometryError: mixed orientations or matrices, non-uniform spacing, sheared stack.
    """
    if not info.is_image:
        kind = "an RTSTRUCT" if info.is_rtstruct else f"SOP class {info.sop_class_uid}"
        raise SeriesError(f"{info.folder}: series {info.uid} is {kind}, not an image series")
    frames: list[_Frame] = []
    pixels: list[np.ndarray] = []
    for path in info.files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise SeriesError(f"{path}: corrupt or truncated DICOM file ({type(exc).__name__}: {exc})") from exc
        file_frames = _frames_of(ds, path)
        data = _pixels(ds, path)
        frames.extend(file_frames)
        pixels.extend(data[i] for i in range(len(file_frames)))

    first = frames[0]
    for frame, image in zip(frames, pixels, strict=True):
        if np.abs(frame.orientation - first.orientation).max() > orientation_tol:
            raise GeometryError(
                f"{info.folder}: mixed orientations in series {info.uid}: {first.path.name} has "
                f"{np.round(first.orientation, 5).tolist()}, {frame.path.name} has "
                f"{np.round(frame.orientation, 5).tolist()}"
            )
        if image.shape != pixels[0].shape or not np.allclose(frame.pixel_spacing, first.pixel_spacing, atol=1e-4):
            raise GeometryError(
                f"{info.folder}: mixed matrices in series {info.uid}: {first.path.name} is {pixels[0].shape} at "
                f"{first.pixel_spacing} mm, {frame.path.name} is {image.shape} at {frame.pixel_spacing} mm"
            )
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    distance = np.array([f.position @ normal for f in frames])
    order = np.argsort(distance, kind="stable")
    frames = [frames[i] for i in order]
    pixels = [pixels[i] for i in order]
    distance = distance[order]
    names = [f.path.name + (f"[{f.frame + 1}]" if f.frame is not None else "") for f in frames]

    if len(frames) < 2:
        raise SeriesError(f"{info.folder}: series {info.uid} has {len(frames)} slice; a volume needs at least 2")
    gaps = np.diff(distance)
    for i, gap in enumerate(gaps):
        if gap < max(spacing_abs_tol_mm, 1e-3):
            raise SeriesError(
                f"{info.folder}: duplicate slice at {distance[i]:.2f} mm along the normal in series {info.uid}: "
                f"{names[i]} and {names[i + 1]}"
            )
    step = float(np.median(gaps))
    tolerance = max(spacing_abs_tol_mm, spacing_rel_tol * step)
    for i, gap in enumerate(gaps):
        if abs(gap - step) <= tolerance:
            continue
        ratio = gap / step
        if round(ratio) >= 2 and abs(ratio - round(ratio)) * step <= tolerance:
            raise SeriesError(
                f"{info.folder}: {round(ratio) - 1} missing slice(s) in series {info.uid} between {names[i]} "
                f"({distance[i]:.2f} mm) and {names[i + 1]} ({distance[i + 1]:.2f} mm); slices are {step:.3f} mm apart"
            )
        raise GeometryError(
            f"{info.folder}: non-uniform slice spacing in series {info.uid}: {gap:.3f} mm between {names[i]} and "
            f"{names[i + 1]}, {step:.3f} mm elsewhere (tolerance {tolerance:.3f} mm)"
        )
    in_plane = np.array([[f.position @ row, f.position @ col] for f in frames])
    drift = np.abs(in_plane - in_plane[0]).max()
    if drift > max(0.05, 0.1 * min(first.pixel_spacing)):
        raise GeometryError(
            f"{info.folder}: slices of series {info.uid} are not stacked along their normal "
            f"(in-plane drift {drift:.2f} mm: gantry tilt or sheared stack); resample at the scanner first"
        )

    stack = np.stack(pixels)
    slopes = np.array([f.slope for f in frames])
    intercepts = np.array([f.intercept for f in frames])
    if np.all(slopes == 1) and np.all(intercepts == 0) and stack.dtype.kind in "iu":
        array = stack if stack.dtype.itemsize <= 2 else stack.astype(np.float32)
    else:
        array = (stack.astype(np.float32) * slopes[:, None, None].astype(np.float32)
                 + intercepts[:, None, None].astype(np.float32))
    spacing_z = float((distance[-1] - distance[0]) / (len(frames) - 1))
    volume = Volume(
        array,
        origin=tuple(frames[0].position),
        spacing=(first.pixel_spacing[1], first.pixel_spacing[0], spacing_z),  # PixelSpacing is [row, column]
        direction=np.column_stack([row, col, normal]),
    )
    return DicomSeriesVolume(info=info, volume=volume, instance_numbers=[f.instance_number for f in frames])


def series_by_folder(series: dict[str, SeriesInfo]) -> dict[Path, list[SeriesInfo]]:
    grouped: dict[Path, list[SeriesInfo]] = defaultdict(list)
    for info in series.values():
        grouped[info.folder].append(info)
    return dict(grouped)
