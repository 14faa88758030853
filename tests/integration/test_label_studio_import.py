"""import-patient against a real Label Studio 1.23.2 (started by the test harness)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from click.testing import CliRunner

from core.brush_rle import brush_result_to_mask
from core.case_store import CaseStore
from core.geometry import read_nifti
from core.labeling import TASK_DATA_KEYS
from importers.cli import main

pytestmark = [pytest.mark.label_studio, pytest.mark.slow]


def run_import(folder: Path, patient_id: str, label_studio, data_dir: Path, project: str, *extra: str) -> dict:
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(label_studio.document_root), "STS_DATA_DIR": str(data_dir),
           "STS_LS_PROJECT": project}
    result = CliRunner().invoke(main, [str(folder), "--patient-id", patient_id, "--tissue", "Myxoid",
                                       "--tumor-type", "myxofibrosarcoma", "--anatomy", "thigh", "--json", *extra],
                                env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def project_tasks(ls_client, title: str) -> tuple[int, list]:
    project = next(p for p in ls_client.projects.list(title=title) if p.title == title)
    return project.id, list(ls_client.tasks.list(project=project.id, fields="all", page_size=500))


@pytest.fixture(scope="module")
def sts001_imported(sts001: Path, label_studio, ls_client):
    data_dir = label_studio.document_root / "data-sts001"
    first = run_import(sts001, "STS-0001", label_studio, data_dir, "STS real data")
    return data_dir, first


def test_tasks_are_created_with_metadata(sts001_imported, ls_client) -> None:
    _, first = sts001_imported
    assert first["tasks_created"] == 80 and first["tasks_updated"] == 0
    _, tasks = project_tasks(ls_client, "STS real data")
    assert len(tasks) == 80
    keys = {(t.data["modality"], t.data["slice_index"]) for t in tasks}
    assert keys == {(m, z) for m in ("T1", "T2") for z in range(40)}
    sample = next(t.data for t in tasks if t.data["modality"] == "T2" and t.data["slice_index"] == 20)
    assert set(TASK_DATA_KEYS) <= set(sample)
    assert sample["patient_id"] == "STS-0001" and sample["case_id"] == "STS-0001"
    assert sample["tissue"] == "Myxoid" and sample["tumor_type"] == "myxofibrosarcoma" and sample["anatomy"] == "thigh"
    assert sample["n_slices"] == 40 and sample["annotate_on"] == "T2"
    assert isinstance(sample["instance_number"], int)


def test_pngs_load_through_label_studio_with_the_token(sts001_imported, ls_client, label_studio) -> None:
    data_dir, _ = sts001_imported
    _, tasks = project_tasks(ls_client, "STS real data")
    task = next(t for t in tasks if t.data["modality"] == "T1" and t.data["slice_index"] == 17)
    url = label_studio.url + task.data["image"]
    response = requests.get(url, headers={"Authorization": f"Token {label_studio.token}"}, timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("image/png")
    assert response.content == CaseStore(data_dir).case("STS-0001").slice_png("T1", 17).read_bytes()
    assert requests.get(url, timeout=30).status_code in (401, 403), "served without authentication"


def test_existing_contours_are_predictions_equal_to_the_rasterised_masks(sts001_imported, ls_client) -> None:
    data_dir, _ = sts001_imported
    layout = CaseStore(data_dir).case("STS-0001")
    _, tasks = project_tasks(ls_client, "STS real data")
    checked = 0
    for modality in ("T1", "T2"):
        mask = read_nifti(layout.label("GTV_Mass", modality)).array
        for task in tasks:
            if task.data["modality"] != modality:
                continue
            z = task.data["slice_index"]
            predictions = [p.model_dump() for p in task.predictions if p.model_version == "imported-GTV_Mass"]
            if not mask[z].any():
                assert not predictions
                continue
            assert len(predictions) == 1
            result = predictions[0]["result"][0]
            assert result["type"] == "brushlabels" and result["value"]["brushlabels"] == ["Tumor"]
            np.testing.assert_array_equal(brush_result_to_mask(result), mask[z])
            checked += 1
    assert checked == 40  # GTV_Mass covers 20 slices on each modality


def test_second_import_creates_nothing(sts001_imported, sts001: Path, label_studio, ls_client) -> None:
    data_dir, _ = sts001_imported
    _, before = project_tasks(ls_client, "STS real data")
    second = run_import(sts001, "STS-0001", label_studio, data_dir, "STS real data")
    assert second["tasks_created"] == 0 and second["tasks_updated"] == 0
    _, after = project_tasks(ls_client, "STS real data")
    assert sorted(t.id for t in after) == sorted(t.id for t in before)
    count = sum(len(t.predictions) for t in after)
    assert count == sum(len(t.predictions) for t in before)


def test_changed_metadata_updates_in_place(phantom_patient, label_studio, ls_client) -> None:
    folder, _ = phantom_patient
    data_dir = label_studio.document_root / "data-update"
    run_import(folder, "PH-UPD", label_studio, data_dir, "STS update")
    _, before = project_tasks(ls_client, "STS update")
    again = run_import(folder, "PH-UPD", label_studio, data_dir, "STS update", "--anatomy", "calf")
    assert again["tasks_created"] == 0 and again["tasks_updated"] == len(before)
    _, after = project_tasks(ls_client, "STS update")
    assert {t.id for t in after} == {t.id for t in before}
    assert {t.data["anatomy"] for t in after} == {"calf"}


def test_upload_mode_serves_images_without_shared_disk(phantom_patient, label_studio, ls_client, tmp_path) -> None:
    folder, truth = phantom_patient
    data_dir = tmp_path / "elsewhere"  # not under the document root
    first = run_import(folder, "PH-UP", label_studio, data_dir, "STS upload", "--serve", "upload")
    assert first["tasks_created"] == 2 * truth.t1.shape[0]
    _, tasks = project_tasks(ls_client, "STS upload")
    task = next(t for t in tasks if t.data["modality"] == "T2" and t.data["slice_index"] == 5)
    assert task.data["image"].startswith("/data/upload/")
    response = requests.get(label_studio.url + task.data["image"], timeout=30,
                            headers={"Authorization": f"Token {label_studio.token}"})
    assert response.status_code == 200
    assert response.content == CaseStore(data_dir).case("PH-UP").slice_png("T2", 5).read_bytes()
    second = run_import(folder, "PH-UP", label_studio, data_dir, "STS upload", "--serve", "upload")
    assert second["tasks_created"] == 0 and second["tasks_updated"] == 0


def test_local_files_outside_the_document_root_is_a_clear_error(phantom_patient, label_studio, tmp_path) -> None:
    folder, _ = phantom_patient
    result = CliRunner().invoke(main, [str(folder), "--patient-id", "PH-X", "--data-dir", str(tmp_path)], env={
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(label_studio.document_root), "STS_LS_PROJECT": "STS err"})
    assert result.exit_code == 1
    assert "document root" in " ".join(result.output.split())


def test_token_from_a_file(phantom_patient, label_studio, tmp_path) -> None:
    folder, _ = phantom_patient
    token_file = tmp_path / "token"
    token_file.write_text(label_studio.token + "\n")
    args = [str(folder), "--patient-id", "PH-F", "--api-key-file", str(token_file), "--json"]
    env = {"LABEL_STUDIO_URL": label_studio.url, "STS_LS_PROJECT": "STS token file",
           "STS_DATA_DIR": str(label_studio.document_root / "data-token"),
           "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(label_studio.document_root)}
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tasks_created"] > 0


def test_wrong_token_is_a_clear_error(phantom_patient, label_studio, tmp_path) -> None:
    folder, _ = phantom_patient
    result = CliRunner().invoke(main, [str(folder), "--patient-id", "PH-T", "--data-dir", str(tmp_path)], env={
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": "0" * 40})
    assert result.exit_code == 1
    assert "LabelStudioError" in result.output and "401" in result.output
