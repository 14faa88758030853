"""The benchmark's helpers: the error breakdown must add up (every wrong voxel counted once, under its
cause), and simulated corrective clicks must land where an annotator would click."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from eval_segmentation import ERROR_KINDS, correction_click, prompt_generators, propagation_errors, slice_prompts


def test_wrong_voxels_are_split_by_cause():
    truth = np.zeros((6, 10, 10), bool)
    truth[1:5, 2:6, 2:6] = True  # tumour on slices 1-4
    result = np.zeros_like(truth)
    result[2:4, 2:6, 2:7] = True  # reached 2-3: one extra column each (over), nothing under
    result[3, 2:6, 2:4] = False  # ... minus 8 voxels on slice 3 (under)
    result[5, 0:2, 0:3] = True  # past the end: 6 voxels (beyond)
    errors = propagation_errors(result, truth)
    assert set(errors) == set(ERROR_KINDS)
    assert errors == {"missed": 32, "under": 8, "over": 8, "beyond": 6}  # slices 1 and 4 never reached
    assert sum(errors.values()) == int((result ^ truth).sum())


def test_a_corrective_click_goes_to_the_middle_of_the_deepest_error():
    truth = np.zeros((40, 40), bool)
    truth[5:25, 5:25] = True
    prediction = truth.copy()
    prediction[10:20, 10:20] = False  # a 10 px hole: missed tumour, deep
    prediction[30:32, 0:40] = True  # two 2 px bands of extra: 160 pixels in all, more than the
    prediction[34:36, 0:40] = True  # hole's 100, but thin
    x, y, positive = correction_click(prediction, truth)
    assert positive and truth[y, x] and not prediction[y, x]
    assert 13 <= x <= 16 and 13 <= y <= 16  # the hole's centre, not the larger but thin bands

    only_extra = truth.copy()
    only_extra[26:34, 8:16] = True  # an 8 px blob outside the tumour
    x, y, positive = correction_click(only_extra, truth)
    assert not positive and only_extra[y, x] and not truth[y, x]


def test_a_perfect_mask_needs_no_click():
    truth = np.zeros((8, 8), bool)
    truth[2:5, 2:6] = True
    assert correction_click(truth.copy(), truth) is None


def test_a_set_of_views_is_scored_on_the_average_of_its_logits():
    """``eval_views.score`` averages the chosen views' logits and cuts them as ``SliceSegmenter``
    does; a view that errs the other way is corrected by the average, which the scores must show."""
    from concurrent.futures import ThreadPoolExecutor

    from eval_views import SliceRecord, describe, score

    from workers.segmentation import SliceSegmenter

    segmenter = SliceSegmenter(box_shrinks=(), box_threshold=0.0)  # cut at 0; no model is loaded
    truth = np.zeros((30, 30), bool)
    truth[10:20, 10:20] = True
    slice_view = np.where(truth, 4.0, -4.0)
    slice_view[10:20, 20:24] = 2.0  # too wide on the right
    other_view = np.where(truth, 4.0, -4.0)
    other_view[10:20, 20:24] = -6.0  # sure it is not
    box = np.array([8.0, 8.0, 25.0, 21.0], np.float32)
    record = SliceRecord("P1", truth, {"a": box, "b": box},
                         {part: np.stack([slice_view, other_view]).astype(np.float16) for part in ("a", "b")})
    with ThreadPoolExecutor(2) as pool:
        alone = score(segmenter, [record], (0,), pool)
        both = score(segmenter, [record], (0, 1), pool)
    assert alone["a"][0] == 2 * 100 / (140 + 100)  # 40 extra pixels
    assert both["a"][0] == both["b"][0] == 1.0  # (2 - 6) / 2 < 0: the extra strip is gone
    assert describe((0, 1), ["slice", "rot180"]) == "slice + rot180"
    zoomed = np.full_like(other_view, np.nan)  # a zoomed view says nothing outside its window,
    zoomed[5:25, 12:25] = other_view[5:25, 12:25]  # which leaves out the tumour's two left columns
    record.logits = {part: np.stack([slice_view, zoomed]).astype(np.float16) for part in ("a", "b")}
    with ThreadPoolExecutor(2) as pool:
        assert score(segmenter, [record], (0, 1), pool)["a"][0] == 1.0  # averaged inside, the slice's outside


def test_a_run_on_some_patients_prompts_the_boxes_of_the_full_run(tmp_path):
    """``--names`` runs are pooled with full runs: each chosen patient's loose boxes must be the ones
    the run over every patient draws for it, whatever patients come before it."""
    import SimpleITK as sitk

    rng = np.random.default_rng(7)
    masks = {}
    for number, slices in ((1, 3), (2, 5), (3, 4)):
        mask = np.zeros((slices + 2, 30, 30), np.uint8)
        for z in range(1, slices + 1):
            y, x = rng.integers(2, 15, 2)
            mask[z, y : y + 8, x : x + 9] = 1
        mask[0, 0:2, 0:2] = 1  # 4 px: under the minimum area, draws nothing
        folder = tmp_path / f"STS_{number:03d}"
        folder.mkdir()
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(folder / "MR_T1_mask.nii.gz"))
        masks[folder.name] = mask > 0
    folders = sorted(tmp_path.iterdir())
    full = np.random.default_rng(0)
    expected = {name: [loose for _, _, _, loose in slice_prompts(mask, full)] for name, mask in masks.items()}
    generators = prompt_generators(folders, {"STS_003"}, seed=0)
    assert set(generators) == {"STS_003"}
    drawn = [loose for _, _, _, loose in slice_prompts(masks["STS_003"], generators["STS_003"])]
    assert len(drawn) == 4
    np.testing.assert_array_equal(drawn, expected["STS_003"])
    alone = [loose for _, _, _, loose in slice_prompts(masks["STS_003"], np.random.default_rng(0))]
    assert not np.array_equal(alone, drawn)  # without the others' draws the boxes would differ
