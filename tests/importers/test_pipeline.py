"""import-patient on synthetic patients with known truth (no Label Studio: --no-upload)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from core.case_store import CaseStore
from core.geometry import read_nifti
from importers.cli import main
from importers.phantom import write_phantom_nifti
from importers.pipeline import ImportOptions, import_patient
from importers.registration import resample_to
from tests.conftest import tree_digest


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def imported(phantom_patient, tmp_path_factory):
    folder, truth = phantom_patient
    store = CaseStore(tmp_path_factory.mktemp("data"))
    result = import_patient(folder, ImportOptions("PH-0001", "myxofibrosarcoma", "myxoid", "thigh"), store)
    return store, result, truth


def test_reference_grid_is_the_larger_matrix_with_its_exact_geometry(imported) -> None:
    store, result, truth = imported
    assert result.reference_modality == "T1"
    layout = store.case("PH-0001")
    for modality in ("T1", "T2"):
        volume = read_nifti(layout.volume(modality))
        assert volume.shape == truth.t1.shape
        np.testing.assert_allclose(volume.origin, truth.t1.origin, atol=1e-3)
        np.testing.assert_allclose(volume.spacing, truth.t1.spacing, atol=1e-3)
        np.testing.assert_allclose(volume.direction, truth.t1.direction, atol=1e-3)
    case = layout.read_case_json()
    assert case["tissue"] == "Myxoid" and case["annotate_on"] == "T2"
    assert case["reference_grid"]["shape_zyx"] == list(truth.t1.shape)


def test_registration_recovers_the_known_motion(imported) -> None:
    _store, result, truth = imported
    reg = result.registration
    matrix = np.asarray(reg["transform"]["matrix_4x4"])
    # The registration maps reference (T1 = world) points to T2 points, exactly what the motion does.
    # Check it over a 60×60×30 mm box around the tumour: within a pixel in-plane, and within half a
    # 5 mm slice along the normal (through-plane, registration of thick slices is less precise).
    centre = truth.anatomy.tumour_centre_lps
    offsets = [(dx, dy, dz) for dx in (-30, 30) for dy in (-30, 30) for dz in (-15, 15)]
    box = np.asarray(centre) + np.asarray(offsets, float)
    points = np.c_[box, np.ones(len(box))]
    error = (points @ matrix.T - points @ truth.motion_matrix.T)[:, :3]
    along_normal = error @ truth.t1.normal
    in_plane = np.linalg.norm(error - np.outer(along_normal, truth.t1.normal), axis=1)
    assert in_plane.max() < 1.0, f"in-plane error up to {in_plane.max():.2f} mm"
    assert np.abs(along_normal).max() < 2.5, f"through-plane error up to {np.abs(along_normal).max():.2f} mm"
    assert reg["mutual_information"]["after"] > reg["mutual_information"]["before"]
    assert reg["warnings"] == []
    # T2's own truth mask, carried by our transform onto the T1 grid, lands on the T1 truth.
    import SimpleITK as sitk

    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix[:3, :3].ravel().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    carried = resample_to(truth.t2, truth.t1, transform, "nearest").array
    assert dice(carried, truth.t1.array) > 0.9


def test_slices_and_labels_are_written(imported) -> None:
    store, result, truth = imported
    layout = store.case("PH-0001")
    depth = truth.t1.shape[0]
    assert result.slices == {"T1": depth, "T2": depth}
    import cv2

    png = cv2.imread(str(layout.slice_png("T2", depth // 2)), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint8 and png.shape == truth.t1.shape[1:]
    assert png.max() == 255 or png.max() > 200
    rois = {(label["roi"], label["modality"]) for label in result.labels}
    assert ("GTV_Mass", "T1") in rois and ("GTV_Mass", "T2") in rois
    t1_mass = read_nifti(layout.label("GTV_Mass", "T1")).array
    t2_mass = read_nifti(layout.label("GTV_Mass", "T2")).array
    assert dice(t1_mass, truth.t1.array) > 0.9
    assert dice(t2_mass, truth.t1.array) > 0.85  # drawn on the moved T2, carried back by registration


def test_instance_numbers_follow_position_not_file_order(imported) -> None:
    store, _, _ = imported
    case = store.case("PH-0001").read_case_json()
    t1_numbers = case["modalities"]["T1"]["instance_numbers"]
    assert sorted(t1_numbers) == list(range(1, len(t1_numbers) + 1))
    t2_numbers = [n for n in case["modalities"]["T2"]["instance_numbers"] if n is not None]
    assert len(t2_numbers) >= len(t1_numbers) - 2


def test_cli_json_output_and_reimport_is_stable(phantom_patient, tmp_path: Path) -> None:
    folder, _ = phantom_patient
    args = [str(folder), "--patient-id", "PH-0002", "--tissue", "Fat", "--data-dir", str(tmp_path),
            "--no-upload", "--json"]
    code, output = run_cli(*args)
    assert code == 0, output
    payload = json.loads(output)
    assert set(payload) >= {"case_id", "reference_modality", "shape", "spacing", "registration", "slices",
                            "tasks_created", "tasks_updated"}
    assert payload["case_id"] == "PH-0002" and payload["slices"]["T1"] == payload["shape"][0]
    case = CaseStore(tmp_path).case("PH-0002")
    before = {k: v for k, v in tree_digest(case.root).items() if k != "case.json"}
    code, output = run_cli(*args)
    assert code == 0, output
    after = {k: v for k, v in tree_digest(case.root).items() if k != "case.json"}
    assert after == before, "re-importing the same input must reproduce the same files"
    assert not [p for p in case.root.parent.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_nifti_patient_imports(tmp_path: Path) -> None:
    truth = write_phantom_nifti(tmp_path / "nifti", tissue="Fibrous", seed=5)
    code, output = run_cli(str(tmp_path / "nifti"), "--patient-id", "PH-NII", "--data-dir", str(tmp_path / "d"),
                           "--no-upload", "--json")
    assert code == 0, output
    payload = json.loads(output)
    assert payload["reference_modality"] == "T1" and payload["slices"] == {"T1": truth.t1.shape[0],
                                                                            "T2": truth.t1.shape[0]}
    mask = read_nifti(CaseStore(tmp_path / "d").case("PH-NII").label("GTV_Mass", "T1")).array
    assert dice(mask, truth.t1.array) > 0.95


def test_single_series_imports_with_a_warning(phantom_patient, tmp_path: Path) -> None:
    folder, truth = phantom_patient
    code, output = run_cli(str(folder / "T1"), "--patient-id", "PH-T1", "--data-dir", str(tmp_path), "--no-upload",
                           "--json")
    assert code == 0, output
    payload = json.loads(output)
    assert payload["slices"] == {"T1": truth.t1.shape[0]} and payload["registration"] is None
    assert any("no axial T2" in w for w in payload["warnings"])


def test_batch_continues_past_a_bad_patient(phantom_patient, tmp_path: Path) -> None:
    folder, _ = phantom_patient
    (tmp_path / "empty").mkdir()
    csv = tmp_path / "patients.csv"
    csv.write_text(f"path,patient_id,tissue\nempty,BAD-1,Myxoid\n{folder},GOOD-1,Myxoid\n")
    result = CliRunner().invoke(main, ["--batch", str(csv), "--data-dir", str(tmp_path / "d"), "--no-upload"])
    assert result.exit_code == 1
    assert "1 of 2 patients imported" in result.output and "BAD-1" in result.output
    assert CaseStore(tmp_path / "d").case_ids() == ["GOOD-1"]
