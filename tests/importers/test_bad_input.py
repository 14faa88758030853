"""Every kind of bad input: a clear error naming the file, exit code 1, the case store untouched.

Each test first imports the good phantom as patient ``BAD-1``, then imports a corrupted copy
under the same id: the previous case must survive byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid

from core.case_store import CaseStore
from importers.cli import main
from tests.conftest import tree_digest

PATIENT = "BAD-1"


@pytest.fixture(scope="module")
def good_store(phantom_patient, tmp_path_factory) -> Path:
    folder, _ = phantom_patient
    data = tmp_path_factory.mktemp("store")
    result = CliRunner().invoke(main, [str(folder), "--patient-id", PATIENT, "--data-dir", str(data), "--no-upload",
                                       "-q"])
    assert result.exit_code == 0, result.output
    return data


@pytest.fixture
def store(good_store: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(good_store, data)
    return data


def import_fails(folder: Path, data: Path, *extra: str) -> str:
    """Run the CLI on ``folder``; assert failure and an untouched store; return the message."""
    before = tree_digest(data)
    result = CliRunner().invoke(main, [str(folder), "--patient-id", PATIENT, "--data-dir", str(data), "--no-upload",
                                       *extra])
    assert result.exit_code == 1, result.output
    assert tree_digest(data) == before, "a failed import changed the case store"
    assert not [p for p in (data / "cases").iterdir() if p.name.startswith(".")], "staging folder left behind"
    assert CaseStore(data).case_ids() == [PATIENT]
    return " ".join(result.output.split())  # rich wraps long lines


def slice_files(series_dir: Path) -> list[Path]:
    """The series' files ordered by position along the normal (what a reader must do)."""
    files = sorted(series_dir.glob("*.dcm"))
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.asarray(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    order = np.argsort([np.asarray(d.ImagePositionPatient, float) @ normal for d in datasets])
    return [files[i] for i in order]


def edit(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


def test_missing_slice(copy_patient, store) -> None:
    folder, _ = copy_patient
    files = slice_files(folder / "T1")
    files[10].unlink()
    message = import_fails(folder, store)
    assert "missing slice" in message and files[9].name in message and files[11].name in message


def test_duplicate_slice(copy_patient, store) -> None:
    folder, _ = copy_patient
    files = slice_files(folder / "T1")
    copy = folder / "T1" / "copy-of-slice.dcm"
    shutil.copy(files[5], copy)
    edit(copy, SOPInstanceUID=generate_uid())
    message = import_fails(folder, store)
    assert "duplicate slice" in message and "copy-of-slice.dcm" in message and files[5].name in message


def test_non_uniform_spacing(copy_patient, store) -> None:
    folder, _ = copy_patient
    files = slice_files(folder / "T2")
    ds = pydicom.dcmread(files[7])
    iop = np.asarray(ds.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    edit(files[7], ImagePositionPatient=[float(v) for v in np.asarray(ds.ImagePositionPatient, float) + 1.5 * normal])
    message = import_fails(folder, store)
    assert "non-uniform slice spacing" in message and files[7].name in message


def test_mixed_orientations(copy_patient, store) -> None:
    folder, _ = copy_patient
    files = slice_files(folder / "T1")
    angle = np.radians(5)
    edit(files[3], ImageOrientationPatient=[np.cos(angle), np.sin(angle), 0.0, -np.sin(angle), np.cos(angle), 0.0])
    message = import_fails(folder, store)
    assert "mixed orientations" in message and files[3].name in message


def test_non_image_sop_class(copy_patient, store) -> None:
    folder, _ = copy_patient
    message = import_fails(folder, store, "--t1", str(folder / "T1_contours"))
    assert "RTSTRUCT" in message and "not an image series" in message and "T1_contours" in message


def test_truncated_file(copy_patient, store) -> None:
    folder, _ = copy_patient
    victim = slice_files(folder / "T1")[12]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])
    message = import_fails(folder, store)
    assert victim.name in message and ("truncated" in message or "pixel data" in message)


def test_corrupt_file(copy_patient, store) -> None:
    folder, _ = copy_patient
    victim = slice_files(folder / "T2")[4]
    victim.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 4)
    message = import_fails(folder, store)
    assert victim.name in message and ("corrupt" in message or "not a DICOM" in message)


def test_not_dicom_at_all(copy_patient, store) -> None:
    folder, _ = copy_patient
    (folder / "T1" / "notes.dcm").write_text("this is not an image")
    message = import_fails(folder, store)
    assert "notes.dcm" in message and "not a DICOM file" in message


def test_corrupt_nifti(tmp_path: Path, store) -> None:
    folder = tmp_path / "nifti"
    folder.mkdir()
    (folder / "T1.nii.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    message = import_fails(folder, store)
    assert "T1.nii.gz" in message and "not a readable NIfTI" in message


def test_mask_on_another_grid(tmp_path: Path, store) -> None:
    from importers.phantom import write_phantom_nifti

    folder = tmp_path / "nifti"
    write_phantom_nifti(folder, seed=2)
    other = tmp_path / "other"
    write_phantom_nifti(other, seed=2, t1_shape=(20, 100, 100))
    shutil.copy(other / "GTV_Mass_mask.nii.gz", folder / "GTV_Mass_mask.nii.gz")
    message = import_fails(folder, store)
    assert "GTV_Mass_mask.nii.gz" in message and "grid" in message


def test_no_series_lists_what_was_seen(copy_patient, store) -> None:
    folder, _ = copy_patient
    shutil.rmtree(folder / "T1")
    shutil.rmtree(folder / "T2")
    message = import_fails(folder, store)
    assert "no axial T1 or T2" in message and "RTSTRUCT" in message and "--t1" in message


def test_ambiguous_series_asks_to_choose(copy_patient, store) -> None:
    folder, _ = copy_patient
    shutil.copytree(folder / "T2", folder / "T2_repeat")
    uid = generate_uid()
    for path in (folder / "T2_repeat").glob("*.dcm"):
        edit(path, SeriesInstanceUID=uid, SOPInstanceUID=generate_uid())
    message = import_fails(folder, store)
    assert "equally like the axial T2" in message and "--t2" in message and uid in message


def test_bad_patient_id_and_tissue(copy_patient, store) -> None:
    folder, _ = copy_patient
    result = CliRunner().invoke(main, [str(folder), "--patient-id", "../etc", "--data-dir", str(store), "--no-upload"])
    assert result.exit_code == 1 and "not usable" in result.output
    result = CliRunner().invoke(main, [str(folder), "--patient-id", "X", "--tissue", "Bone", "--no-upload",
                                       "--data-dir", str(store)])
    assert result.exit_code == 2 and "Bone" in result.output
