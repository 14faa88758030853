"""The synthetic patient must be what its truth says, read back by independent readers.

Nothing is mocked: files are read with pydicom and with SimpleITK/GDCM (which sorts slices
by position, as a real importer must), contours are rasterised independently here, and the
motion is checked against geometry computed by hand.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from core.geometry import Volume, read_nifti, to_sitk
from importers.phantom import (
    DEFAULT_PHI,
    EDEMA_MARGIN_MM,
    MR_IMAGE_STORAGE,
    RT_STRUCTURE_SET_STORAGE,
    TISSUES,
    Label,
    PhantomTruth,
    RigidMotion,
    main,
    make_phantom_volumes,
    write_phantom_nifti,
    write_phantom_patient,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PLANTED_PHI = {
    "PatientName": "LEAKCHECK^ZELDA",
    "PatientID": "LEAKID-7731",
    "PatientBirthDate": "19010203",
    "PatientAddress": "LEAKADDR 99 NOWHERE LANE",
    "AccessionNumber": "LEAKACC-5521",
    "ReferringPhysicianName": "LEAKDOC^HOUSE",
    "InstitutionName": "LEAKINST GENERAL",
    "OtherPatientIDs": "LEAKOTHER-0042",
}
SMALL = {
    "t1_shape": (12, 64, 80),
    "t1_spacing": (2.4, 2.0, 5.0),
    "t2_shape": (12, 56, 60),
    "t2_spacing": (3.0, 2.8, 5.0),
}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomTruth:
    """The default phantom (Myxoid, seed 0, default motion), written once for the module."""
    return write_phantom_patient(tmp_path_factory.mktemp("phantom"), phi=PLANTED_PHI)


def _read_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(names)
    return reader.Execute()


def _datasets(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]


def _sorted_by_position(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    def along_normal(ds: pydicom.Dataset) -> float:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        return float(np.asarray(ds.ImagePositionPatient, dtype=float) @ np.cross(iop[:3], iop[3:]))

    return sorted(datasets, key=along_normal)


def _assert_geometry(image: sitk.Image, grid: Volume, atol: float = 1e-3) -> None:
    assert image.GetSize() == grid.size_xyz
    np.testing.assert_allclose(image.GetOrigin(), grid.origin, atol=atol)
    np.testing.assert_allclose(image.GetSpacing(), grid.spacing, atol=atol)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), grid.direction, atol=atol)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _centroid_lps(mask: Volume) -> np.ndarray:
    k, j, i = np.nonzero(mask.array)
    return mask.index_to_physical(np.stack([i, j, k], axis=1)).mean(axis=0)


def _points_in_polygon(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points (independent of the phantom's ellipse maths)."""
    inside = np.zeros(px.shape, bool)
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for ax, ay, bx, by in zip(x0, y0, x1, y1, strict=True):
        crosses = (ay > py) != (by > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = ax + (py - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (px < x_at)
    return inside


def _rasterise_roi(rtstruct: pydicom.Dataset, roi_name: str, grid: Volume, sop_uids: tuple[str, ...]) -> np.ndarray:
    """Voxel centres inside the ROI's contours, each placed on the slice it references."""
    number = next(r.ROINumber for r in rtstruct.StructureSetROISequence if r.ROIName == roi_name)
    roi = next(r for r in rtstruct.ROIContourSequence if r.ReferencedROINumber == number)
    mask = np.zeros(grid.shape, np.uint8)
    jj, ii = np.mgrid[0 : grid.shape[1], 0 : grid.shape[2]]
    for contour in roi.ContourSequence:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        assert len(points) == contour.NumberOfContourPoints
        k = sop_uids.index(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
        index = grid.physical_to_index(points)
        np.testing.assert_allclose(index[:, 2], k, atol=1e-3 / grid.spacing[2])  # on that slice's plane
        mask[k] |= _points_in_polygon(ii, jj, index[:, :2])
    return mask


# --- files and tags -----------------------------------------------------------------------


def test_dicom_files_are_valid_mr_with_the_intended_tags(phantom: PhantomTruth) -> None:
    t1, t2 = _datasets(phantom.out_dir / "T1"), _datasets(phantom.out_dir / "T2")
    assert len(t1) == phantom.t1.shape[0] and len(t2) == phantom.t2.shape[0]
    for ds in t1 + t2:
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == MR_IMAGE_STORAGE
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.ImplementationClassUID
        assert ds.Modality == "MR" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.SamplesPerPixel, ds.PixelRepresentation) == (16, 1, 0)
        assert ds.HighBit == ds.BitsStored - 1
        assert ds.StudyInstanceUID == phantom.study_instance_uid
        assert ds.FrameOfReferenceUID == phantom.frame_of_reference_uid
        assert float(ds.SliceThickness) == pytest.approx(4.0)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(5.0)
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M", "ND"]
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
    assert {ds.SeriesInstanceUID for ds in t1} == {phantom.t1_series_uid}
    assert {ds.SeriesInstanceUID for ds in t2} == {phantom.t2_series_uid}
    assert phantom.t1_series_uid != phantom.t2_series_uid
    all_sops = [ds.SOPInstanceUID for ds in t1 + t2]
    assert len(set(all_sops)) == len(all_sops)
    assert set(phantom.t1_sop_uids) | set(phantom.t2_sop_uids) == set(all_sops)

    assert t1[0].SeriesDescription == "AX SE T1" and t1[0].ScanningSequence == "SE"
    assert list(t1[0].SequenceVariant) == ["SK", "SP"]
    assert (float(t1[0].RepetitionTime), float(t1[0].EchoTime)) == (550.0, 12.0)
    assert t2[0].SeriesDescription == "AX T2 FS" and t2[0].ScanOptions == "FS"
    assert (float(t2[0].RepetitionTime), float(t2[0].EchoTime)) == (4000.0, 85.0)
    assert (float(t2[0].RescaleSlope), float(t2[0].RescaleIntercept)) == (0.5, 10.0)
    # PixelSpacing is [row spacing (y), column spacing (x)].
    assert [float(v) for v in t2[0].PixelSpacing] == [phantom.t2.spacing[1], phantom.t2.spacing[0]]


def test_file_names_and_instance_numbers_do_not_give_the_slice_order(phantom: PhantomTruth) -> None:
    for series, scrambled in (("T1", False), ("T2", True)):
        paths = sorted((phantom.out_dir / series).glob("*.dcm"))
        assert all(len(p.stem) == 16 and int(p.stem, 16) >= 0 for p in paths)
        by_name = [pydicom.dcmread(p) for p in paths]
        by_position = _sorted_by_position(by_name)
        assert [d.SOPInstanceUID for d in by_name] != [d.SOPInstanceUID for d in by_position]
        numbers = [int(d.InstanceNumber) for d in by_position]
        assert sorted(numbers) == list(range(1, len(numbers) + 1))
        assert (numbers != sorted(numbers)) == scrambled
        expected = phantom.t1_sop_uids if series == "T1" else phantom.t2_sop_uids
        assert tuple(d.SOPInstanceUID for d in by_position) == expected


def test_planted_phi_is_in_every_file_and_unknown_keywords_are_refused(phantom: PhantomTruth, tmp_path: Path) -> None:
    files = sorted(phantom.out_dir.rglob("*.dcm"))
    assert len(files) == phantom.t1.shape[0] + phantom.t2.shape[0] + 2
    for path in files:
        ds = pydicom.dcmread(path)
        for key, value in PLANTED_PHI.items():
            assert str(ds.data_element(key).value) == value, (path, key)
        assert ds.StationName == DEFAULT_PHI["StationName"]  # defaults fill what phi does not override
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        write_phantom_patient(tmp_path, phi={"PatientNom": "X"}, **SMALL)


# --- geometry as a real reader sees it ----------------------------------------------------


def test_simpleitk_reads_each_series_on_the_intended_grid(phantom: PhantomTruth) -> None:
    _assert_geometry(_read_series(phantom.out_dir / "T1"), phantom.t1)
    _assert_geometry(_read_series(phantom.out_dir / "T2"), phantom.t2)
    direction = phantom.t1.direction
    np.testing.assert_allclose(direction[:, 0], [1, 0, 0], atol=1e-12)  # oblique about L: row cosine unchanged
    np.testing.assert_allclose(direction[:, 2], [0, -np.sin(np.deg2rad(1.0)), np.cos(np.deg2rad(1.0))], atol=1e-12)
    # the limb centre is the middle of the T1 grid
    centre = phantom.t1.index_to_physical((np.asarray(phantom.t1.size_xyz) - 1) / 2)
    np.testing.assert_allclose(centre, phantom.anatomy.centre_lps, atol=1e-9)


def test_non_square_pixels_and_matrices_are_not_swapped(tmp_path: Path) -> None:
    truth = write_phantom_patient(tmp_path, oblique_deg=7.0, with_rtstruct=False, **SMALL)
    for series, grid in (("T1", truth.t1), ("T2", truth.t2)):
        image = _read_series(tmp_path / series)
        _assert_geometry(image, grid)
        # the pixels are not transposed: the tissues are where the truth says
        array = sitk.GetArrayFromImage(image)
        labels = truth.labels_on(grid, moved=series == "T2")
        muscle = np.median(array[labels == Label.MUSCLE])
        if series == "T1":
            assert np.median(array[labels == Label.FAT]) > 2 * muscle
        else:
            assert np.median(array[grid.array == 1]) > 4 * muscle


def test_rescale_slope_is_applied_by_simpleitk(phantom: PhantomTruth) -> None:
    image = sitk.GetArrayFromImage(_read_series(phantom.out_dir / "T2"))
    assert image.dtype.kind == "f"
    by_position = _sorted_by_position(_datasets(phantom.out_dir / "T2"))
    for k in (0, len(by_position) // 2):
        stored = by_position[k].pixel_array.astype(float)
        np.testing.assert_allclose(image[k], stored * 0.5 + 10.0, atol=1e-4)
    t1 = _datasets(phantom.out_dir / "T1")[0]
    assert (float(t1.RescaleSlope), float(t1.RescaleIntercept)) == (1.0, 0.0)


def test_intensities_follow_the_tissue_table_for_myxoid(phantom: PhantomTruth) -> None:
    for series, grid in (("T1", phantom.t1), ("T2", phantom.t2)):
        array = sitk.GetArrayFromImage(_read_series(phantom.out_dir / series)).astype(float)
        labels = phantom.labels_on(grid, moved=series == "T2")
        med = {label: np.median(array[labels == label]) for label in range(8)}
        assert med[Label.AIR] < 0.05 * med[Label.MUSCLE] + 15
        assert med[Label.CORTEX] < 0.3 * med[Label.MUSCLE]
        if series == "T1":
            assert med[Label.TUMOUR] < 0.7 * med[Label.MUSCLE]  # myxoid: dark on T1
            assert med[Label.FAT] > 2 * med[Label.MUSCLE] and med[Label.MARROW] > 2 * med[Label.MUSCLE]
        else:
            assert med[Label.TUMOUR] > 4 * med[Label.MUSCLE]  # very bright on T2 FS
            assert med[Label.FAT] < 0.5 * med[Label.MUSCLE] and med[Label.MARROW] < 0.5 * med[Label.MUSCLE]
            assert med[Label.EDEMA] > 1.5 * med[Label.MUSCLE]
            # the bright blob in the T2 pixels is where T2's truth mask says (the moved tumour)
            bright = array > (med[Label.TUMOUR] + med[Label.EDEMA]) / 2
            assert _dice(bright, grid.array) > 0.9


@pytest.mark.parametrize("tissue", TISSUES)
def test_each_tissue_class_looks_like_its_description(tissue: str) -> None:
    t1, t2, truth = make_phantom_volumes(tissue=tissue.lower(), **SMALL)
    assert truth.tissue == tissue
    stats = {}
    for name, image, grid, moved in (("T1", t1, truth.t1, False), ("T2", t2, truth.t2, True)):
        labels = truth.labels_on(grid, moved=moved)
        stats[name] = {
            "tumour": np.median(image.array[labels == Label.TUMOUR]),
            "muscle": np.median(image.array[labels == Label.MUSCLE]),
            "fat": np.median(image.array[labels == Label.FAT]),
        }
    t1s, t2s = stats["T1"], stats["T2"]
    if tissue == "Myxoid":
        assert t1s["tumour"] < t1s["muscle"] and t2s["tumour"] > 4 * t2s["muscle"]
    elif tissue == "Fat":
        assert t1s["tumour"] == pytest.approx(t1s["fat"], rel=0.15) and t2s["tumour"] < t2s["muscle"]
    elif tissue == "Fibrous":
        assert t1s["tumour"] < t1s["muscle"] and t2s["tumour"] < 1.2 * t2s["muscle"]
    elif tissue == "Nerve":
        assert t1s["tumour"] == pytest.approx(t1s["muscle"], rel=0.2) and t2s["tumour"] > 2 * t2s["muscle"]
        # target sign: on T2 the centre of the tumour is darker than its rim
        k, j, i = np.indices(truth.t2.shape).reshape(3, -1)
        world = truth.t2_to_world(truth.t2.index_to_physical(np.stack([i, j, k], axis=1)))
        q = np.sum(((world - truth.anatomy.tumour_centre_lps) / truth.anatomy.tumour_semi_axes_mm) ** 2, axis=1)
        values = t2.array.reshape(-1)
        assert np.median(values[q < 0.1]) < 0.6 * np.median(values[(q > 0.6) & (q < 0.9)])
    elif tissue == "Vascular":
        tumour = t2.array[truth.t2.array == 1]
        assert t2s["tumour"] > 3 * t2s["muscle"] and tumour.std() / tumour.mean() > 0.15


# --- truth masks and motion ---------------------------------------------------------------


def test_motion_matrix_convention() -> None:
    c = np.array([10.0, -20.0, 30.0])
    quarter = RigidMotion(rotation_deg=(0, 0, 90), translation_mm=(1, 2, 3)).matrix(c)
    # rotation about z by +90° takes +x to +y, about c, then the translation is added
    point = np.append(c + np.array([5.0, 0.0, 0.0]), 1.0)
    expected = np.append(c + np.array([0.0, 5.0, 0.0]) + np.array([1.0, 2.0, 3.0]), 1.0)
    np.testing.assert_allclose(quarter @ point, expected, atol=1e-12)
    # x first, then y, then z: R = Rz @ Ry @ Rx
    rx = RigidMotion(rotation_deg=(30, 0, 0)).rotation_matrix()
    ry = RigidMotion(rotation_deg=(0, 20, 0)).rotation_matrix()
    rz = RigidMotion(rotation_deg=(0, 0, 10)).rotation_matrix()
    np.testing.assert_allclose(RigidMotion(rotation_deg=(30, 20, 10)).rotation_matrix(), rz @ ry @ rx, atol=1e-12)


def test_t2_truth_is_the_t1_truth_moved(phantom: PhantomTruth) -> None:
    t1_ml = phantom.t1.array.sum() * np.prod(phantom.t1.spacing) / 1000
    t2_ml = phantom.t2.array.sum() * np.prod(phantom.t2.spacing) / 1000
    assert t1_ml == pytest.approx(phantom.tumour_volume_ml, rel=0.05)
    assert t2_ml == pytest.approx(t1_ml, rel=0.05)
    centre = phantom.anatomy.tumour_centre_lps
    np.testing.assert_allclose(_centroid_lps(phantom.t1), centre, atol=1.0)
    np.testing.assert_allclose(_centroid_lps(phantom.t2), phantom.world_to_t2(centre), atol=1.0)
    # The default motion moves the tumour by several mm: the two frames really differ.
    assert np.linalg.norm(phantom.world_to_t2(centre) - centre) > 4.0
    np.testing.assert_allclose(phantom.t2_to_world(phantom.world_to_t2(centre)), centre, atol=1e-9)
    # Resampling T2's mask with the known transform lands on T1's mask (5 mm slices limit Dice).
    moved_back = sitk.Resample(
        _to_image(phantom.t2),
        _to_image(phantom.t1),
        phantom.sitk_transform(),
        sitk.sitkLinear,
    )
    assert _dice(sitk.GetArrayFromImage(moved_back) >= 0.5, phantom.t1.array) > 0.9
    without = sitk.Resample(_to_image(phantom.t2), _to_image(phantom.t1), sitk.Transform(), sitk.sitkLinear)
    assert _dice(sitk.GetArrayFromImage(without) >= 0.5, phantom.t1.array) < 0.85
    # the un-moved analytic tumour on T1's grid is T1's truth
    np.testing.assert_array_equal(phantom.tumour_mask_on(phantom.t1), phantom.t1.array)


def test_registered_t2_image_matches_the_un_moved_truth(phantom: PhantomTruth) -> None:
    t2 = _read_series(phantom.out_dir / "T2")
    t1_ref = _read_series(phantom.out_dir / "T1")
    aligned = sitk.GetArrayFromImage(sitk.Resample(t2, t1_ref, phantom.sitk_transform(), sitk.sitkLinear, 0.0))
    truth = phantom.tumour_mask_on(phantom.t1).astype(bool)
    labels = phantom.labels_on(phantom.t1)
    assert np.median(aligned[truth]) > 4 * np.median(aligned[labels == Label.MUSCLE])
    bright = aligned > (np.median(aligned[truth]) + np.median(aligned[labels == Label.EDEMA])) / 2
    assert _dice(bright, truth) > 0.85


def test_no_motion_means_identity(tmp_path: Path) -> None:
    truth = write_phantom_patient(tmp_path, t2_motion=None, with_rtstruct=False, **SMALL)
    np.testing.assert_array_equal(truth.motion_matrix, np.eye(4))
    np.testing.assert_array_equal(truth.t2.array, truth.tumour_mask_on(truth.t2))


# --- RTSTRUCT -----------------------------------------------------------------------------


def test_t1_rtstruct_references_t1_and_matches_the_truth(phantom: PhantomTruth) -> None:
    rt = pydicom.dcmread(phantom.out_dir / "T1_contours" / "rtstruct.dcm")
    assert rt.SOPClassUID == rt.file_meta.MediaStorageSOPClassUID == RT_STRUCTURE_SET_STORAGE
    assert rt.Modality == "RTSTRUCT" and rt.StudyInstanceUID == phantom.study_instance_uid
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["GTV_Mass", "GTV_Edema"]
    assert {r.ReferencedFrameOfReferenceUID for r in rt.StructureSetROISequence} == {phantom.frame_of_reference_uid}
    assert len(rt.RTROIObservationsSequence) == 2
    ref_for = rt.ReferencedFrameOfReferenceSequence[0]
    assert ref_for.FrameOfReferenceUID == phantom.frame_of_reference_uid
    ref_series = ref_for.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == phantom.t1_series_uid
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ContourImageSequence} == set(phantom.t1_sop_uids)

    mass = _rasterise_roi(rt, "GTV_Mass", phantom.t1, phantom.t1_sop_uids)
    assert _dice(mass, phantom.t1.array) > 0.97
    edema = _rasterise_roi(rt, "GTV_Edema", phantom.t1, phantom.t1_sop_uids)
    assert _dice(edema, phantom.tumour_mask_on(phantom.t1, margin_mm=EDEMA_MARGIN_MM)) > 0.97
    assert edema.sum() > 1.3 * mass.sum() and np.all(edema[mass == 1] == 1)


def test_t2_rtstruct_follows_the_tumour_into_t2(phantom: PhantomTruth) -> None:
    rt = pydicom.dcmread(phantom.out_dir / "T2_contours" / "rtstruct.dcm")
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["GTV_Mass"]
    ref_series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == phantom.t2_series_uid
    referenced = {c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in rt.ROIContourSequence[0].ContourSequence}
    assert referenced <= set(phantom.t2_sop_uids)
    mass = _rasterise_roi(rt, "GTV_Mass", phantom.t2, phantom.t2_sop_uids)
    assert _dice(mass, phantom.t2.array) > 0.97
    assert _dice(mass, phantom.tumour_mask_on(phantom.t2)) < 0.9  # not the un-moved tumour


# --- determinism, NIfTI, CLI, speed -------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_patient(tmp_path: Path) -> None:
    a = write_phantom_patient(tmp_path / "a", seed=3, **SMALL)
    b = write_phantom_patient(tmp_path / "b", seed=3, **SMALL)
    c = write_phantom_patient(tmp_path / "c", seed=4, **SMALL)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.dcm"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.dcm"))
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert a.t1_series_uid == b.t1_series_uid != c.t1_series_uid
    img_a = sitk.GetArrayFromImage(_read_series(tmp_path / "a" / "T2"))
    img_c = sitk.GetArrayFromImage(_read_series(tmp_path / "c" / "T2"))
    assert not np.array_equal(img_a, img_c)
    np.testing.assert_array_equal(a.t2.array, c.t2.array)  # same anatomy, different noise


def test_existing_files_are_not_silently_mixed(tmp_path: Path) -> None:
    write_phantom_patient(tmp_path, with_rtstruct=False, **SMALL)
    with pytest.raises(FileExistsError):
        write_phantom_patient(tmp_path, seed=1, **SMALL)
    write_phantom_patient(tmp_path, seed=1, overwrite=True, **SMALL)
    assert len(list((tmp_path / "T1").glob("*.dcm"))) == SMALL["t1_shape"][0]


def test_nifti_phantom(tmp_path: Path) -> None:
    truth = write_phantom_nifti(tmp_path, tissue="Fat", **SMALL)
    t1, t2, mask = (read_nifti(tmp_path / name) for name in ("T1.nii.gz", "T2.nii.gz", "GTV_Mass_mask.nii.gz"))
    for volume, grid in ((t1, truth.t1), (t2, truth.t2), (mask, truth.t1)):
        assert volume.shape == grid.shape
        np.testing.assert_allclose(volume.origin, grid.origin, atol=1e-3)
        np.testing.assert_allclose(volume.spacing, grid.spacing, atol=1e-3)
        np.testing.assert_allclose(volume.direction, grid.direction, atol=1e-3)
    np.testing.assert_array_equal(mask.array, truth.t1.array)
    expected_t1, expected_t2, _ = make_phantom_volumes(tissue="Fat", **SMALL)
    np.testing.assert_allclose(t1.array, expected_t1.array)
    np.testing.assert_allclose(t2.array, expected_t2.array)
    assert truth.t1_series_uid is None and truth.tissue == "Fat"


def test_cli_writes_a_patient(tmp_path: Path) -> None:
    assert main([str(tmp_path / "dicom"), "--tissue", "nerve", "--seed", "2"]) == 0
    assert len(list((tmp_path / "dicom" / "T2").glob("*.dcm"))) == 24
    assert (tmp_path / "dicom" / "T2_contours" / "rtstruct.dcm").is_file()
    assert main([str(tmp_path / "dicom")]) == 2  # refuses to mix with existing files
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "importers.phantom",
            str(tmp_path / "nifti"),
            "--nifti",
            "--tissue",
            "Vascular",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (tmp_path / "nifti").iterdir()} == {
        "T1.nii.gz",
        "T2.nii.gz",
        "GTV_Mass_mask.nii.gz",
    }


def _to_image(volume: Volume) -> sitk.Image:
    return sitk.Cast(to_sitk(volume), sitk.sitkFloat32)
