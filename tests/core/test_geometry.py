"""core.geometry and core.case_store: conventions, NIfTI round trips, atomic case swaps."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from core.case_store import CaseStore, check_patient_id
from core.errors import GeometryError, InputError
from core.geometry import Volume, from_sitk, read_nifti, reorient_lps, require_same_grid, to_sitk, write_nifti


def oblique_volume(shape=(5, 6, 7)) -> Volume:
    angle = np.radians(4)
    direction = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    array = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    return Volume(array, origin=(-10.5, 20.25, 88.0), spacing=(0.39, 0.41, 5.2), direction=direction)


def test_index_and_physical_are_inverse() -> None:
    volume = oblique_volume()
    index = np.array([[0, 0, 0], [6, 5, 4], [1.5, 2.5, 3.5]])
    np.testing.assert_allclose(volume.physical_to_index(volume.index_to_physical(index)), index, atol=1e-9)
    np.testing.assert_allclose(volume.index_to_physical((0, 0, 1)) - volume.origin, 5.2 * volume.normal)


def test_sitk_round_trip_keeps_array_order_and_geometry() -> None:
    volume = oblique_volume()
    image = to_sitk(volume)
    assert image.GetSize() == (7, 6, 5)  # SimpleITK sizes are (x, y, z); arrays are [z, y, x]
    assert image.GetPixel(6, 5, 4) == volume.array[4, 5, 6]
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((6, 5, 4)), volume.index_to_physical((6, 5, 4)))
    back = from_sitk(image)
    np.testing.assert_array_equal(back.array, volume.array)
    require_same_grid(back, volume)


def test_nifti_round_trip_and_nibabel_agree(tmp_path: Path) -> None:
    volume = oblique_volume()
    path = write_nifti(volume, tmp_path / "v.nii.gz")
    back = read_nifti(path)
    np.testing.assert_array_equal(back.array, volume.array)
    require_same_grid(back, volume, atol_mm=1e-4)
    loaded = nib.load(path)
    np.testing.assert_allclose(loaded.affine, volume.affine_ras, atol=1e-4)
    # nibabel's array is [x, y, z]; voxel (6, 5, 4) holds what ours has at [4, 5, 6].
    assert np.asarray(loaded.dataobj)[6, 5, 4] == volume.array[4, 5, 6]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_ras_stored_nifti_is_reoriented_for_display(tmp_path: Path) -> None:
    array = np.zeros((3, 4, 5), np.uint8)
    array[1, 2, 0] = 1  # column 0 of a RAS-stored file: the patient's left-most voxels
    ras = nib.Nifti1Image(np.transpose(array, (2, 1, 0)), np.diag([1.0, 1.0, 3.0, 1.0]))
    nib.save(ras, tmp_path / "ras.nii.gz")
    stored = read_nifti(tmp_path / "ras.nii.gz")
    np.testing.assert_allclose(np.diag(stored.direction), [-1, -1, 1])
    shown = reorient_lps(stored)
    np.testing.assert_allclose(shown.direction, np.eye(3))
    (z, y, x), = np.argwhere(shown.array)
    assert x == 4, "the patient's left must be on the screen's right (radiological convention)"
    np.testing.assert_allclose(shown.index_to_physical((x, y, z)), stored.index_to_physical((0, 2, 1)))


def test_volume_validation_messages() -> None:
    with pytest.raises(GeometryError, match="3-D"):
        Volume(np.zeros((4, 4)))
    with pytest.raises(GeometryError, match="positive"):
        Volume(np.zeros((1, 2, 2)), spacing=(1, 0, 1))
    with pytest.raises(GeometryError, match="orthonormal"):
        Volume(np.zeros((1, 2, 2)), direction=np.ones((3, 3)))
    a = oblique_volume()
    b = Volume(a.array, origin=(0, 0, 0), spacing=a.spacing, direction=a.direction)
    with pytest.raises(GeometryError, match=r"origin \(-10.5, 20.25, 88.0\) vs \(0.0, 0.0, 0.0\)"):
        require_same_grid(a, b)


def test_staged_case_replaces_on_success_and_keeps_old_on_failure(tmp_path: Path) -> None:
    store = CaseStore(tmp_path)
    with store.staged_case("P1") as layout:
        layout.case_json.write_text('{"v": 1}')
    assert store.case("P1").read_case_json() == {"v": 1}
    with pytest.raises(RuntimeError), store.staged_case("P1") as layout:
        layout.case_json.write_text('{"v": 2}')
        raise RuntimeError("import failed half way")
    assert store.case("P1").read_case_json() == {"v": 1}
    with store.staged_case("P1") as layout:
        layout.case_json.write_text('{"v": 3}')
    assert store.case("P1").read_case_json() == {"v": 3}
    assert [p.name for p in store.cases_dir.iterdir()] == ["P1"]


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 65, "-lead", "name with space", "Müller"])
def test_patient_ids_are_safe_folder_names(bad: str) -> None:
    with pytest.raises(InputError, match="not usable"):
        check_patient_id(bad)


def test_sitk_reads_what_we_write_for_labels(tmp_path: Path) -> None:
    mask = oblique_volume().with_array(np.ones((5, 6, 7), np.uint8))
    path = write_nifti(mask, tmp_path / "labels" / "GTV__T1.nii.gz")
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkUInt8
