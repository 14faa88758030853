"""export-volumes against a real Label Studio: annotations in, NIfTI volumes with exact geometry out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from core.brush_rle import mask_to_brush_result
from core.case_store import CaseStore
from core.geometry import read_nifti, require_same_grid
from core.labeling import BRUSH_CONTROL, IMAGE_KEY, REVIEW_CONTROL, REVIEWED_CHOICE
from exporters.cli import main as export_main
from exporters.measurements import max_axial_diameter_mm, measure_label, tumour_volume_ml
from importers.cli import main as import_main

pytestmark = [pytest.mark.label_studio, pytest.mark.slow]
PROJECT = "STS export"


def review(choice: str = REVIEWED_CHOICE) -> dict:
    return {"from_name": REVIEW_CONTROL, "to_name": IMAGE_KEY, "type": "choices", "value": {"choices": [choice]}}


@pytest.fixture(scope="module")
def annotated(phantom_patient, label_studio, ls_client):
    """The phantom imported; T1 slices annotated with the truth (a few reviewed), plus an empty slice."""
    folder, truth = phantom_patient
    data_dir = label_studio.document_root / "data-export"
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(label_studio.document_root), "STS_DATA_DIR": str(data_dir),
           "STS_LS_PROJECT": PROJECT}
    result = CliRunner().invoke(import_main, [str(folder), "--patient-id", "EXP-1", "-q"], env=env)
    assert result.exit_code == 0, result.output
    project = next(p for p in ls_client.projects.list(title=PROJECT) if p.title == PROJECT)
    tasks = {(t.data["modality"], t.data["slice_index"]): t for t in ls_client.tasks.list(project=project.id)}
    mask = truth.t1.array
    tumour = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    annotated_slices = list(range(tumour[0] - 1, tumour[-1] + 2))  # the whole tumour + one empty slice each side
    reviewed = set(annotated_slices[: len(annotated_slices) // 2])
    for z in annotated_slices:
        result = [mask_to_brush_result(mask[z], from_name=BRUSH_CONTROL, to_name=IMAGE_KEY, label="Tumor")] \
            if mask[z].any() else []
        if z in reviewed:
            result.append(review())
        ls_client.annotations.create(id=tasks[("T1", z)].id, result=result, ground_truth=False)
    return env, data_dir, truth, annotated_slices, reviewed, project.id


def test_export_rebuilds_the_annotated_volume_on_the_exact_grid(annotated, tmp_path: Path) -> None:
    env, data_dir, truth, annotated_slices, _, _ = annotated
    result = CliRunner().invoke(export_main, ["--out", str(tmp_path / "out"), "--json"], env=env)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [c["case_id"] for c in summary["cases"]] == ["EXP-1"]
    case_dir = tmp_path / "out" / "EXP-1"
    label = read_nifti(case_dir / "Tumor__T1.nii.gz")
    image = read_nifti(case_dir / "T1.nii.gz")
    require_same_grid(label, read_nifti(CaseStore(data_dir).case("EXP-1").volume("T1")))
    require_same_grid(label, image)
    np.testing.assert_array_equal(label.array[annotated_slices], truth.t1.array[annotated_slices])
    outside = [z for z in range(label.shape[0]) if z not in annotated_slices]
    assert not label.array[outside].any()
    manifest = json.loads((case_dir / "manifest.json").read_text())
    entry = next(e for e in manifest["labels"] if e["label"] == "Tumor")
    assert entry["annotated_slices"] == annotated_slices  # unannotated slices are not claimed as background
    assert entry["complete"] is True
    expected_ml = tumour_volume_ml(truth.t1.array, truth.t1.spacing)
    assert entry["volume_ml"] == pytest.approx(expected_ml, abs=1e-3)  # rounded to 1 µL
    assert abs(entry["volume_ml"] - truth.tumour_volume_ml) / truth.tumour_volume_ml < 0.05
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["cases"][0]["case_id"] == "EXP-1"


def test_reviewed_only_and_offline_json_export(annotated, label_studio, ls_client, tmp_path: Path) -> None:
    env, _, _, _, reviewed, project_id = annotated
    export = tmp_path / "export.json"
    export.write_text(json.dumps(ls_client.projects.exports.as_json(project_id), default=str))
    offline_env = {k: v for k, v in env.items() if k != "LABEL_STUDIO_API_KEY"}
    result = CliRunner().invoke(export_main, ["--out", str(tmp_path / "out"), "--from-json", str(export),
                                              "--reviewed-only", "--no-images", "--json"], env=offline_env)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "EXP-1" / "manifest.json").read_text())
    entry = next(e for e in manifest["labels"] if e["label"] == "Tumor")
    assert set(entry["annotated_slices"]) == reviewed and entry["complete"] is False
    assert not (tmp_path / "out" / "EXP-1" / "T1.nii.gz").exists()


def test_a_bad_brush_fails_its_case_only(annotated, tmp_path: Path) -> None:
    env, data_dir, _, _, _, _ = annotated
    good = json.loads(CliRunner().invoke(export_main, ["--out", str(tmp_path / "ref"), "--json"], env=env).stdout)
    assert good["failed"] == []
    broken = [{"id": 999, "data": {"case_id": "EXP-1", "modality": "T1", "slice_index": 3},
               "annotations": [{"id": 1, "result": [mask_to_brush_result(np.ones((7, 9), np.uint8),
                                                                          from_name=BRUSH_CONTROL, to_name=IMAGE_KEY,
                                                                          label="Tumor")]}]},
              {"id": 1000, "data": {"case_id": "NOT-IMPORTED", "modality": "T1", "slice_index": 0},
               "annotations": [{"id": 2, "result": []}]}]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    out = tmp_path / "out"
    result = CliRunner().invoke(export_main, ["--out", str(out), "--from-json", str(path), "--json",
                                              "--data-dir", str(data_dir)])
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    errors = {f["case_id"]: f["error"] for f in summary["failed"]}
    assert "brush is 9×7" in errors["EXP-1"] and "no such case" in errors["NOT-IMPORTED"]
    assert not (out / "EXP-1").exists(), "a failed case must not leave a half-written folder"


def test_measurements_on_known_shapes() -> None:
    mask = np.zeros((3, 50, 60), np.uint8)
    mask[1, 10:20, 5:45] = 1  # 10 × 40 px rectangle
    spacing = (0.5, 0.5, 4.0)
    assert tumour_volume_ml(mask, spacing) == pytest.approx(400 * 0.5 * 0.5 * 4.0 / 1000)
    assert max_axial_diameter_mm(mask, spacing) == pytest.approx(np.hypot(39 * 0.5, 9 * 0.5))
    assert measure_label(mask, spacing, [0, 1, 2])["complete"] is True
    assert measure_label(mask, spacing, [1])["complete"] is False
