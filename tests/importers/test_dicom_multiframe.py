"""Enhanced (multi-frame) MR: geometry per frame from functional groups, frames in any order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
from click.testing import CliRunner
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from importers.cli import main
from importers.dicom import discover_series, read_series_volume

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _item(**values) -> Dataset:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


def write_enhanced(series_dir: Path, out: Path, seed: int = 0) -> None:
    """Pack a single-frame series into one Enhanced MR file, frames shuffled."""
    frames = [pydicom.dcmread(f) for f in sorted(series_dir.glob("*.dcm"))]
    np.random.default_rng(seed).shuffle(frames)
    first = frames[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_MR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for key in ("StudyInstanceUID", "FrameOfReferenceUID", "Modality", "Rows", "Columns", "BitsAllocated",
                "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
                "ScanningSequence", "RepetitionTime", "EchoTime"):
        if key in first:
            setattr(ds, key, first.data_element(key).value)
    ds.SOPClassUID = ENHANCED_MR
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "AX T1 SE enhanced"
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    ds.SharedFunctionalGroupsSequence = Sequence([_item(
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)]),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=first.ImageOrientationPatient)]),
        PixelValueTransformationSequence=Sequence([_item(RescaleSlope=first.get("RescaleSlope", 1),
                                                         RescaleIntercept=first.get("RescaleIntercept", 0),
                                                         RescaleType="US")]),
    )])
    ds.PerFrameFunctionalGroupsSequence = Sequence([
        _item(PlanePositionSequence=Sequence([_item(ImagePositionPatient=f.ImagePositionPatient)])) for f in frames])
    ds.PixelData = b"".join(f.PixelData for f in frames)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)


def test_enhanced_file_reads_like_the_single_frame_series(phantom_patient, tmp_path: Path) -> None:
    folder, _ = phantom_patient
    write_enhanced(folder / "T1", tmp_path / "enhanced" / "t1.dcm")
    single = next(s for s in discover_series(folder / "T1").values() if s.is_image)
    multi = next(iter(discover_series(tmp_path / "enhanced").values()))
    assert multi.n_frames == single.n_frames and len(multi.files) == 1
    a, b = read_series_volume(single).volume, read_series_volume(multi).volume
    np.testing.assert_array_equal(b.array, a.array)
    np.testing.assert_allclose(b.origin, a.origin, atol=1e-4)
    np.testing.assert_allclose(b.spacing, a.spacing, atol=1e-4)
    np.testing.assert_allclose(b.direction, a.direction, atol=1e-6)


def test_enhanced_file_imports(phantom_patient, tmp_path: Path) -> None:
    folder, truth = phantom_patient
    write_enhanced(folder / "T1", tmp_path / "patient" / "T1" / "t1.dcm", seed=1)
    result = CliRunner().invoke(main, [str(tmp_path / "patient"), "--patient-id", "MF-1", "--t2", str(folder / "T2"),
                                       "--data-dir", str(tmp_path / "data"), "--no-upload", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["reference_modality"] == "T1" and payload["shape"] == list(truth.t1.shape)
