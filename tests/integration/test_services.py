"""The real services behind the fixtures answer, and Label Studio behaves as the project relies on."""

from __future__ import annotations

import struct
import zlib

import pytest
import requests

pytestmark = pytest.mark.label_studio

LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tumor" toName="image"><Label value="Tumor"/></BrushLabels></View>'
)


def tiny_png(width: int = 4, height: int = 3) -> bytes:
    """A valid grey-scale PNG, built by hand so the test needs no imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes((x * 60 + y * 20) % 256 for x in range(width)) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_redis_ping_and_roundtrip(redis_db):
    assert redis_db.ping()
    redis_db.set("sts:test", "value")
    assert redis_db.get("sts:test") == b"value"
    assert redis_db.connection_pool.connection_kwargs["db"] == 15


def test_label_studio_health(label_studio):
    resp = requests.get(f"{label_studio.url}/health", timeout=10)
    assert resp.status_code == 200
    assert resp.json() == {"status": "UP"}


def test_legacy_token_authenticates(label_studio):
    resp = requests.get(f"{label_studio.url}/api/current-user/whoami", headers=label_studio.auth_headers(), timeout=10)
    assert resp.status_code == 200
    assert resp.json()["email"] == label_studio.username
    bad = requests.get(
        f"{label_studio.url}/api/current-user/whoami", headers={"Authorization": "Token " + "0" * 40}, timeout=10
    )
    assert bad.status_code == 401


def test_project_tasks_and_local_files(label_studio, ls_client):
    project = ls_client.projects.create(title="services smoke test", label_config=LABEL_CONFIG)
    try:
        imported = ls_client.projects.import_tasks(
            id=project.id,
            request=[{"data": {"image": "/data/local-files/?d=a.png"}}, {"data": {"image": "b.png"}}],
            return_task_ids=True,
        )
        assert imported.task_count == 2
        assert len(imported.task_ids) == 2
        tasks = list(ls_client.tasks.list(project=project.id))
        assert sorted(t.id for t in tasks) == sorted(imported.task_ids)
        assert {t.data["image"] for t in tasks} == {"/data/local-files/?d=a.png", "b.png"}

        # Local files: the storage path must be a sub-folder of the document root (not the root itself).
        folder = label_studio.document_root / "smoke" / "images"
        folder.mkdir(parents=True)
        png = tiny_png()
        (folder / "slice_001.png").write_bytes(png)
        url = f"{label_studio.url}/data/local-files/?d=smoke/images/slice_001.png"
        before = requests.get(url, headers=label_studio.auth_headers(), timeout=10)
        assert before.status_code == 404  # no storage covers the folder yet

        storage = ls_client.import_storage.local.create(project=project.id, path=str(folder), use_blob_urls=True)
        assert storage.id
        resp = requests.get(url, headers=label_studio.auth_headers(), timeout=10)
        assert resp.status_code == 200
        assert resp.headers["Content-Type"] == "image/png"
        assert resp.content == png
        anonymous = requests.get(url, timeout=10)
        assert anonymous.status_code in (401, 403)
    finally:
        ls_client.projects.delete(id=project.id)
    assert project.id not in [p.id for p in ls_client.projects.list()]
