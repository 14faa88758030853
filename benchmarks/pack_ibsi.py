"""Pack the IBSI development patients into one small ``.npz`` for a run on the GPU machine.

The device tool carries at most 64 MiB per call and not the shared data folder, so the
benchmarks that need a GPU read this file instead (``finetune_cv.py --packed``). Each patient
keeps the tumour's slices ± ``MARGIN_SLICES``, each slice scaled on its own the way the model's
preprocessing does (clipped to the 0.5/99.5 percentiles, to [0, 255]) and stored as uint8 (about
10 MiB for the 25 patients; preprocessing such a slice again changes it by at most one grey level);
``--lossless`` keeps the stored intensities instead (uint16, about 28 MiB). Masks are bool.

Data: TCIA "Soft-tissue-Sarcoma" (CC BY 3.0): Vallières M, Freeman CR, Skamene SR, El Naqa I. A
radiomics model from joint FDG-PET and MRI texture features for the prediction of lung metastases
in soft-tissue sarcomas of the extremities. The Cancer Imaging Archive (2015).
DOI 10.7937/K9/TCIA.2015.7GO2GSKS. The packed file is for a lease's scratch disk only: never commit
or publish it, never try to re-identify anyone. Usage::

    .venv/bin/python benchmarks/pack_ibsi.py .devdata/ibsi.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
for entry in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from eval_segmentation import DEFAULT_DATA_DIR  # noqa: E402
from finetune_cv import load_patients  # noqa: E402


def as_uint8(image: np.ndarray) -> np.ndarray:
    """Each slice of ``image[z, y, x]`` scaled like the model's preprocessing, as uint8."""
    from workers.models.litemedsam import normalise_intensity

    return np.stack([np.round(normalise_intensity(s) * 255) for s in image]).astype(np.uint8)


def pack(patients: list[tuple[str, np.ndarray, np.ndarray]], path: Path, lossless: bool = False) -> int:
    """Write ``patients`` to ``path`` atomically; returns the file's size in bytes."""
    arrays: dict[str, np.ndarray] = {"names": np.asarray([name for name, _, _ in patients])}
    for name, image, mask in patients:
        if lossless:
            whole = np.array_equal(image, np.round(image)) and image.min() >= 0 and image.max() < 2**16
            arrays[f"{name}_image"] = image.astype(np.uint16 if whole else np.float32)
        else:
            arrays[f"{name}_image"] = as_uint8(image)
        arrays[f"{name}_mask"] = mask.astype(bool)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def unpack(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, image [z, y, x], mask)`` per patient, as ``finetune_cv.load_patients`` gives them."""
    with np.load(path) as data:
        return [(str(n), data[f"{n}_image"], data[f"{n}_mask"]) for n in data["names"]]


def dev_patients(packed: Path | None, data_dir: Path, names: list[str] | None = None
                 ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The development patients as the benchmarks take them: from ``packed`` (this module's file, on
    the GPU machine) when given, else from ``data_dir`` (the shared folder); ``names`` keeps a subset."""
    if packed is None:
        return load_patients(data_dir, names)
    return [p for p in unpack(packed) if not names or p[0] in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--lossless", action="store_true", help="keep the stored intensities (uint16)")
    args = parser.parse_args(argv)
    patients = load_patients(args.data_dir, None)
    if not patients:
        print(f"{args.data_dir}: no STS_* folders (set $STS_SHARED_DATA)", file=sys.stderr)
        return 1
    size = pack(patients, args.output, args.lossless)
    slices = sum(len(image) for _, image, _ in patients)
    print(f"{args.output}: {len(patients)} patients, {slices} slices, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
