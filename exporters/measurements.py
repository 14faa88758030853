"""Measurements of a tumour mask that radiologists report: volume and longest axial diameter.

Pure functions on arrays with spacing; ``measure_label`` adds what sparse annotation allows one
to claim (a volume is only the tumour's volume when every slice it spans was annotated).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np


def tumour_volume_ml(mask: np.ndarray, spacing_xyz_mm: tuple[float, float, float]) -> float:
    """Voxel count × voxel volume, in millilitres (mask ``[z, y, x]``)."""
    return float(np.count_nonzero(mask)) * float(np.prod(spacing_xyz_mm)) / 1000.0


def max_axial_diameter_mm(mask: np.ndarray, spacing_xyz_mm: tuple[float, float, float]) -> float:
    """Longest in-plane distance across the mask on any slice (RECIST-style long axis), in mm.

    Measured between pixel centres of the convex hull, so one pixel has diameter 0.
    """
    best = 0.0
    sx, sy = float(spacing_xyz_mm[0]), float(spacing_xyz_mm[1])
    for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        ys, xs = np.nonzero(mask[z])
        hull = cv2.convexHull(np.column_stack([xs, ys]).astype(np.int32)).reshape(-1, 2).astype(float)
        hull *= (sx, sy)
        if len(hull) > 1:
            distances = np.sqrt(((hull[:, None, :] - hull[None, :, :]) ** 2).sum(-1))
            best = max(best, float(distances.max()))
    return best


def measure_label(mask: np.ndarray, spacing_xyz_mm: tuple[float, float, float],
                  annotated_slices: list[int]) -> dict[str, Any]:
    """Volume, diameter, and whether the annotation covers the whole tumour.

    ``complete`` is true when every slice from the first to the last slice with tumour was
    annotated, and the slice just outside each end was annotated empty (or is the volume's edge).
    """
    annotated = set(annotated_slices)
    with_tumour = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)).tolist()
    complete = False
    if with_tumour:
        first, last = with_tumour[0], with_tumour[-1]
        inside = all(z in annotated for z in range(first, last + 1))
        below = first == 0 or (first - 1) in annotated
        above = last == mask.shape[0] - 1 or (last + 1) in annotated
        complete = inside and below and above
    return {
        "volume_ml": round(tumour_volume_ml(mask, spacing_xyz_mm), 3),
        "max_axial_diameter_mm": round(max_axial_diameter_mm(mask, spacing_xyz_mm), 2),
        "slices_with_tumour": with_tumour,
        "complete": complete,
    }
