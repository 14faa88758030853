"""Volumes with their geometry, and the one place where conventions are converted.

A ``Volume`` is a numpy array indexed ``[z, y, x]`` (z = slice index, increasing along the
slice normal) together with its geometry in DICOM patient coordinates (LPS, millimetres):

- ``origin``: the centre of voxel ``[0, 0, 0]``, as ``(x, y, z)``;
- ``spacing``: voxel size along the array's x, y and z axes, as ``(x, y, z)``;
- ``direction``: a 3×3 matrix whose *columns* are the unit vectors of the x, y, z array
  axes in LPS (ITK's convention: ``point = origin + direction @ (spacing * (i, j, k))``).

SimpleITK arrays are ``[z, y, x]`` while its spacing and origin are ``(x, y, z)``: only
``to_sitk``/``from_sitk`` deal with that. NIfTI files are read and written by SimpleITK,
which converts LPS to the RAS affine NIfTI stores, so 3D Slicer and ITK-SNAP show them where
DICOM viewers do.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from core.errors import GeometryError, SeriesError

DEFAULT_GRID_ATOL_MM = 1e-3
"""Tolerance (mm, and unitless for direction cosines) under which two grids are the same."""


@dataclass(eq=False)
class Volume:
    """A 3-D image ``[z, y, x]`` and where it lies in LPS space.

    >>> v = Volume(np.zeros((2, 3, 4), np.uint8), origin=(0, 0, 0), spacing=(1, 1, 5))
    >>> v.shape, v.index_to_physical((3, 2, 1)).tolist()
    ((2, 3, 4), [3.0, 2.0, 5.0])
    """

    array: np.ndarray
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise GeometryError(f"Volume array must be 3-D [z, y, x], not {self.array.ndim}-D {self.array.shape}")
        self.origin = tuple(float(v) for v in self.origin)  # type: ignore[assignment]
        self.spacing = tuple(float(v) for v in self.spacing)  # type: ignore[assignment]
        if len(self.origin) != 3 or len(self.spacing) != 3:
            raise GeometryError(f"origin and spacing need 3 values, got {self.origin} and {self.spacing}")
        if min(self.spacing) <= 0:
            raise GeometryError(f"spacing must be positive, got {self.spacing} mm")
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if not np.allclose(self.direction.T @ self.direction, np.eye(3), atol=1e-3):
            raise GeometryError(f"direction is not orthonormal: {self.direction.tolist()}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        z, y, x = self.shape
        return (x, y, z)

    @property
    def affine_lps(self) -> np.ndarray:
        """4×4 matrix mapping ``(x, y, z, 1)`` voxel indices to LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        affine[:3, 3] = self.origin
        return affine

    @property
    def affine_ras(self) -> np.ndarray:
        """The same affine in RAS, as NIfTI stores it (and nibabel reports it)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps

    @property
    def normal(self) -> np.ndarray:
        return self.direction[:, 2]

    def index_to_physical(self, index_xyz: Any) -> np.ndarray:
        """Continuous ``(x, y, z)`` index (or an ``(n, 3)`` array of them) to LPS mm."""
        idx = np.asarray(index_xyz, dtype=float)
        return (idx * np.asarray(self.spacing)) @ self.direction.T + np.asarray(self.origin)

    def physical_to_index(self, points_lps: Any) -> np.ndarray:
        """LPS mm (one point or ``(n, 3)``) to continuous ``(x, y, z)`` indices."""
        pts = np.asarray(points_lps, dtype=float) - np.asarray(self.origin)
        return (pts @ self.direction) / np.asarray(self.spacing)

    def with_array(self, array: np.ndarray) -> Volume:
        """The same grid holding other voxels (e.g. a mask of this image)."""
        if tuple(array.shape) != self.shape:
            raise GeometryError(f"array shape {array.shape} differs from the grid's {self.shape}")
        return Volume(array, self.origin, self.spacing, self.direction.copy())

    def grid_dict(self) -> dict[str, Any]:
        """JSON-safe description of the grid (shape as ``[z, y, x]``)."""
        return {
            "shape_zyx": list(self.shape),
            "spacing_xyz_mm": [round(s, 6) for s in self.spacing],
            "origin_lps_mm": [round(o, 6) for o in self.origin],
            "direction": [round(float(d), 8) for d in self.direction.ravel()],
        }


def to_sitk(volume: Volume) -> sitk.Image:
    """A SimpleITK image of the volume (array copied; metadata dictionary left empty)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))  # [z, y, x] -> size (x, y, z)
    image.SetOrigin(volume.origin)
    image.SetSpacing(volume.spacing)
    image.SetDirection(tuple(float(d) for d in volume.direction.ravel()))
    return image


def from_sitk(image: sitk.Image) -> Volume:
    """A ``Volume`` from a 3-D SimpleITK image; never carries the image's metadata."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise GeometryError(
            f"expected a 3-D scalar image, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    return Volume(
        sitk.GetArrayFromImage(image),
        origin=image.GetOrigin(),
        spacing=image.GetSpacing(),
        direction=np.asarray(image.GetDirection()).reshape(3, 3),
    )


def read_nifti(path: str | os.PathLike[str]) -> Volume:
    """Read a ``.nii``/``.nii.gz`` file into a ``Volume`` (LPS geometry)."""
    path = Path(path)
    if not path.is_file():
        raise SeriesError(f"{path}: file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise SeriesError(f"{path}: not a readable NIfTI image ({str(exc).strip().splitlines()[-1]})") from exc
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    try:
        return from_sitk(image)
    except GeometryError as exc:
        raise SeriesError(f"{path}: {exc}") from exc


def reorient_lps(volume: Volume) -> Volume:
    """Permute and flip axes so x runs to patient Left, y to Posterior, z to Superior.

    That is how DICOM viewers show an axial slice (patient's right on the screen's left); NIfTI
    files are often stored the other way round (RAS), which would show mirror images to
    annotators. Only axes are permuted and flipped, so no voxel is interpolated.
    """
    image = sitk.DICOMOrient(to_sitk(volume), "LPS")
    return from_sitk(image)


def write_nifti(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write atomically: a reader never sees a half-written file, an old file survives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(to_sitk(volume), tmp, useCompression=suffix == ".nii.gz")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def grid_mismatches(a: Volume, b: Volume, atol_mm: float = DEFAULT_GRID_ATOL_MM) -> list[str]:
    """Human-readable differences between two grids (empty when they are the same)."""
    problems = []
    if a.shape != b.shape:
        problems.append(f"shape {a.shape} vs {b.shape}")
    if not np.allclose(a.spacing, b.spacing, atol=atol_mm):
        problems.append(f"spacing {a.spacing} vs {b.spacing} mm")
    if not np.allclose(a.origin, b.origin, atol=atol_mm):
        problems.append(f"origin {a.origin} vs {b.origin} mm")
    if not np.allclose(a.direction, b.direction, atol=atol_mm):
        problems.append(f"direction {a.direction.ravel().round(5).tolist()} vs {b.direction.ravel().round(5).tolist()}")
    return problems


def require_same_grid(a: Volume, b: Volume, atol_mm: float = DEFAULT_GRID_ATOL_MM, what: str = "volumes") -> None:
    """Raise ``GeometryError`` listing both geometries unless ``a`` and ``b`` share a grid."""
    problems = grid_mismatches(a, b, atol_mm)
    if problems:
        raise GeometryError(f"{what} are not on the same grid: " + "; ".join(problems) + " (resample one first)")
