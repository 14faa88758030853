"""Existing contours (RTSTRUCT ROIs, NIfTI masks) rasterised onto the series they were drawn on.

A contour is first rasterised on its own series' native grid (where its planes coincide with
slices), then carried to the reference grid like its image (see ``importers.registration``),
so a contour drawn on T2 lands where the registered T2 lands.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom

from core.errors import ContourError
from core.geometry import Volume, grid_mismatches, read_nifti, reorient_lps

log = logging.getLogger(__name__)

_SHIFT_BITS = 4
"""Sub-pixel precision of polygon filling (cv2 fixed point: 1/16 pixel)."""
DEFAULT_PLANE_TOL = 0.3
"""Largest distance of a contour from the nearest slice plane, in slice spacings."""
DEFAULT_MASK_GRID_ATOL_MM = 1e-2
"""NIfTI stores a float32 affine: allow that much rounding when matching a mask to its image."""


@dataclass
class Contour:
    """One ROI on one series' native grid."""

    roi: str
    mask: np.ndarray  # uint8 [z, y, x] on the native grid, 1 = inside
    source: str  # "rtstruct" | "nifti"
    source_path: Path


def read_rtstruct(path: Path, grid: Volume, plane_tol: float = DEFAULT_PLANE_TOL) -> list[Contour]:
    """Rasterise every closed-planar ROI of an RTSTRUCT onto ``grid``.

    Contours of one ROI on one slice are combined with XOR, the DICOM convention for holes.

    Raises:
        ContourError: unreadable file, or a contour that lies off the grid's slice planes.
    """
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise ContourError(f"{path}: unreadable RTSTRUCT ({type(exc).__name__}: {exc})") from exc
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    depth, height, width = grid.shape
    contours = []
    for roi_contour in ds.get("ROIContourSequence", []):
        number = int(roi_contour.ReferencedROINumber)
        roi = names.get(number, f"ROI_{number}")
        mask = np.zeros(grid.shape, np.uint8)
        n_polygons = 0
        for item in roi_contour.get("ContourSequence", []):
            if str(item.get("ContourGeometricType", "CLOSED_PLANAR")) not in ("CLOSED_PLANAR", "OPEN_NONPLANAR", ""):
                continue
            points = np.asarray(item.ContourData, float).reshape(-1, 3)
            if len(points) < 3:
                continue
            index = grid.physical_to_index(points)
            k = float(np.mean(index[:, 2]))
            slice_index = round(k)
            if abs(k - slice_index) > plane_tol or not 0 <= slice_index < depth:
                raise ContourError(
                    f"{path}: ROI {roi!r} has a contour at slice position {k:.2f} of a {depth}-slice grid "
                    f"(off the slice planes by more than {plane_tol} spacing); it was not drawn on this series"
                )
            polygon = np.round(index[:, :2] * (1 << _SHIFT_BITS)).astype(np.int32)
            layer = np.zeros((height, width), np.uint8)
            cv2.fillPoly(layer, [polygon], 1, lineType=cv2.LINE_8, shift=_SHIFT_BITS)
            mask[slice_index] ^= layer
            n_polygons += 1
        if n_polygons:
            contours.append(Contour(roi=roi, mask=mask, source="rtstruct", source_path=Path(path)))
        else:
            log.warning("%s: ROI %r has no closed contours; skipped", path, roi)
    return contours


def read_mask_nifti(path: Path, grid: Volume, roi: str) -> Contour:
    """A NIfTI mask on ``grid`` (nonzero = inside); its geometry must match the image's.

    Raises:
        ContourError: the mask is not on the same grid as its image.
    """
    volume = reorient_lps(read_nifti(path))  # images from NIfTI are reoriented the same way
    problems = grid_mismatches(volume, grid, atol_mm=DEFAULT_MASK_GRID_ATOL_MM)
    if problems:
        raise ContourError(f"{path}: mask is not on the grid of its image: " + "; ".join(problems))
    return Contour(roi=roi, mask=(volume.array > 0).astype(np.uint8), source="nifti", source_path=Path(path))
