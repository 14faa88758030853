"""No patient-identifying DICOM field reaches the case store, Label Studio, the CLI output or logs."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from importers.cli import main
from importers.phantom import write_phantom_patient

pytestmark = [pytest.mark.label_studio, pytest.mark.slow]

PLANTED = {
    "PatientName": "ZZLEAKNAME^ZZGIVEN",
    "PatientID": "ZZLEAKID4242",
    "PatientBirthDate": "19010203",
    "PatientAddress": "ZZLEAK 7 SECRET LANE",
    "AccessionNumber": "ZZLEAKACC99",
    "ReferringPhysicianName": "ZZLEAKDOCTOR^WHO",
    "InstitutionName": "ZZLEAK HOSPITAL",
    "OtherPatientIDs": "ZZLEAKOTHER77",
}
NEEDLES = [v.encode() for v in PLANTED.values()] + [b"ZZLEAKNAME", b"ZZLEAKDOCTOR", b"ZZGIVEN"]


def leaks(blob: bytes) -> list[bytes]:
    return [n for n in NEEDLES if n in blob or n.lower() in blob.lower()]


def test_planted_identifiers_never_leave(tmp_path: Path, label_studio, ls_client, caplog) -> None:
    patient = tmp_path / "patient"
    write_phantom_patient(patient, seed=11, phi=PLANTED)
    assert b"ZZLEAKNAME" in next((patient / "T1").glob("*.dcm")).read_bytes()  # the trap is set
    data_dir = label_studio.document_root / "data-privacy"
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(
        main, [str(patient), "--patient-id", "PSEUDO-77", "--tissue", "Fat", "-v"],
        env={"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
             "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(label_studio.document_root), "STS_DATA_DIR": str(data_dir),
             "STS_LS_PROJECT": "STS privacy"})
    assert result.exit_code == 0, result.output + result.stderr

    found: dict[str, list[bytes]] = {}
    files = [p for p in (data_dir / "cases" / "PSEUDO-77").rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files) and any(p.name.endswith(".nii.gz") for p in files)
    for path in files:
        blob = path.read_bytes()
        if path.name.endswith(".gz"):
            blob = gzip.decompress(blob)  # NIfTI headers (descrip, intent_name, extensions)
        if path.suffix == ".png":
            assert not any(chunk in blob for chunk in (b"tEXt", b"iTXt", b"zTXt", b"eXIf")), f"{path}: metadata chunk"
        if hits := leaks(blob):
            found[str(path)] = hits

    project = next(p for p in ls_client.projects.list(title="STS privacy") if p.title == "STS privacy")
    tasks = list(ls_client.tasks.list(project=project.id, fields="all", page_size=500))
    assert tasks and {t.data["patient_id"] for t in tasks} == {"PSEUDO-77"}
    dump = json.dumps([t.model_dump(mode="json") for t in tasks]).encode()
    if hits := leaks(dump):
        found["label studio tasks"] = hits
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr), ("log records", caplog.text)):
        if hits := leaks(text.encode()):
            found[name] = hits
    server_log = label_studio.log_path.read_bytes() if label_studio.log_path.exists() else b""
    if hits := leaks(server_log):
        found["label studio server log"] = hits
    assert not found, f"identifiers leaked: {found}"
