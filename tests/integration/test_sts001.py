"""Real data: TCIA STS_001 (T1 + T2 fat-sat DICOM with RTSTRUCTs), see ../shared/data/README.md.

Images: TCIA "Soft-tissue-Sarcoma" (Vallières et al. 2015, DOI 10.7937/K9/TCIA.2015.7GO2GSKS), CC BY 3.0.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from core.case_store import CaseStore
from core.geometry import read_nifti
from importers.pipeline import ImportOptions, import_patient

pytestmark = pytest.mark.slow


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def sts001_case(sts001: Path, tmp_path_factory):
    store = CaseStore(tmp_path_factory.mktemp("data"))
    result = import_patient(sts001, ImportOptions("STS-0001", "sarcoma", "Myxoid", "thigh"), store)
    return store.case("STS-0001"), result


def test_reference_is_the_t1_grid(sts001_case) -> None:
    _layout, result = sts001_case
    assert result.reference_modality == "T1"
    assert result.shape == [40, 512, 512]
    assert result.slices == {"T1": 40, "T2": 40}
    np.testing.assert_allclose(result.spacing, [0.390625, 0.390625, 5.2], atol=1e-4)  # not SliceThickness (4 mm)


def test_geometry_matches_simpleitk_reading_the_dicom(sts001_case, sts001: Path) -> None:
    layout, _ = sts001_case
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(sts001 / "MR_T1" / "image")))
    expected = reader.Execute()
    for modality in ("T1", "T2"):
        ours = read_nifti(layout.volume(modality))
        np.testing.assert_allclose(ours.origin, expected.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(ours.spacing, expected.GetSpacing(), atol=1e-3)
        np.testing.assert_allclose(ours.direction.ravel(), expected.GetDirection(), atol=1e-3)
    t1 = read_nifti(layout.volume("T1"))
    np.testing.assert_array_equal(t1.array, sitk.GetArrayFromImage(expected))
    # A second library reads the same place: nibabel's RAS affine equals ours.
    np.testing.assert_allclose(nib.load(layout.volume("T1")).affine, t1.affine_ras, atol=1e-3)


def test_gtv_drawn_on_t2_lands_on_the_gtv_drawn_on_t1(sts001_case) -> None:
    layout, result = sts001_case
    on_t1 = read_nifti(layout.label("GTV_Mass", "T1")).array
    from_t2 = read_nifti(layout.label("GTV_Mass", "T2")).array
    overlap = dice(on_t1, from_t2)
    assert overlap >= 0.85, f"GTV_Mass T2 vs T1 Dice {overlap:.3f}"
    mass = next(label for label in result.labels if label["roi"] == "GTV_Mass" and label["modality"] == "T1")
    assert 300 < mass["volume_ml"] < 450 and len(mass["slices"]) == 20


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    return np.asarray(sitk.VersorTransform(tuple(axis), float(np.radians(degrees))).GetMatrix()).reshape(3, 3)


def test_t2_with_moved_geometry_registers_back(sts001_case, sts001: Path, tmp_path: Path) -> None:
    """Move T2's geometry tags by 3° and 8 mm: registration must undo it."""
    layout, _ = sts001_case
    patient = tmp_path / "patient"
    shutil.copytree(sts001 / "MR_T1" / "image", patient / "T1")
    moved_dir = patient / "T2_moved"
    moved_dir.mkdir(parents=True)
    rotation = _rotation(np.array([0.3, 0.5, 0.8]), 3.0)
    translation = np.array([5.0, -4.0, 4.9])  # 8.0 mm
    files = sorted((sts001 / "MR_T2" / "image").glob("*.dcm"))
    centre = np.mean([np.asarray(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, float)
                      for f in files], axis=0)
    for path in files:
        ds = pydicom.dcmread(path)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        ipp = np.asarray(ds.ImagePositionPatient, float)
        ds.ImageOrientationPatient = [float(v) for v in np.r_[rotation @ iop[:3], rotation @ iop[3:]]]
        ds.ImagePositionPatient = [float(v) for v in rotation @ (ipp - centre) + centre + translation]
        ds.save_as(moved_dir / path.name)

    store = CaseStore(tmp_path / "data")
    result = import_patient(patient, ImportOptions("STS-0001-MOVED", t1="T1", t2="T2_moved"), store)
    assert result.registration["transform"]["rotation_deg"] == pytest.approx(3.0, abs=0.75)
    registered = read_nifti(store.case("STS-0001-MOVED").volume("T2")).array.astype(float)
    unmoved = read_nifti(layout.volume("T2")).array.astype(float)
    body = (unmoved > np.percentile(unmoved, 99) * 0.1) & (registered > 0)
    correlation = np.corrcoef(registered[body], unmoved[body])[0, 1]
    assert correlation >= 0.95, f"voxel-wise correlation inside the body {correlation:.3f}"
