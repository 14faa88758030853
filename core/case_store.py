"""The on-disk layout of a case, shared by every role, and writes that never half-happen.

::

    <data_dir>/cases/<patient_id>/
        case.json                              metadata, geometry, registration, hashes
        <MODALITY>.nii.gz                      each modality on the reference grid
        slices/<MODALITY>/<slice_index:04d>.png
        labels/<ROI>__<MODALITY>.nii.gz        existing contours on the reference grid

A case is built in a staging folder beside its final place and swapped in with renames, so
a failed import leaves the previous version of the case exactly as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.errors import ConfigError, InputError

CASE_JSON = "case.json"
SLICES_DIR = "slices"
LABELS_DIR = "labels"
MODALITIES = ("T1", "T2")
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_patient_id(patient_id: str) -> str:
    """A pseudonym usable as a folder name and a Label Studio filter value."""
    if not isinstance(patient_id, str) or not _ID_PATTERN.fullmatch(patient_id):
        raise InputError(
            f"patient id {patient_id!r} is not usable: 1-64 characters, letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (use the study pseudonym, never a name)"
        )
    return patient_id


def check_roi_name(roi: str) -> str:
    """ROI names become file names; keep them to a safe alphabet."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", roi.strip()).strip("._") or "ROI"
    return cleaned[:64]


class CaseLayout:
    """Paths inside one case folder (the final one or a staging one)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def case_json(self) -> Path:
        return self.root / CASE_JSON

    def volume(self, modality: str) -> Path:
        return self.root / f"{modality}.nii.gz"

    def slices_dir(self, modality: str) -> Path:
        return self.root / SLICES_DIR / modality

    def slice_png(self, modality: str, slice_index: int) -> Path:
        return self.slices_dir(modality) / f"{slice_index:04d}.png"

    def label(self, roi: str, modality: str) -> Path:
        return self.root / LABELS_DIR / f"{check_roi_name(roi)}__{modality}.nii.gz"

    def labels(self) -> list[Path]:
        return sorted((self.root / LABELS_DIR).glob("*__*.nii.gz"))

    def read_case_json(self) -> dict[str, Any]:
        try:
            return json.loads(self.case_json.read_text())
        except FileNotFoundError as exc:
            raise InputError(f"{self.case_json}: no such case (import it first)") from exc
        except json.JSONDecodeError as exc:
            raise InputError(f"{self.case_json}: not valid JSON ({exc})") from exc


class CaseStore:
    """All cases under ``<data_dir>/cases``."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        if not data_dir:
            raise ConfigError("no data directory given (set STS_DATA_DIR or pass --data-dir)")
        self.data_dir = Path(data_dir)
        self.cases_dir = self.data_dir / "cases"

    def case(self, patient_id: str) -> CaseLayout:
        return CaseLayout(self.cases_dir / check_patient_id(patient_id))

    def case_ids(self) -> list[str]:
        if not self.cases_dir.is_dir():
            return []
        return sorted(p.name for p in self.cases_dir.iterdir()
                      if (p / CASE_JSON).is_file() and not p.name.startswith("."))

    @contextlib.contextmanager
    def staged_case(self, patient_id: str) -> Iterator[CaseLayout]:
        """Yield an empty staging folder; on success it replaces the case, on error it vanishes."""
        with staged_folder(self.case(patient_id).root) as staging:
            yield CaseLayout(staging)


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Build a folder beside ``final`` and swap it in only if the block succeeds.

    The swap is two renames on one file system: ``final -> .old-*`` then ``staging -> final``;
    a crash in between leaves both folders, never a mixed one. On error the staging folder is
    removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{final.name}-", dir=final.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, payload: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
