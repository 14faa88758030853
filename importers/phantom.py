"""A synthetic patient — axial T1 and fat-sat T2 MRI of a thigh with a tumour — with known truth.

Why this exists: every importer, registration and export step needs data whose geometry and
tumour position are known *exactly*, that carries the traps real scanner exports have, and
that can be written in a second (no network, no patient data). This module writes such a
patient as DICOM (or NIfTI) and returns a :class:`PhantomTruth` describing what it wrote.

World frame and anatomy
    The anatomy is defined analytically in DICOM patient coordinates (LPS, mm): a thigh
    cross-section centred on ``ANATOMY.centre_lps`` — skin, a subcutaneous fat ring (outer
    ellipse 140 × 120 mm), muscle, a femur (dark cortical ring, fatty marrow) and a tumour
    ellipsoid in the muscle surrounded by a 5 mm oedema shell. Each series samples it at its
    own voxel centres, so masks and contours are exact, not resampled.

Traps planted on purpose (real exports have them too)
    * file names are random hex, and T2's InstanceNumbers are scrambled relative to slice
      position: readers must sort by position along the slice normal;
    * slices are 1° oblique (row/column cosines rotated about L), so "z" is not the slice axis;
    * SliceThickness (4 mm) differs from the slice spacing (5 mm, in SpacingBetweenSlices);
    * PixelSpacing is ``[row spacing, column spacing]`` = ``[y, x]``;
    * T2 stores ``(value - 10) / 0.5``: readers must apply RescaleSlope/RescaleIntercept;
    * the patient moves between the series (``t2_motion``) while both share one
      FrameOfReferenceUID, as on a real scanner — registration is still needed;
    * patient-identifying fields are filled (from ``phi``) so tests can check none leak.

Motion convention (the one thing to get right)
    ``motion = RigidMotion(rotation_deg=(ax, ay, az), translation_mm=t)`` with
    ``R = Rz(az) @ Ry(ay) @ Rx(ax)`` (rotation about x first, then y, then z; right-handed,
    in LPS) and centre ``c = ANATOMY.centre_lps`` (the limb centre). The 4 × 4 matrix

        ``M(q) = R @ (q - c) + c + t``        (``PhantomTruth.motion_matrix``)

    maps a point ``q`` of the anatomy as it lies in T1 (= the world) to where that same point
    appears in T2's scanner coordinates. Hence the T2 image value at physical point ``p`` is
    ``anatomy(M⁻¹ p) = anatomy(R.T @ (p - c - t) + c)``. ``M`` is exactly the transform
    ``sitk.Resample(t2, t1_reference, transform)`` needs to bring T2 onto T1
    (see :meth:`PhantomTruth.sitk_transform`).

Determinism
    For the same arguments everything is identical: pixels, file names, UIDs (derived from
    the arguments with ``generate_uid(entropy_srcs=...)``), so two calls with the same
    arguments describe the *same* patient. Change ``seed`` or ``phi`` for another patient.

CLI: ``python -m importers.phantom OUT_DIR [--tissue Myxoid] [--seed 0] [--nifti]``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from core.geometry import Volume, write_nifti

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"  # what RTReferencedStudySequence items reference

TISSUES: tuple[str, ...] = ("Fibrous", "Fat", "Myxoid", "Nerve", "Vascular")
"""Tumour tissue classes; their T1 / T2-FS appearance is in ``TUMOUR_SIGNAL``."""

EDEMA_MARGIN_MM = 5.0
"""Thickness of the peritumoral oedema shell (``GTV_Edema`` = tumour semi-axes + this)."""

CONTOUR_POINTS = 64
"""Vertices per RTSTRUCT contour polygon."""

DEFAULT_PHI: dict[str, str] = {
    "PatientName": "DOE^JANE",
    "PatientID": "MRN0001234",
    "PatientBirthDate": "19700101",
    "PatientSex": "F",
    "PatientAddress": "12 EXAMPLE ROAD^^SPRINGFIELD^^00000",
    "OtherPatientIDs": "NHS9990001234",
    "AccessionNumber": "ACC240315001",
    "ReferringPhysicianName": "SMITH^JOHN^^DR",
    "InstitutionName": "EXAMPLE GENERAL HOSPITAL",
    "InstitutionAddress": "1 HOSPITAL WAY, SPRINGFIELD",
    "StationName": "MRC35104",
    "OperatorsName": "TECH^ALEX",
}
"""Obviously fake but realistic identifying values; override or add any DICOM keyword via ``phi``."""


# --------------------------------------------------------------------------------------------
# Motion
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RigidMotion:
    """How the patient moved between T1 and T2: rotate about the limb centre, then translate.

    ``rotation_deg`` are rotations about the x (L), y (P) and z (S) axes in degrees, applied
    in that order (``R = Rz @ Ry @ Rx``); ``translation_mm`` is added afterwards (LPS mm).
    See the module docstring for the full convention.
    """

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def rotation_matrix(self) -> np.ndarray:
        """``Rz @ Ry @ Rx`` (3 × 3)."""
        return _rotation_xyz(self.rotation_deg)

    def matrix(self, centre_lps: Sequence[float]) -> np.ndarray:
        """4 × 4 homogeneous ``q -> R (q - c) + c + t`` (world/T1 point -> where it is in T2)."""
        rot = self.rotation_matrix()
        c = np.asarray(centre_lps, dtype=float)
        m = np.eye(4)
        m[:3, :3] = rot
        m[:3, 3] = c - rot @ c + np.asarray(self.translation_mm, dtype=float)
        return m


DEFAULT_T2_MOTION = RigidMotion(rotation_deg=(0.0, 0.0, 3.0), translation_mm=(4.0, -3.0, 2.0))


def _rotation_xyz(angles_deg: Sequence[float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# --------------------------------------------------------------------------------------------
# Anatomy (analytic, world frame)
# --------------------------------------------------------------------------------------------


class Label:
    """Integer labels of :meth:`PhantomAnatomy.labels` (0 = air)."""

    AIR, SKIN, FAT, MUSCLE, CORTEX, MARROW, EDEMA, TUMOUR = range(8)


@dataclass(frozen=True)
class TumourSignal:
    """Tumour intensity on T1 and T2-FS (same arbitrary units as ``NORMAL_SIGNAL``).

    ``heterogeneity`` scales a smooth world-frame texture (so T1 and T2 agree on where the
    tumour is patchy); ``t1_core``/``t2_core`` give a central 'target' (neurogenic tumours).
    """

    t1: float
    t2: float
    heterogeneity: float = 0.08
    t1_core: float | None = None
    t2_core: float | None = None


NORMAL_SIGNAL: dict[str, dict[int, float]] = {
    # SE T1: fat and fatty marrow bright, muscle intermediate, cortical bone dark.
    "T1": {
        Label.AIR: 0.0,
        Label.SKIN: 420.0,
        Label.FAT: 900.0,
        Label.MUSCLE: 330.0,
        Label.CORTEX: 25.0,
        Label.MARROW: 820.0,
        Label.EDEMA: 290.0,
    },
    # T2 fat-sat: fat and marrow suppressed (dark), oedema bright, bone dark.
    "T2": {
        Label.AIR: 0.0,
        Label.SKIN: 260.0,
        Label.FAT: 70.0,
        Label.MUSCLE: 190.0,
        Label.CORTEX: 20.0,
        Label.MARROW: 60.0,
        Label.EDEMA: 520.0,
    },
}

TUMOUR_SIGNAL: dict[str, TumourSignal] = {
    "Fibrous": TumourSignal(t1=260.0, t2=160.0),  # T1 low-intermediate, T2FS intermediate-low
    "Fat": TumourSignal(t1=880.0, t2=80.0, heterogeneity=0.05),  # follows fat, suppressed on FS
    "Myxoid": TumourSignal(t1=170.0, t2=1400.0, heterogeneity=0.10),  # T1 dark, T2FS very bright
    "Nerve": TumourSignal(t1=340.0, t2=950.0, t1_core=360.0, t2_core=380.0),  # target sign
    "Vascular": TumourSignal(t1=420.0, t2=1100.0, heterogeneity=0.35),  # bright, heterogeneous
}

NOISE_SIGMA = {"T1": 10.0, "T2": 8.0}
"""Std of each (real, imaginary) Gaussian channel before the magnitude: Rician noise."""

EDGE_MM = 1.0
"""Width of the linear partial-volume ramp across tissue boundaries in the images."""


@dataclass(frozen=True)
class PhantomAnatomy:
    """The thigh, in LPS mm. The limb runs along z (S); the femur tilts slightly medially.

    All shapes are functions of world points, so any grid (native, moved, resampled) can be
    evaluated exactly: :meth:`labels` for the tissue map, :meth:`tumour_inside` for the truth.
    """

    centre_lps: tuple[float, float, float] = (-85.0, 20.0, -420.0)
    limb_semi_axes_mm: tuple[float, float] = (70.0, 60.0)
    skin_mm: float = 2.0
    subcutaneous_fat_mm: float = 8.0
    limb_taper_per_mm: float = 0.0015  # the thigh narrows towards the knee (-z)
    femur_offset_mm: tuple[float, float] = (10.0, 10.0)
    femur_tilt: tuple[float, float] = (0.04, 0.0)  # femur centre shift per mm along z
    femur_radius_mm: float = 14.0
    cortex_mm: float = 5.0
    tumour_offset_mm: tuple[float, float, float] = (-22.0, -18.0, 3.0)
    tumour_semi_axes_mm: tuple[float, float, float] = (30.0, 22.0, 35.0)
    edema_margin_mm: float = EDEMA_MARGIN_MM

    @property
    def tumour_centre_lps(self) -> np.ndarray:
        return np.asarray(self.centre_lps) + np.asarray(self.tumour_offset_mm)

    @property
    def tumour_volume_mm3(self) -> float:
        a, b, c = self.tumour_semi_axes_mm
        return 4.0 / 3.0 * np.pi * a * b * c

    def tumour_axes(self, margin_mm: float = 0.0) -> np.ndarray:
        """3 × 3 matrix whose columns are the tumour's semi-axis vectors (world frame)."""
        return np.diag(np.asarray(self.tumour_semi_axes_mm) + margin_mm)

    # --- shape functions: x, y, z are broadcastable arrays of world LPS coordinates ---------

    def _limb(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
        cx, cy, cz = self.centre_lps
        scale = 1.0 + self.limb_taper_per_mm * (z - cz)
        a, b = self.limb_semi_axes_mm
        u, v = x - cx, y - cy
        d_outer = _ellipse_distance(u, v, a * scale, b * scale)
        d_fat = _ellipse_distance(u, v, a * scale - self.skin_mm, b * scale - self.skin_mm)
        inner = self.skin_mm + self.subcutaneous_fat_mm
        d_muscle = _ellipse_distance(u, v, a * scale - inner, b * scale - inner)
        fx = cx + self.femur_offset_mm[0] + self.femur_tilt[0] * (z - cz)
        fy = cy + self.femur_offset_mm[1] + self.femur_tilt[1] * (z - cz)
        r = np.sqrt((x - fx) ** 2 + (y - fy) ** 2)
        d_cortex = r - self.femur_radius_mm
        d_marrow = r - (self.femur_radius_mm - self.cortex_mm)
        return d_outer, d_fat, d_muscle, d_cortex, d_marrow

    def _tumour_distance(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray, margin_mm: float = 0.0, scale: float = 1.0
    ) -> np.ndarray:
        m = self.tumour_centre_lps
        a, b, c = (np.asarray(self.tumour_semi_axes_mm) + margin_mm) * scale
        return _ellipsoid_distance(x - m[0], y - m[1], z - m[2], a, b, c)

    def tumour_inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, margin_mm: float = 0.0) -> np.ndarray:
        """Boolean truth: inside the tumour ellipsoid (grown by ``margin_mm``)."""
        m = self.tumour_centre_lps
        a, b, c = np.asarray(self.tumour_semi_axes_mm) + margin_mm
        return ((x - m[0]) / a) ** 2 + ((y - m[1]) / b) ** 2 + ((z - m[2]) / c) ** 2 <= 1.0

    def labels(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Hard tissue labels (``Label``) at world points (boundaries at distance 0)."""
        d_outer, d_fat, d_muscle, d_cortex, d_marrow = self._limb(x, y, z)
        out = np.full(np.broadcast(x, y, z).shape, Label.AIR, np.uint8)
        out[d_outer <= 0] = Label.SKIN
        out[d_fat <= 0] = Label.FAT
        muscle = d_muscle <= 0
        out[muscle] = Label.MUSCLE
        out[muscle & self.tumour_inside(x, y, z, self.edema_margin_mm)] = Label.EDEMA
        out[d_cortex <= 0] = Label.CORTEX
        out[d_marrow <= 0] = Label.MARROW
        out[self.tumour_inside(x, y, z)] = Label.TUMOUR
        return out

    def signal(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray, series: str, tissue: str, texture: _Texture
    ) -> np.ndarray:
        """Noise-free, bias-free intensity of ``series`` ("T1"/"T2") at world points.

        Tissues are painted back to front with a linear ramp of ``EDGE_MM`` across each
        boundary — a cheap partial-volume effect, centred on the analytic boundary so that a
        voxel is more than half 'tumour' exactly when its centre is inside the truth mask.
        """
        normal = NORMAL_SIGNAL[series]
        d_outer, d_fat, d_muscle, d_cortex, d_marrow = self._limb(x, y, z)
        d_edema = self._tumour_distance(x, y, z, self.edema_margin_mm)
        d_tumour = self._tumour_distance(x, y, z)
        w_muscle = _ramp(d_muscle)
        value = np.zeros(np.broadcast(x, y, z).shape, np.float32)
        for weight, label in (
            (_ramp(d_outer), Label.SKIN),
            (_ramp(d_fat), Label.FAT),
            (w_muscle, Label.MUSCLE),
            (_ramp(d_edema) * w_muscle, Label.EDEMA),
            (_ramp(d_cortex), Label.CORTEX),
            (_ramp(d_marrow), Label.MARROW),
        ):
            value += weight * (normal[label] - value)

        w_tumour = _ramp(d_tumour)
        inside = w_tumour > 0
        if np.any(inside):
            sig = TUMOUR_SIGNAL[tissue]
            xi, yi, zi = (np.broadcast_to(a, value.shape)[inside] for a in (x, y, z))
            level = sig.t1 if series == "T1" else sig.t2
            core = sig.t1_core if series == "T1" else sig.t2_core
            tumour = np.full(xi.shape, level, np.float32)
            if core is not None:
                w_core = _ramp(self._tumour_distance(xi, yi, zi, scale=0.45), EDGE_MM * 4)
                tumour += w_core * (core - tumour)
            tumour *= 1.0 + sig.heterogeneity * texture(xi, yi, zi)
            value[inside] += w_tumour[inside] * (tumour - value[inside])
        return value


ANATOMY = PhantomAnatomy()


def _ellipse_distance(u: np.ndarray, v: np.ndarray, a: Any, b: Any) -> np.ndarray:
    """Approximate signed distance (mm) to the ellipse ``(u/a)² + (v/b)² = 1`` (first order)."""
    q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    grad = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(grad > 1e-12, (q - 1.0) * q / np.maximum(grad, 1e-12), -np.minimum(a, b))
    return d


def _ellipsoid_distance(u: np.ndarray, v: np.ndarray, w: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    q = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
    grad = np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2 + (w / c**2) ** 2)
    return np.where(grad > 1e-12, (q - 1.0) * q / np.maximum(grad, 1e-12), -min(a, b, c))


def _ramp(distance_mm: np.ndarray, width_mm: float = EDGE_MM) -> np.ndarray:
    """Inside weight: 1 well inside, 0 well outside, 0.5 on the boundary."""
    return np.clip(0.5 - distance_mm / width_mm, 0.0, 1.0).astype(np.float32)


class _Texture:
    """A smooth random field in [-1, 1] defined in the world frame (sum of plane waves).

    Defined on world points, not voxels, so the tumour's patchiness is the same tissue on
    T1 and T2 and moves with the patient.
    """

    def __init__(self, rng: np.random.Generator, waves: int = 6) -> None:
        directions = rng.normal(size=(waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(8.0, 20.0, size=waves)
        self.k = directions * (2 * np.pi / wavelengths)[:, None]
        self.phase = rng.uniform(0, 2 * np.pi, size=waves)

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        total = np.zeros(np.shape(x), np.float32)
        for (kx, ky, kz), ph in zip(self.k, self.phase, strict=True):
            total += np.cos(kx * x + ky * y + kz * z + ph)
        return np.clip(total / np.sqrt(len(self.phase) / 2.0) / 2.0, -1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


def _grid_axes(affine: np.ndarray, shape_zyx: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World x, y, z of every voxel centre of a grid, as broadcastable ``[z, y, x]`` arrays.

    ``affine`` maps ``(i, j, k, 1)`` indices to world points; keeping the three components
    separate (and affine in the indices) avoids an ``(n, 3)`` point array.
    """
    nz, ny, nx = shape_zyx
    i = np.arange(nx, dtype=np.float64)[None, None, :]
    j = np.arange(ny, dtype=np.float64)[None, :, None]
    k = np.arange(nz, dtype=np.float64)[:, None, None]
    comps = tuple(affine[r, 3] + affine[r, 0] * i + affine[r, 1] * j + affine[r, 2] * k for r in range(3))
    return comps  # type: ignore[return-value]


def _centred_grid(
    shape_zyx: Sequence[int], spacing_xyz: Sequence[float], direction: np.ndarray, centre_lps: Sequence[float]
) -> Volume:
    """An empty ``Volume`` whose middle (continuous index (n-1)/2) lies on ``centre_lps``."""
    size_xyz = np.asarray(shape_zyx[::-1], dtype=float)
    half = direction @ (np.asarray(spacing_xyz, dtype=float) * (size_xyz - 1) / 2.0)
    origin = np.asarray(centre_lps, dtype=float) - half
    return Volume(np.zeros(tuple(shape_zyx), np.uint8), tuple(origin), tuple(spacing_xyz), direction)


def _oblique_direction(oblique_deg: float) -> np.ndarray:
    """Axial direction cosines tilted by ``oblique_deg`` about L: the column axis gains some S."""
    return _rotation_xyz((oblique_deg, 0.0, 0.0)) @ np.eye(3)


T2_CENTRE_OFFSET_MM = (1.5, -2.0, 2.5)
"""The T2 slab is not centred exactly where T1's is (x, y along the image axes, z along the normal)."""


# --------------------------------------------------------------------------------------------
# Truth
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class PhantomTruth:
    """What a phantom patient is, exactly. Produced by the ``write_phantom_*`` functions.

    ``t1`` and ``t2`` are each series' native grid (the geometry a correct DICOM reader must
    reproduce) holding the ground-truth tumour mask (uint8 0/1) rasterised from the analytic
    ellipsoid at voxel centres — on T2 that is the *moved* tumour, where it appears in T2.
    ``motion_matrix`` (4 × 4) maps a T1/world point to where it appears in T2 (module
    docstring). UIDs and paths are ``None`` for NIfTI phantoms. ``*_sop_uids`` are in slice
    order (index k along the slice normal), not InstanceNumber order.
    """

    tissue: str
    seed: int
    anatomy: PhantomAnatomy
    t1: Volume
    t2: Volume
    motion: RigidMotion | None
    motion_matrix: np.ndarray
    t1_rescale: tuple[float, float] = (1.0, 0.0)
    t2_rescale: tuple[float, float] = (1.0, 0.0)
    phi: dict[str, str] = field(default_factory=dict)
    out_dir: Path | None = None
    study_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    t1_series_uid: str | None = None
    t2_series_uid: str | None = None
    t1_sop_uids: tuple[str, ...] = ()
    t2_sop_uids: tuple[str, ...] = ()
    t1_rtstruct_path: Path | None = None
    t2_rtstruct_path: Path | None = None
    t1_rtstruct_series_uid: str | None = None
    t2_rtstruct_series_uid: str | None = None

    @property
    def motion_centre_lps(self) -> tuple[float, float, float]:
        return self.anatomy.centre_lps

    @property
    def t2_from_t1(self) -> np.ndarray:
        """Alias of ``motion_matrix``: T1/world point -> the same anatomy's position in T2."""
        return self.motion_matrix

    @property
    def t1_dir(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "T1"

    @property
    def t2_dir(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "T2"

    @property
    def tumour_volume_ml(self) -> float:
        """Analytic tumour volume (4/3 π a b c), in millilitres."""
        return self.anatomy.tumour_volume_mm3 / 1000.0

    def world_to_t2(self, points_lps: Any) -> np.ndarray:
        """Map world/T1 points (``(3,)`` or ``(n, 3)``) to where they appear in T2."""
        pts = np.asarray(points_lps, dtype=float)
        return pts @ self.motion_matrix[:3, :3].T + self.motion_matrix[:3, 3]

    def t2_to_world(self, points_lps: Any) -> np.ndarray:
        """Inverse of :meth:`world_to_t2`."""
        inv = np.linalg.inv(self.motion_matrix)
        return np.asarray(points_lps, dtype=float) @ inv[:3, :3].T + inv[:3, 3]

    def sitk_transform(self) -> sitk.AffineTransform:
        """``motion_matrix`` as a SimpleITK transform (T1 point -> T2 point).

        ``sitk.Resample(t2_image, t1_image, truth.sitk_transform())`` puts T2 on T1's grid,
        aligned — the answer a registration should find.
        """
        tx = sitk.AffineTransform(3)
        tx.SetMatrix(tuple(float(v) for v in self.motion_matrix[:3, :3].ravel()))
        tx.SetTranslation(tuple(float(v) for v in self.motion_matrix[:3, 3]))
        return tx

    def _world_axes_on(self, grid: Volume, moved: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        affine = grid.affine_lps
        if moved:  # the anatomy seen in T2 at p is the world anatomy at M⁻¹ p
            affine = np.linalg.inv(self.motion_matrix) @ affine
        return _grid_axes(affine, grid.shape)

    def tumour_mask_on(self, volume_grid: Volume, *, moved: bool = False, margin_mm: float = 0.0) -> np.ndarray:
        """The analytic tumour rasterised at the voxel centres of any grid (uint8 ``[z, y, x]``).

        By default in the un-moved world (T1's frame), which is what a T2 registered and
        resampled onto T1 should show; ``moved=True`` gives the tumour as it lies in T2's
        frame; ``margin_mm=EDEMA_MARGIN_MM`` gives the ``GTV_Edema`` outer ellipsoid.
        """
        x, y, z = self._world_axes_on(volume_grid, moved)
        return self.anatomy.tumour_inside(x, y, z, margin_mm).astype(np.uint8)

    def labels_on(self, volume_grid: Volume, *, moved: bool = False) -> np.ndarray:
        """Tissue labels (``Label``) at the voxel centres of any grid (uint8 ``[z, y, x]``)."""
        x, y, z = self._world_axes_on(volume_grid, moved)
        return self.anatomy.labels(x, y, z)


# --------------------------------------------------------------------------------------------
# Rendering (no files)
# --------------------------------------------------------------------------------------------


def _canonical_tissue(tissue: str) -> str:
    for name in TISSUES:
        if name.lower() == str(tissue).strip().lower():
            return name
    raise ValueError(f"unknown tissue {tissue!r}; choose one of {', '.join(TISSUES)}")


def _bias_field(grid: Volume, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative coil-sensitivity field in the *scanner* frame (it does not move
    with the patient): exp(linear + quadratic) over the FOV, roughly 0.75–1.25."""
    x, y, z = _grid_axes(grid.affine_lps, grid.shape)
    centre = grid.index_to_physical((np.asarray(grid.size_xyz) - 1) / 2.0)
    u, v, w = (x - centre[0]) / 100.0, (y - centre[1]) / 100.0, (z - centre[2]) / 100.0
    a = rng.uniform(-0.15, 0.15, size=3)
    quad = rng.uniform(-0.2, -0.05)
    return np.exp(a[0] * u + a[1] * v + a[2] * w + quad * (u**2 + v**2)).astype(np.float32)


def make_phantom_volumes(
    *,
    tissue: str = "Myxoid",
    seed: int = 0,
    t2_motion: RigidMotion | None = DEFAULT_T2_MOTION,
    t1_shape: Sequence[int] = (24, 192, 192),
    t1_spacing: Sequence[float] = (0.9, 0.9, 5.0),
    t2_shape: Sequence[int] = (24, 144, 144),
    t2_spacing: Sequence[float] = (1.2, 1.2, 5.0),
    oblique_deg: float = 1.0,
    anatomy: PhantomAnatomy = ANATOMY,
) -> tuple[Volume, Volume, PhantomTruth]:
    """Render the phantom in memory: ``(t1_image, t2_image, truth)``, images float32.

    Image values are the physical values a correct reader returns (the DICOM writer then
    quantises them to its stored integers: within half a rescale step, clipped to 12 bits).
    The writers call this, so tests that need arrays but not files can call it directly.
    """
    tissue = _canonical_tissue(tissue)
    direction = _oblique_direction(oblique_deg)
    centre = np.asarray(anatomy.centre_lps, dtype=float)
    t1_grid = _centred_grid(t1_shape, t1_spacing, direction, centre)
    t2_grid = _centred_grid(t2_shape, t2_spacing, direction, centre + direction @ np.asarray(T2_CENTRE_OFFSET_MM))
    motion_matrix = np.eye(4) if t2_motion is None else t2_motion.matrix(anatomy.centre_lps)

    # Independent streams per purpose, so changing one never shifts another.
    texture = _Texture(np.random.default_rng([seed, 1]))
    images = []
    for series, grid, affine in (
        ("T1", t1_grid, t1_grid.affine_lps),
        ("T2", t2_grid, np.linalg.inv(motion_matrix) @ t2_grid.affine_lps),
    ):
        stream = 2 if series == "T1" else 3
        rng = np.random.default_rng([seed, stream])
        x, y, z = _grid_axes(affine, grid.shape)
        clean = anatomy.signal(x, y, z, series, tissue, texture) * _bias_field(grid, rng)
        sigma = NOISE_SIGMA[series]
        real = clean + rng.normal(0.0, sigma, size=clean.shape).astype(np.float32)
        imag = rng.normal(0.0, sigma, size=clean.shape).astype(np.float32)
        images.append(grid.with_array(np.sqrt(real**2 + imag**2).astype(np.float32)))

    # Built on the empty grids first, because rasterising the truth uses the truth's own motion.
    truth = PhantomTruth(
        tissue=tissue,
        seed=seed,
        anatomy=anatomy,
        t1=t1_grid,
        t2=t2_grid,
        motion=t2_motion,
        motion_matrix=motion_matrix,
    )
    truth.t1 = t1_grid.with_array(truth.tumour_mask_on(t1_grid))
    truth.t2 = t2_grid.with_array(truth.tumour_mask_on(t2_grid, moved=True))
    return images[0], images[1], truth


# --------------------------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------------------------

T1_RESCALE = (1.0, 0.0)
T2_RESCALE = (0.5, 10.0)
"""``value = stored * slope + intercept``; T2's is not the identity, so readers must apply it."""

BITS_STORED = 12

_SERIES_META: dict[str, dict[str, Any]] = {
    "T1": {
        "SeriesDescription": "AX SE T1",
        "ProtocolName": "t1_se_tra",
        "SeriesNumber": 3,
        "SeriesTime": "102012.000000",
        "ScanningSequence": "SE",
        "SequenceVariant": ["SK", "SP"],
        "ScanOptions": "",
        "SequenceName": "*se2d1",
        "RepetitionTime": 550.0,
        "EchoTime": 12.0,
        "EchoTrainLength": 1,
        "FlipAngle": 90.0,
        "PixelBandwidth": 150.0,
    },
    "T2": {
        "SeriesDescription": "AX T2 FS",
        "ProtocolName": "t2_tse_fs_tra",
        "SeriesNumber": 5,
        "SeriesTime": "103544.000000",
        "ScanningSequence": "SE",
        "SequenceVariant": ["SK", "SP", "OSP"],
        "ScanOptions": "FS",
        "SequenceName": "*tse2d1_15",
        "RepetitionTime": 4000.0,
        "EchoTime": 85.0,
        "EchoTrainLength": 15,
        "FlipAngle": 150.0,
        "PixelBandwidth": 220.0,
    },
}

STUDY_DATE = "20240315"


def _ds(value: float) -> DSfloat:
    """A DS value that fits DICOM's 16 characters (full precision otherwise)."""
    return DSfloat(float(value), auto_format=True)


class _Uids:
    """Deterministic UIDs: the same arguments give the same patient, different ones do not."""

    def __init__(self, *parts: Any) -> None:
        self._key = hashlib.sha256(repr(parts).encode()).hexdigest()

    def __call__(self, *name: Any) -> str:
        return str(generate_uid(entropy_srcs=[self._key, *map(str, name)]))


def _resolve_phi(phi: dict[str, str] | None) -> dict[str, str]:
    merged = dict(DEFAULT_PHI)
    for key, value in (phi or {}).items():
        if tag_for_keyword(key) is None:
            raise ValueError(f"phi key {key!r} is not a DICOM keyword")
        merged[key] = str(value)
    return merged


def _new_dataset(sop_class: str, sop_instance: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "STS_PHANTOM_1"
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    return ds


def _add_patient_study(ds: Dataset, phi: dict[str, str], study_uid: str) -> None:
    for key, value in phi.items():
        setattr(ds, key, value)
    ds.PatientAge = "054Y"
    ds.PatientWeight = _ds(68.0)
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = "101530.000000"
    ds.StudyID = "1"
    ds.StudyDescription = "MRI THIGH WITHOUT CONTRAST"
    ds.Manufacturer = "SIEMENS"


def _write_series(
    series: str,
    image: Volume,
    folder: Path,
    *,
    phi: dict[str, str],
    uids: _Uids,
    study_uid: str,
    for_uid: str,
    series_uid: str,
    rescale: tuple[float, float],
    scramble_instances: bool,
    rng: np.random.Generator,
) -> tuple[str, ...]:
    """One file per slice, random hex names; returns SOPInstanceUIDs in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    slope, intercept = rescale
    stored = np.clip(np.rint((image.array - intercept) / slope), 0, 2**BITS_STORED - 1).astype("<u2")
    nz = image.shape[0]
    normal = image.normal
    row_dir, col_dir = image.direction[:, 0], image.direction[:, 1]
    instance_numbers = (rng.permutation(nz) + 1) if scramble_instances else np.arange(1, nz + 1)
    names: set[str] = set()
    while len(names) < nz:
        names.add(rng.bytes(8).hex().upper() + ".dcm")
    file_names = sorted(names)
    rng.shuffle(file_names)  # names are unrelated to slice position
    lo, hi = np.percentile(image.array, [1.0, 99.5])
    meta = _SERIES_META[series]
    sop_uids = tuple(uids(series, "sop", k) for k in range(nz))

    for k in range(nz):
        ds = _new_dataset(MR_IMAGE_STORAGE, sop_uids[k])
        _add_patient_study(ds, phi, study_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = STUDY_DATE
        ds.SeriesTime = meta["SeriesTime"]
        ds.AcquisitionTime = ds.ContentTime = meta["SeriesTime"]
        ds.ManufacturerModelName = "Avanto_fit"
        ds.SoftwareVersions = "syngo MR E11"
        ds.MagneticFieldStrength = _ds(1.5)
        ds.ImagingFrequency = _ds(63.676)
        ds.ImagedNucleus = "1H"
        ds.BodyPartExamined = "THIGH"
        ds.PatientPosition = "FFS"
        for key in (
            "SeriesDescription",
            "ProtocolName",
            "SeriesNumber",
            "ScanningSequence",
            "SequenceVariant",
            "SequenceName",
            "EchoTrainLength",
        ):
            setattr(ds, key, meta[key])
        if meta["ScanOptions"]:
            ds.ScanOptions = meta["ScanOptions"]
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = _ds(meta["RepetitionTime"])
        ds.EchoTime = _ds(meta["EchoTime"])
        ds.FlipAngle = _ds(meta["FlipAngle"])
        ds.PixelBandwidth = _ds(meta["PixelBandwidth"])
        ds.EchoNumbers = 1
        ds.NumberOfAverages = _ds(1.0)
        ds.TransmitCoilName = "Body"
        ds.ReceiveCoilName = "BO1,2;SP5"
        ds.InPlanePhaseEncodingDirection = "ROW"
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = int(instance_numbers[k])
        ds.SliceThickness = _ds(0.8 * image.spacing[2])  # ≠ spacing, as on real scanners
        ds.SpacingBetweenSlices = _ds(image.spacing[2])
        position = image.index_to_physical((0.0, 0.0, float(k)))
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.SliceLocation = _ds(float(position @ normal))
        ds.Rows, ds.Columns = image.shape[1], image.shape[2]
        ds.PixelSpacing = [_ds(image.spacing[1]), _ds(image.spacing[0])]  # [row spacing, column spacing]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = BITS_STORED
        ds.HighBit = BITS_STORED - 1
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        ds.RescaleType = "US"
        ds.WindowCenter = _ds(round((lo + hi) / 2.0))
        ds.WindowWidth = _ds(round(max(hi - lo, 1.0)))
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        ds.save_as(folder / file_names[k], enforce_file_format=True)
    return sop_uids


def _ellipse_on_plane(
    centre: np.ndarray,
    axes: np.ndarray,
    origin: np.ndarray,
    e1: np.ndarray,
    e2: np.ndarray,
    n_points: int = CONTOUR_POINTS,
) -> np.ndarray | None:
    """The intersection of an ellipsoid with a plane, as ``(n, 3)`` points lying on the plane.

    The ellipsoid is ``{x : |A⁻¹ (x - centre)| ≤ 1}`` with ``A = axes`` (columns = semi-axis
    vectors); the plane is ``origin + u e1 + v e2``. Substituting gives a 2-D quadratic
    ``(w - w0)ᵀ M (w - w0) ≤ k`` in ``w = (u, v)``; ``None`` when the plane misses it.
    """
    a_inv = np.linalg.inv(axes)
    q = a_inv.T @ a_inv
    basis = np.stack([e1, e2], axis=1)  # 3 × 2
    d = origin - centre
    m2 = basis.T @ q @ basis
    b = basis.T @ q @ d
    w0 = -np.linalg.solve(m2, b)
    k = 1.0 - (d @ q @ d - b @ np.linalg.solve(m2, b))
    if k <= 1e-9:
        return None
    chol = np.linalg.cholesky(m2)  # m2 = L Lᵀ -> w - w0 = sqrt(k) L⁻ᵀ (cos t, sin t)
    t = np.linspace(0.0, 2 * np.pi, n_points, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)])
    w = w0[:, None] + np.sqrt(k) * np.linalg.solve(chol.T, circle)
    return origin[None, :] + (basis @ w).T


def _write_rtstruct(
    path: Path,
    grid: Volume,
    rois: Sequence[tuple[str, np.ndarray, np.ndarray, tuple[int, int, int]]],
    *,
    phi: dict[str, str],
    study_uid: str,
    for_uid: str,
    image_series_uid: str,
    image_sop_uids: Sequence[str],
    sop_uid: str,
    series_uid: str,
    label: str,
) -> None:
    """An RT Structure Set on ``grid``'s slices; ``rois`` = (name, centre, axes, colour)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _new_dataset(RT_STRUCTURE_SET_STORAGE, sop_uid)
    _add_patient_study(ds, phi, study_uid)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 901
    ds.SeriesDescription = label
    ds.SeriesDate = ds.StructureSetDate = STUDY_DATE
    ds.SeriesTime = ds.StructureSetTime = "120000.000000"
    ds.InstanceNumber = 1
    ds.ManufacturerModelName = "STS phantom"
    ds.StructureSetLabel = label
    ds.StructureSetName = label

    contour_images = []
    for uid in image_sop_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = MR_IMAGE_STORAGE
        item.ReferencedSOPInstanceUID = uid
        contour_images.append(item)
    rt_series = Dataset()
    rt_series.SeriesInstanceUID = image_series_uid
    rt_series.ContourImageSequence = contour_images
    rt_study = Dataset()
    rt_study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    rt_study.ReferencedSOPInstanceUID = study_uid
    rt_study.RTReferencedSeriesSequence = [rt_series]
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = for_uid
    ref_for.RTReferencedStudySequence = [rt_study]
    ds.ReferencedFrameOfReferenceSequence = [ref_for]

    roi_items, contour_items, observation_items = [], [], []
    e1, e2 = grid.direction[:, 0], grid.direction[:, 1]
    for number, (name, centre, axes, colour) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        roi_items.append(roi)

        contours = []
        for k in range(grid.shape[0]):
            plane_origin = grid.index_to_physical((0.0, 0.0, float(k)))
            points = _ellipse_on_plane(centre, axes, plane_origin, e1, e2)
            if points is None:
                continue
            image_ref = Dataset()
            image_ref.ReferencedSOPClassUID = MR_IMAGE_STORAGE
            image_ref.ReferencedSOPInstanceUID = image_sop_uids[k]
            contour = Dataset()
            contour.ContourImageSequence = [image_ref]
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourNumber = len(contours) + 1
            contour.ContourData = [_ds(v) for v in points.ravel()]
            contours.append(contour)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(colour)
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = contours
        contour_items.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "GTV"
        observation.ROIInterpreter = ""
        observation_items.append(observation)

    ds.StructureSetROISequence = roi_items
    ds.ROIContourSequence = contour_items
    ds.RTROIObservationsSequence = observation_items
    ds.save_as(path, enforce_file_format=True)


def _prepare_dirs(out_dir: Path, subdirs: Sequence[str], overwrite: bool) -> None:
    for name in subdirs:
        folder = out_dir / name
        existing = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
        if existing and not overwrite:
            raise FileExistsError(
                f"{folder} already holds {len(existing)} file(s); pass overwrite=True (--overwrite) to replace"
            )
        for path in existing:
            path.unlink()


def write_phantom_patient(
    out_dir: Path,
    *,
    tissue: str = "Myxoid",
    seed: int = 0,
    t2_motion: RigidMotion | None = DEFAULT_T2_MOTION,
    phi: dict[str, str] | None = None,
    with_rtstruct: bool = True,
    t1_shape: Sequence[int] = (24, 192, 192),
    t1_spacing: Sequence[float] = (0.9, 0.9, 5.0),
    t2_shape: Sequence[int] = (24, 144, 144),
    t2_spacing: Sequence[float] = (1.2, 1.2, 5.0),
    oblique_deg: float = 1.0,
    overwrite: bool = False,
) -> PhantomTruth:
    """Write the phantom patient as DICOM and return its truth.

    Layout: ``out_dir/T1/*.dcm`` ("AX SE T1"), ``out_dir/T2/*.dcm`` ("AX T2 FS"), and with
    ``with_rtstruct`` ``out_dir/T1_contours/rtstruct.dcm`` (``GTV_Mass`` and ``GTV_Edema``
    drawn on T1) and ``out_dir/T2_contours/rtstruct.dcm`` (``GTV_Mass`` drawn on T2 where the
    moved tumour appears). Shapes are ``[z, y, x]``, spacings ``(x, y, z)`` mm. ``phi``
    overrides/extends ``DEFAULT_PHI`` (any DICOM keyword). Existing phantom files in those
    folders raise ``FileExistsError`` unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    t1_image, t2_image, truth = make_phantom_volumes(
        tissue=tissue,
        seed=seed,
        t2_motion=t2_motion,
        t1_shape=t1_shape,
        t1_spacing=t1_spacing,
        t2_shape=t2_shape,
        t2_spacing=t2_spacing,
        oblique_deg=oblique_deg,
    )
    phi_used = _resolve_phi(phi)
    _prepare_dirs(out_dir, ["T1", "T2", "T1_contours", "T2_contours"], overwrite)
    motion_key = None if t2_motion is None else (t2_motion.rotation_deg, t2_motion.translation_mm)
    uids = _Uids(
        truth.tissue,
        seed,
        motion_key,
        sorted(phi_used.items()),
        tuple(t1_shape),
        tuple(t1_spacing),
        tuple(t2_shape),
        tuple(t2_spacing),
        oblique_deg,
    )
    study_uid, for_uid = uids("study"), uids("frame-of-reference")
    t1_series_uid, t2_series_uid = uids("T1", "series"), uids("T2", "series")
    common = {"phi": phi_used, "uids": uids, "study_uid": study_uid, "for_uid": for_uid}
    t1_sops = _write_series(
        "T1",
        t1_image,
        out_dir / "T1",
        series_uid=t1_series_uid,
        rescale=T1_RESCALE,
        scramble_instances=False,
        rng=np.random.default_rng([seed, 4]),
        **common,
    )
    t2_sops = _write_series(
        "T2",
        t2_image,
        out_dir / "T2",
        series_uid=t2_series_uid,
        rescale=T2_RESCALE,
        scramble_instances=True,
        rng=np.random.default_rng([seed, 5]),
        **common,
    )

    truth.phi = phi_used
    truth.out_dir = out_dir
    truth.t1_rescale, truth.t2_rescale = T1_RESCALE, T2_RESCALE
    truth.study_instance_uid, truth.frame_of_reference_uid = study_uid, for_uid
    truth.t1_series_uid, truth.t2_series_uid = t1_series_uid, t2_series_uid
    truth.t1_sop_uids, truth.t2_sop_uids = t1_sops, t2_sops

    if with_rtstruct:
        anatomy = truth.anatomy
        centre, axes = anatomy.tumour_centre_lps, anatomy.tumour_axes()
        edema_axes = anatomy.tumour_axes(anatomy.edema_margin_mm)
        truth.t1_rtstruct_path = out_dir / "T1_contours" / "rtstruct.dcm"
        truth.t1_rtstruct_series_uid = uids("T1", "rtstruct-series")
        _write_rtstruct(
            truth.t1_rtstruct_path,
            truth.t1,
            [("GTV_Mass", centre, axes, (255, 0, 0)), ("GTV_Edema", centre, edema_axes, (255, 200, 0))],
            phi=phi_used,
            study_uid=study_uid,
            for_uid=for_uid,
            image_series_uid=t1_series_uid,
            image_sop_uids=t1_sops,
            sop_uid=uids("T1", "rtstruct"),
            series_uid=truth.t1_rtstruct_series_uid,
            label="T1 contours",
        )
        rot = truth.motion_matrix[:3, :3]
        truth.t2_rtstruct_path = out_dir / "T2_contours" / "rtstruct.dcm"
        truth.t2_rtstruct_series_uid = uids("T2", "rtstruct-series")
        _write_rtstruct(
            truth.t2_rtstruct_path,
            truth.t2,
            [("GTV_Mass", truth.world_to_t2(centre), rot @ axes, (255, 0, 0))],
            phi=phi_used,
            study_uid=study_uid,
            for_uid=for_uid,
            image_series_uid=t2_series_uid,
            image_sop_uids=t2_sops,
            sop_uid=uids("T2", "rtstruct"),
            series_uid=truth.t2_rtstruct_series_uid,
            label="T2 contours",
        )
    return truth


def write_phantom_nifti(
    out_dir: Path,
    *,
    tissue: str = "Myxoid",
    seed: int = 0,
    t2_motion: RigidMotion | None = DEFAULT_T2_MOTION,
    t1_shape: Sequence[int] = (24, 192, 192),
    t1_spacing: Sequence[float] = (0.9, 0.9, 5.0),
    t2_shape: Sequence[int] = (24, 144, 144),
    t2_spacing: Sequence[float] = (1.2, 1.2, 5.0),
    oblique_deg: float = 1.0,
) -> PhantomTruth:
    """The same phantom as ``T1.nii.gz``, ``T2.nii.gz`` (float32, physical values) and
    ``GTV_Mass_mask.nii.gz`` (uint8, on T1's grid) in ``out_dir``; NIfTI carries no UIDs or PHI."""
    out_dir = Path(out_dir)
    t1_image, t2_image, truth = make_phantom_volumes(
        tissue=tissue,
        seed=seed,
        t2_motion=t2_motion,
        t1_shape=t1_shape,
        t1_spacing=t1_spacing,
        t2_shape=t2_shape,
        t2_spacing=t2_spacing,
        oblique_deg=oblique_deg,
    )
    write_nifti(t1_image, out_dir / "T1.nii.gz")
    write_nifti(t2_image, out_dir / "T2.nii.gz")
    write_nifti(truth.t1, out_dir / "GTV_Mass_mask.nii.gz")
    truth.out_dir = out_dir
    return truth


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m importers.phantom OUT_DIR [--tissue Myxoid] [--seed 0] [--nifti]``."""
    parser = argparse.ArgumentParser(
        prog="python -m importers.phantom",
        description="Write a synthetic thigh-tumour MRI patient (T1, T2 fat-sat, contours) with known truth.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tissue", default="Myxoid", type=_canonical_tissue, help=f"one of {', '.join(TISSUES)}")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--nifti", action="store_true", help="write NIfTI volumes instead of DICOM")
    parser.add_argument("--no-motion", action="store_true", help="the patient does not move between series")
    parser.add_argument("--no-rtstruct", action="store_true", help="DICOM only: skip the RTSTRUCT files")
    parser.add_argument("--overwrite", action="store_true", help="replace phantom files already in OUT_DIR")
    args = parser.parse_args(argv)
    motion = None if args.no_motion else DEFAULT_T2_MOTION
    try:
        if args.nifti:
            truth = write_phantom_nifti(args.out_dir, tissue=args.tissue, seed=args.seed, t2_motion=motion)
        else:
            truth = write_phantom_patient(
                args.out_dir,
                tissue=args.tissue,
                seed=args.seed,
                t2_motion=motion,
                with_rtstruct=not args.no_rtstruct,
                overwrite=args.overwrite,
            )
    except (FileExistsError, ValueError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {truth.tissue} phantom (seed {truth.seed}) to {args.out_dir}: tumour "
        f"{truth.tumour_volume_ml:.1f} ml, T1 {truth.t1.shape} T2 {truth.t2.shape} [z, y, x]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
