"""Registration quality on real data (TCIA STS_001): prints figures, asserts nothing.

- Dice of GTV_Mass drawn on T2 (carried onto the T1 grid) vs GTV_Mass drawn on T1, with the
  scanner geometry alone and after registration;
- recovery of a known rigid move of T2's geometry tags (3° about (0.3, 0.5, 0.8), 8 mm):
  rotation found and voxel-wise correlation with the unmoved result inside the body.

    .venv/bin/python benchmarks/quality_sts001.py [--patient DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.case_store import CaseStore  # noqa: E402
from core.geometry import read_nifti  # noqa: E402
from importers.pipeline import ImportOptions, import_patient  # noqa: E402
from importers.registration import resample_to  # noqa: E402
from importers.series import find_patient_series  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def move_series(source: Path, target: Path, degrees: float, axis, translation) -> None:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    rotation = np.asarray(sitk.VersorTransform(tuple(axis), float(np.radians(degrees))).GetMatrix()).reshape(3, 3)
    files = sorted(source.glob("*.dcm"))
    centre = np.mean([np.asarray(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, float)
                      for f in files], axis=0)
    target.mkdir(parents=True)
    for path in files:
        ds = pydicom.dcmread(path)
        iop, ipp = np.asarray(ds.ImageOrientationPatient, float), np.asarray(ds.ImagePositionPatient, float)
        ds.ImageOrientationPatient = [float(v) for v in np.r_[rotation @ iop[:3], rotation @ iop[3:]]]
        ds.ImagePositionPatient = [float(v) for v in rotation @ (ipp - centre) + centre + np.asarray(translation)]
        ds.save_as(target / path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patient", type=Path, default=REPO.parent / "shared/data/tcia-sts-raw/STS_001")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = CaseStore(Path(tmp) / "data")
        started = time.perf_counter()
        result = import_patient(args.patient, ImportOptions("Q-1"), store)
        layout = store.case("Q-1")
        reg = result.registration
        print(f"import (no Label Studio): {time.perf_counter() - started:.1f} s; registration "
              f"{reg['transform']['rotation_deg']:.2f}°, {reg['transform']['translation_mm']:.2f} mm, "
              f"MI {reg['mutual_information']['before']:.4f} -> {reg['mutual_information']['after']:.4f}, "
              f"{reg['iterations']} iterations, warnings {reg['warnings']}")
        on_t1 = read_nifti(layout.label("GTV_Mass", "T1")).array
        from_t2 = read_nifti(layout.label("GTV_Mass", "T2")).array
        series = find_patient_series(args.patient).series
        t2_mask = next(c for c in series["T2"].contours if c.roi == "GTV_Mass").mask
        scanner_only = resample_to(series["T2"].volume.with_array(t2_mask), series["T1"].volume, None, "nearest").array
        print(f"GTV_Mass T2->T1 Dice: scanner geometry {dice(scanner_only, on_t1):.4f}, "
              f"registered {dice(from_t2, on_t1):.4f}")

        patient = Path(tmp) / "moved"
        shutil.copytree(args.patient / "MR_T1" / "image", patient / "T1")
        move_series(args.patient / "MR_T2" / "image", patient / "T2", 3.0, (0.3, 0.5, 0.8), (5.0, -4.0, 4.9))
        moved = import_patient(patient, ImportOptions("Q-2", t1="T1", t2="T2"), store)
        registered = read_nifti(store.case("Q-2").volume("T2")).array.astype(float)
        unmoved = read_nifti(layout.volume("T2")).array.astype(float)
        body = (unmoved > np.percentile(unmoved, 99) * 0.1) & (registered > 0)
        correlation = np.corrcoef(registered[body], unmoved[body])[0, 1]
        mreg = moved.registration
        print(f"moved T2 (3°, 8.0 mm): registration found {mreg['transform']['rotation_deg']:.2f}°, "
              f"{mreg['transform']['translation_mm']:.2f} mm at the image centre; correlation with the unmoved "
              f"result inside the body {correlation:.4f}")


if __name__ == "__main__":
    main()
