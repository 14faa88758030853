"""importers.registration: starting points, affine refinement, and loud warnings when it looks bad."""

from __future__ import annotations

import numpy as np
import pytest

from importers.registration import register, resample_to
from importers.series import find_patient_series


@pytest.fixture(scope="module")
def phantom_volumes(phantom_patient):
    folder, truth = phantom_patient
    series = find_patient_series(folder).series
    return series["T1"].volume, series["T2"].volume, truth


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_different_frames_of_reference_start_from_image_moments(phantom_volumes) -> None:
    t1, t2, truth = phantom_volumes
    result = register(t1, t2, same_frame_of_reference=False)
    assert result.initialisation.startswith("image moments")
    carried = resample_to(truth.t2, truth.t1, result.transform, "nearest").array
    assert dice(carried, truth.t1.array) > 0.85


def test_affine_refinement_stays_close_to_the_rigid_truth(phantom_volumes) -> None:
    t1, t2, truth = phantom_volumes
    result = register(t1, t2, same_frame_of_reference=True, affine=True)
    assert result.transform.GetName() == "AffineTransform"
    linear = result.matrix[:3, :3]
    np.testing.assert_allclose(np.linalg.svd(linear, compute_uv=False), 1.0, atol=0.05)  # nearly rigid
    carried = resample_to(truth.t2, truth.t1, result.transform, "nearest").array
    assert dice(carried, truth.t1.array) > 0.85


def test_registration_onto_unrelated_noise_warns(phantom_volumes) -> None:
    t1, t2, _ = phantom_volumes
    rng = np.random.default_rng(0)
    noise = t2.with_array(rng.integers(0, 4000, size=t2.shape).astype(np.uint16))
    result = register(t1, noise, same_frame_of_reference=True)
    assert result.warnings, "registering onto noise must not look fine"
    assert result.to_json()["warnings"] == result.warnings


def test_resampling_keeps_integer_images_in_range(phantom_volumes) -> None:
    t1, t2, _ = phantom_volumes
    for interpolation in ("linear", "bspline"):
        out = resample_to(t2, t1, None, interpolation)
        assert out.array.dtype == t2.array.dtype and out.shape == t1.shape
        assert out.array.min() >= 0 and out.array.max() <= t2.array.max()
    with pytest.raises(ValueError, match="interpolation"):
        resample_to(t2, t1, None, "cubic")
