"""Shared pytest fixtures.

Services (real processes, one per test session, stopped at the end; see ``tests/services.py``):

* ``redis_url``    -- str, URL of a Redis answering PING (``$REDIS_URL``, 127.0.0.1:6379, or a private one),
  pointing at the spare DB index ``REDIS_TEST_DB`` (hand it to RQ queues/workers under test).
* ``redis_conn``   -- ``redis.Redis`` on that DB.
* ``redis_db``     -- same connection, with that DB flushed before and after the test (function scope).
* ``label_studio`` -- a started ``LabelStudioServer`` (``.url``, ``.token``, ``.username``, ``.password``,
  ``.data_dir``, ``.document_root``, ``.log_path``); ``.document_root`` is a session tmp dir that is the
  ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` (local-files storages must point to sub-folders of it).
* ``ls_client``    -- ``label_studio_sdk.LabelStudio`` authenticated with the admin's legacy token.

Always on: ``clean_environ`` restores ``os.environ`` after each test; ``$STS_CPU_BF16`` defaults to off
(float32 image encoder) for the whole session, see below.

Without a Label Studio install, tests using it are skipped (``pytest.fail`` when ``$CI`` is set).
Add further fixtures (data paths, ...) in their own section below.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

# The project is not installed into the venv: make the repository root importable (core, tests.services...).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# The image encoder runs in float32 on every CPU here (``$STS_CPU_BF16``, whose default is bfloat16 where
# the CPU has AMX or AVX512-BF16): the real-patient margins the tests assert were measured in float32, and
# the suite must reach the same verdicts on a machine with or without them. The bfloat16 path has tests of its own that
# set the variable; worker processes that tests start inherit it. Set it to run the suite otherwise.
os.environ.setdefault("STS_CPU_BF16", "off")

from tests.services import (  # noqa: E402
    LabelStudioNotInstalledError,
    LabelStudioServer,
    ensure_redis,
    find_label_studio_bin,
    redis_url_with_db,
)

REDIS_TEST_DB = 15  # spare DB index the tests may flush freely


# ------------------------------------------------------------------------------------------ general


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """Snapshot ``os.environ`` and restore it after each test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# -------------------------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url, stop = ensure_redis()
    yield redis_url_with_db(url, REDIS_TEST_DB)
    stop()


@pytest.fixture(scope="session")
def redis_conn(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    # Guard: never flush the machine's DB 0 by accident.
    assert conn.connection_pool.connection_kwargs["db"] == REDIS_TEST_DB
    yield conn
    conn.close()


@pytest.fixture
def redis_db(redis_conn: redis.Redis) -> Iterator[redis.Redis]:
    redis_conn.flushdb()
    yield redis_conn
    redis_conn.flushdb()


# ------------------------------------------------------------------------------------- Label Studio


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    try:
        find_label_studio_bin()
    except LabelStudioNotInstalledError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
    # data_dir under pytest's basetemp, so the server log survives a failed session for inspection.
    server = LabelStudioServer(
        document_root=tmp_path_factory.mktemp("ls-document-root"),
        data_dir=tmp_path_factory.mktemp("ls-data"),
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ls_client(label_studio: LabelStudioServer):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=label_studio.url, api_key=label_studio.token)


# -------------------------------------------------------------------------------------------- data

SHARED_DATA_HINT = "real test data: set $STS_SHARED_DATA or place the shared data at ../shared/data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real TCIA sarcoma MRI; read-only, never copied into the repo)."""
    root = Path(os.environ.get("STS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (root / "tcia-sts-raw").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{root}: missing; {SHARED_DATA_HINT}", pytrace=False)
        pytest.skip(f"{root}: missing; {SHARED_DATA_HINT}")
    return root


@pytest.fixture(scope="session")
def sts001(shared_data: Path) -> Path:
    return shared_data / "tcia-sts-raw" / "STS_001"


@pytest.fixture(scope="session")
def phantom_patient(tmp_path_factory: pytest.TempPathFactory):
    """A synthetic DICOM patient (T1, moved T2, RTSTRUCTs) and its ground truth; do not modify it:
    tests that corrupt files copy it first (``copy_patient``)."""
    from importers.phantom import write_phantom_patient

    folder = tmp_path_factory.mktemp("phantom") / "patient"
    truth = write_phantom_patient(folder, tissue="Myxoid", seed=3)
    return folder, truth


@pytest.fixture
def copy_patient(phantom_patient, tmp_path: Path):
    """A private copy of the phantom patient, to corrupt freely."""
    import shutil

    folder, truth = phantom_patient
    target = tmp_path / "patient"
    shutil.copytree(folder, target)
    return target, truth


def tree_digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``: "nothing changed" made checkable."""
    import hashlib

    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
