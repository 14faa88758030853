"""Tests of ``workers.segmentation``: real LiteMedSAM inference on CPU, no mocking.

The propagation test reads one IBSI patient from the shared data (TCIA "Soft-tissue-Sarcoma",
CC BY 3.0: Vallières M, Freeman CR, Skamene SR, El Naqa I. A radiomics model from joint FDG-PET and
MRI texture features for the prediction of lung metastases in soft-tissue sarcomas of the
extremities. The Cancer Imaging Archive (2015). DOI 10.7937/K9/TCIA.2015.7GO2GSKS); the data stay
in the shared folder and are never copied into the repository.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.brush_rle import brush_result_to_mask, mask_to_brush_result
from core.case_store import sha256_file
from core.errors import ConfigError, InputError, ProjectError
from workers.embedding_cache import EmbeddingCache
from workers.models.litemedsam import (
    LITEMEDSAM_SHA256,
    WeightsError,
    litemedsam_weights_path,
    load_litemedsam,
    mask_prompt_logits,
    tail_percentiles,
)
from workers.propagation import (
    DEFAULT_PROPAGATION,
    SeedClassifier,
    SeedLikeness,
    fit_logistic,
    propagate,
    propagation_settings_from_env,
    propagation_views,
    recut_outlines,
    taper_cuts,
)
from workers.segmentation import (
    DEFAULT_BOX_SHRINKS_PX,
    DEFAULT_BOX_THRESHOLD,
    DEFAULT_CLICK_MIN_REACH_PX,
    DEFAULT_CLICK_REACH,
    DEFAULT_PROMPT_VIEWS,
    DEFAULT_WARM_PROMPT_VIEWS,
    NoAutomaticModelError,
    SliceSegmenter,
    box_shrinks_from_env,
    click_reach_region,
    parse_box_shrinks,
    prompt_views_from_env,
    segment_slice,
    segment_volume,
    shrunk_boxes,
    warm_prompt_views_from_env,
)
from workers.slice_masks import box_region, check_points, fill_holes, keep_components, signed_distance
from workers.slice_views import MIRRORED, VIEWS, ZOOM_VIEWS, parse_views

PROPAGATION_PATIENT = "STS_019"
"""A small patient (15 tumour slices of 110×112 px) so that propagation runs in well under a minute."""

PROPAGATION_MARGIN_OVER_NAIVE = 0.05
"""``propagate`` must beat the naive chain (box of the previous result + 5 px until empty) by this much
in volume Dice: its stopping rule is what makes the difference (measured 0.61 vs 0.44 on this patient)."""


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def ellipse_slice(
    height: int, width: int, centre: tuple[float, float], axes: tuple[float, float], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """A bright ellipse on a noisy darker background: ``(image float32, truth bool, box + 5 px)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    cx, cy = centre
    ax, ay = axes
    truth = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1
    image = rng.normal(300, 40, (height, width)) + 500 * truth
    box = (cx - ax - 5, cy - ay - 5, cx + ax + 5, cy + ay + 5)
    return image.astype(np.float32), truth, box


def ibsi_patient(shared_data: Path, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """``(volume, truth, seed_index)`` of an IBSI patient; the seed is the slice with the largest
    tumour area, as ``eval_segmentation.py`` seeds propagation."""
    import SimpleITK as sitk

    folder = shared_data / "ibsi-sts-t1" / name
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "MR_T1_image.nii.gz")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "MR_T1_mask.nii.gz"))) > 0
    return volume, truth, int(np.argmax(truth.reshape(len(truth), -1).sum(1)))


def propagate_with_and_without(shared_data: Path, cache: EmbeddingCache, name: str, **changes: float | str):
    """``(truth, seed_index, default, changed)``: an IBSI patient propagated from its largest slice
    with ``DEFAULT_PROPAGATION`` and with ``changes`` to it (the second run reuses the first's
    embeddings from ``cache``)."""
    volume, truth, seed_index = ibsi_patient(shared_data, name)
    segmenter = SliceSegmenter(cache=cache)
    default = propagate(volume, seed_index, truth[seed_index], segmenter=segmenter)
    changed = propagate(volume, seed_index, truth[seed_index], segmenter=segmenter,
                        settings=dataclasses.replace(DEFAULT_PROPAGATION, **changes))
    return truth, seed_index, default, changed


@pytest.fixture(scope="module")
def ibsi_cache() -> EmbeddingCache:
    """One embedding cache for the real-patient tests, so that a patient's slices go through the
    image encoder once per module, not once per test (about 1 s per slice and view on CPU)."""
    return EmbeddingCache(1024)


@pytest.fixture(scope="module")
def model():
    return load_litemedsam("cpu")


# ---------------------------------------------------------------------------------------- weights


def test_weights_file_has_the_pinned_hash():
    assert sha256_file(litemedsam_weights_path()) == LITEMEDSAM_SHA256


def test_model_is_loaded_once_per_process(model):
    assert load_litemedsam("cpu") is model
    assert model.version == f"litemedsam-{LITEMEDSAM_SHA256[:12]}"


def test_the_encoder_runs_channels_last_and_embeds_as_the_plain_layout_does(model, monkeypatch):
    """NHWC weights are a CPU speed-up only: the embedding must be the one the NCHW encoder gives."""
    import copy

    import torch

    monkeypatch.setenv("STS_CPU_BF16", "off")  # float32, as the plain encoder runs
    plain = copy.deepcopy(model.image_encoder).to(memory_format=torch.contiguous_format)
    conv = next(m for m in model.image_encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(model.embed(images), plain(images), atol=1e-4)


def test_the_cpu_encoder_runs_in_bfloat16_where_asked_and_segments_a_real_tumour_as_float32_does(
        shared_data: Path, ibsi_cache: EmbeddingCache, monkeypatch):
    """``$STS_CPU_BF16``: unset or auto follows the CPU's bfloat16 units (AMX, AVX512-BF16), on/off force
    it. Under bfloat16 the embeddings of real slices stay within 10 % (relative norm) of float32's, and a
    tight box's mask on each of them overlaps float32's by Dice > 0.95: a speed choice, not another model."""
    import torch

    from workers.models.litemedsam import cpu_bf16_enabled, cpu_has_bf16_units, encoder_precision

    monkeypatch.delenv("STS_CPU_BF16", raising=False)  # the default (the test session itself runs with off)
    assert cpu_bf16_enabled() == cpu_has_bf16_units() and encoder_precision("cuda") == "bfloat16"
    monkeypatch.setenv("STS_CPU_BF16", "auto")
    assert cpu_bf16_enabled() == cpu_has_bf16_units()
    monkeypatch.setenv("STS_CPU_BF16", "maybe")
    with pytest.raises(ConfigError, match="STS_CPU_BF16"):
        cpu_bf16_enabled()
    volume, mask, _ = ibsi_patient(shared_data, "STS_005")
    slices = [int(z) for z in np.flatnonzero(mask.reshape(len(mask), -1).sum(axis=1) >= 20)][::8][:3]
    masks, embeddings = {}, {}
    for precision in ("off", "on"):
        monkeypatch.setenv("STS_CPU_BF16", precision)
        assert encoder_precision("cpu") == ("bfloat16" if precision == "on" else "float32")
        segmenter = SliceSegmenter(model=load_litemedsam("cpu"))  # its own memory cache: no reuse across precisions
        embeddings[precision] = torch.cat([segmenter.embed(volume[z]).embedding for z in slices])
        masks[precision] = [segmenter.segment(volume[z], box=(xs.min() - 5, ys.min() - 5, xs.max() + 5, ys.max() + 5))
                            for z in slices for ys, xs in [np.nonzero(mask[z])]]
    relative = float((embeddings["on"] - embeddings["off"]).norm() / embeddings["off"].norm())
    overlaps = [dice(a, b) for a, b in zip(masks["on"], masks["off"], strict=True)]
    print(f"\nbfloat16 vs float32 on STS_005 slices {slices}: embedding {relative:.3f}, mask Dice {overlaps}")
    assert 0 < relative < 0.10 and min(overlaps) > 0.95


def test_wrong_hash_is_refused_naming_path_and_both_hashes():
    wrong = "0" * 64
    with pytest.raises(WeightsError) as info:
        load_litemedsam("cpu", expected_sha256=wrong)
    message = str(info.value)
    assert str(litemedsam_weights_path()) in message and wrong in message and LITEMEDSAM_SHA256 in message
    assert isinstance(info.value, ProjectError)


# ------------------------------------------------------------------------------------ 2-D prompts


def test_ellipse_from_its_box():
    image, truth, box = ellipse_slice(200, 180, centre=(95, 105), axes=(35, 25))
    mask = segment_slice(image, box=box)
    assert mask.dtype == bool and mask.shape == image.shape
    assert dice(mask, truth) > 0.8


@pytest.mark.parametrize(("shape", "dtype"), [((158, 174), np.uint8), ((512, 512), np.float64)])
def test_output_matches_input_grid_and_stays_near_the_box(shape, dtype):
    height, width = shape
    image, truth, box = ellipse_slice(height, width, centre=(width * 0.6, height * 0.4), axes=(width / 8, height / 7))
    if dtype == np.uint8:
        image = np.clip(image / image.max() * 255, 0, 255).astype(np.uint8)
    mask = segment_slice(image.astype(dtype), box=box)
    assert mask.shape == shape and mask.dtype == bool
    assert dice(mask, truth) > 0.8
    x0, y0, x1, y1 = box
    grow_x, grow_y = 0.25 * (x1 - x0), 0.25 * (y1 - y0)
    ys, xs = np.nonzero(mask)
    assert xs.min() >= x0 - grow_x and xs.max() <= x1 + grow_x
    assert ys.min() >= y0 - grow_y and ys.max() <= y1 + grow_y


def test_points_only_find_the_ellipse():
    image, truth, _ = ellipse_slice(200, 180, centre=(95, 105), axes=(35, 25))
    mask = segment_slice(image, points=[(95, 105, True)])
    assert dice(mask, truth) > 0.7


def test_second_prompt_on_a_slice_reuses_the_embedding(model):
    segmenter = SliceSegmenter(model=model)
    image, _truth, box = ellipse_slice(160, 160, centre=(80, 70), axes=(30, 20), seed=1)
    first = segmenter.segment(image, box=box)
    assert segmenter.encoder_calls == 1
    again = segmenter.segment(image.copy(), box=box)
    assert segmenter.encoder_calls == 1
    assert np.array_equal(first, again)
    segmenter.segment(image, box=(40, 40, 120, 100), points=[(80, 70, True)])
    assert segmenter.encoder_calls == 1 and segmenter.cache.hits == 2


@pytest.mark.parametrize("helper_threads", [0, 2])
def test_segment_many_matches_one_by_one(model, helper_threads):
    """Slices of different sizes in one batch (their logits come back in one copy and are split), in
    two batches (the next one prepared on a helper thread while the first is decoded), with the brush
    RLE as ``finish``: the same masks as one ``segment`` call per slice, in order."""
    segmenter = SliceSegmenter(model=model)
    items = [ellipse_slice(150 - 30 * (i % 2), 170 + 20 * (i % 2), centre=(80 + 5 * i, 70), axes=(30, 22), seed=i)
             for i in range(3)]
    images, boxes = [image for image, _, _ in items], [box for _, _, box in items]
    results = segmenter.segment_many(images, boxes, batch_size=2, helper_threads=helper_threads,
                                     finish=lambda mask: mask_to_brush_result(mask, from_name="tumor", to_name="image",
                                                                                label="Tumor"))
    assert segmenter.encoder_calls == 3
    for (image, truth, box), result in zip(items, results, strict=True):
        mask = brush_result_to_mask(result, *image.shape)
        assert np.array_equal(mask, segmenter.segment(image, box=box))
        assert dice(mask, truth) > 0.8
    assert segmenter.encoder_calls == 3
    assert segmenter.segment_many([], [], helper_threads=helper_threads) == []


def test_segment_many_can_leave_the_embedding_cache_alone(model):
    """Pre-annotating whole cases must not evict the slices annotators are prompting on; what is
    cached is still used."""
    image, _, box = ellipse_slice(150, 170, centre=(80, 70), axes=(30, 22), seed=5)
    other, _, other_box = ellipse_slice(140, 160, centre=(70, 75), axes=(25, 20), seed=6)
    segmenter = SliceSegmenter(model=model)
    expected = segmenter.segment(image, box=box)  # cached now
    assert len(segmenter.cache) == 1 and segmenter.encoder_calls == 1
    masks = segmenter.segment_many([image, other], [box, other_box], cache_embeddings=False)
    assert np.array_equal(masks[0], expected)
    assert np.array_equal(masks[1], SliceSegmenter(model=model).segment(other, box=other_box))
    assert len(segmenter.cache) == 1 and segmenter.encoder_calls == 2  # only `other` went through the encoder


def test_the_shrunk_box_average_is_cut_at_the_box_threshold_and_a_lone_box_at_zero(model):
    image, truth, box = ellipse_slice(150, 170, centre=(80, 70), axes=(30, 22), seed=3)
    box = (box[0] - 8, box[1] - 8, box[2] + 8, box[3] + 8)  # a loose box: the cut matters at its margin
    for shrinks, threshold, cut in [((2, 4, 6), -1.0, -1.0), ((2, 4), 1.5, 1.5), ((), -1.0, 0.0)]:
        segmenter = SliceSegmenter(model=model, box_shrinks=shrinks, box_threshold=threshold)
        assert segmenter.box_cut == cut
        box_px = np.asarray(box, np.float32)
        logits, _ = segmenter.decode(segmenter.embed(image), boxes=shrunk_boxes(box_px, shrinks))
        average = logits[:, 0].mean(axis=0)
        expected = segmenter.postprocess(average - cut, box_px)
        assert np.array_equal(segmenter.segment(image, box=box), expected)
        assert np.array_equal(segmenter.segment_many([image], [box])[0], expected)
        if cut:  # the cut moves the outline: a lower one grows the mask, a higher one shrinks it
            at_zero = segmenter.postprocess(average, box_px)
            assert (expected.sum() > at_zero.sum()) == (cut < 0) and dice(expected, truth) > 0.8
    assert SliceSegmenter(model=model).box_cut == DEFAULT_BOX_THRESHOLD


def test_the_cpu_encoder_takes_one_slice_at_a_time(model, monkeypatch):
    """Batches of 8 ran 60 % slower per slice than single slices on 2 CPU cores; a GPU batches."""
    seen: list[int] = []
    embed = model.embed
    monkeypatch.setattr(model, "embed", lambda images: seen.append(len(images)) or embed(images))
    segmenter = SliceSegmenter(model=model)
    images = [ellipse_slice(90, 100, centre=(50, 45), axes=(15, 12), seed=10 + i)[0] for i in range(3)]
    embedded = segmenter.embed_many(images, batch_size=8)
    assert seen == [1, 1, 1] and len({e.key for e in embedded}) == 3


@pytest.mark.parametrize(
    ("box", "points", "problem"),
    [
        ((10, 10, 10, 40), None, "zero width"),
        ((10, 40, 50, 40), None, "zero width or height"),
        ((50, 10, 10, 40), None, "x1 < x0"),
        ((300, 300, 400, 400), None, "outside"),
        ((1, 2, 3), None, "4 finite numbers"),
        ((0, 0, float("nan"), 10), None, "4 finite numbers"),
        (None, None, "a box or at least one positive point"),
        (None, [(20, 20, False)], "a box or at least one positive point"),
        (None, [(250, 20, True)], "outside"),
        ((10, 10, 50, 50), [(20, -5, True)], "outside"),
        ((10, 10, 50, 50), [(20, 20)], "(x, y, is_positive)"),
    ],
)
def test_invalid_prompts_raise_input_error(box, points, problem):
    image = np.zeros((100, 120), np.float32)
    with pytest.raises(InputError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        segment_slice(image, box=box, points=points)


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        (np.zeros((4, 5, 6)), "2-D"),
        (np.zeros(10), "2-D"),
        (np.full((10, 10), np.nan), "NaN"),
        (np.zeros((10, 10), bool), "numeric"),
        (np.ones((10, 10), np.complex64), "complex"),
        (np.full((10, 10), 1e39), "cannot be scaled in float32"),
    ],
)
def test_invalid_images_raise_input_error(image, problem):
    with pytest.raises(InputError, match=problem):
        segment_slice(image, box=(1, 1, 5, 5))


def test_a_slice_far_longer_than_wide_still_has_a_row_in_the_model_frame():
    """2 × 2000 px: 0.26 rows once the long side is 256, which must not round to none."""
    image = np.random.default_rng(0).random((2, 2000)).astype(np.float32)
    mask = segment_slice(image, box=(0, 0, 1999, 1))
    assert mask.shape == image.shape and mask.dtype == bool


def test_box_partly_outside_is_clipped():
    image, truth, _ = ellipse_slice(120, 120, centre=(30, 30), axes=(22, 18))
    mask = segment_slice(image, box=(-20, -20, 60, 55))
    assert mask.shape == image.shape and dice(mask, truth) > 0.8


def test_shrunk_boxes_stay_centred_and_never_invert():
    boxes = shrunk_boxes(np.array([10.0, 20.0, 60.0, 27.0]), [2, 4])  # 50 × 7 px
    assert boxes.shape == (3, 4) and boxes.dtype == np.float32
    assert boxes[0].tolist() == [10, 20, 60, 27]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert np.allclose(centres, centres[0])
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert widths.tolist() == [50, 46, 42]  # the long side shrinks fully
    assert heights.min() >= 4 and np.all(np.diff(heights) <= 0)  # the short one stops at 4 px
    tiny = shrunk_boxes(np.array([5.0, 5.0, 8.0, 8.0]), [2, 4])  # already under 4 px: unchanged
    assert np.array_equal(tiny, np.repeat(tiny[:1], 3, axis=0))
    assert shrunk_boxes(np.array([1, 2, 3, 4]), []).tolist() == [[1, 2, 3, 4]]


def test_tail_percentiles_equal_numpys_to_the_bit():
    """The intensity window a slice is clipped to must not move by one bit: the network input's
    hash keys the embedding cache, and every recorded figure was measured with np.percentile."""
    rng = np.random.default_rng(0)
    for trial in range(400):
        shape = tuple(int(v) for v in rng.integers(2, 600, 2))
        kind = trial % 6
        if kind == 0:
            image = rng.normal(100, 30, shape).astype(np.float32)
        elif kind == 1:
            image = rng.integers(0, 4096, shape).astype(np.uint16)
        elif kind == 2:
            image = rng.integers(-1000, 3000, shape).astype(np.int16)
        elif kind == 3:  # mostly air: heavy ties at the low end
            image = np.where(rng.random(shape) < 0.7, 0, rng.integers(0, 256, shape)).astype(np.uint8)
        elif kind == 4:
            image = (rng.exponential(50, shape) ** 2).astype(np.float64)
        else:
            image = np.full(shape, 7.0, np.float32)
        for percentiles in ((0.5, 99.5), (0, 100), (1, 99), (25, 75)):
            expected = [float(v) for v in np.percentile(image, percentiles)]
            assert tail_percentiles(image, percentiles) == expected, (trial, image.dtype, shape, percentiles)


def _fill_holes_whole_image(mask: np.ndarray) -> np.ndarray:
    """The definition: background components that do not touch the image border are holes."""
    _, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return mask | (~np.isin(labels, border) & (labels > 0))


def _keep_components_whole_image(mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask.copy()
    keep = np.unique(labels[region & mask])
    return np.isin(labels, keep[keep > 0])


def _blobs(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random rings, discs and specks, some cut by the image border: holes, several components."""
    mask = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(0, 6)):
        centre = tuple(int(v) for v in rng.integers(-10, [shape[1] + 10, shape[0] + 10]))
        radius = int(rng.integers(2, 40))
        cv2.circle(mask, centre, radius, 1, -1 if rng.random() < 0.5 else int(rng.integers(1, 6)))
    mask[rng.random(shape) < 0.002] = 1
    return mask.astype(bool)


def test_post_processing_inside_the_masks_window_equals_the_whole_image_definition():
    """``fill_holes`` and ``keep_components`` label only the mask's bounding box (a few % of a
    512×512 slice); they must give what labelling the whole image gives, border-touching masks,
    masks with holes and empty masks included."""
    rng = np.random.default_rng(3)
    for trial in range(300):
        shape = (int(rng.integers(8, 160)), int(rng.integers(8, 160)))
        mask = _blobs(rng, shape)
        filled = fill_holes(mask)
        assert filled.dtype == bool and np.array_equal(filled, _fill_holes_whole_image(mask)), trial
        box = np.array([*rng.uniform(0, shape[1] / 2, 1), *rng.uniform(0, shape[0] / 2, 1),
                        *rng.uniform(shape[1] / 2, shape[1], 1), *rng.uniform(shape[0] / 2, shape[0], 1)])
        region = box_region(box, shape, 0.15)
        kept = keep_components(mask, region)
        assert kept.dtype == bool and np.array_equal(kept, _keep_components_whole_image(mask, region)), trial
    ring = np.zeros((64, 64), np.uint8)
    cv2.circle(ring, (32, 32), 20, 1, 3)
    assert fill_holes(ring.astype(bool)).sum() > ring.sum() + 900  # the disc inside is filled
    assert not fill_holes(np.zeros((5, 5), bool)).any()


def test_the_mirrored_view_outlines_the_object_where_it_lies(model):
    """An ellipse off to the left: decoded on the mirrored slice and mirrored back, the outline is
    on the ellipse, not on its mirror image; the mask prompt travels with its slice."""
    image, truth, box = ellipse_slice(80, 120, centre=(35, 42), axes=(18, 12))
    segmenter = SliceSegmenter(model=model)
    boxes = np.asarray(box, np.float32)[None]
    logits = segmenter.decode_mirrored(image, boxes)
    assert logits.shape == (1, 1, 80, 120) and logits.dtype == np.float32
    assert dice(logits[0, 0] > 0, truth) > 0.85 and dice(logits[0, 0] > 0, truth[:, ::-1]) < 0.1
    frame = segmenter.embed(image).frame
    prompt = mask_prompt_logits(frame.mask_to_model(truth), 8.0)[None]
    prompted = segmenter.decode_mirrored(image, boxes, mask_logits=prompt)
    assert dice(prompted[0, 0] > 0, truth) > 0.85
    assert prompt[0, 0, 0] == pytest.approx(-8.0)  # the caller's prompt is left as it was


def test_prompts_average_in_their_views_when_asked(model):
    """With ``views``, a box prompt's logits (box and shrunk boxes) are averaged with equal weights with
    the same prompts decoded on each view of the slice, and ``segment_many`` gives the same masks: each
    slice then goes through the encoder once per view. Clicks without a box keep one view (the
    mirrored one lost there)."""
    image, truth, box = ellipse_slice(90, 130, centre=(40, 45), axes=(20, 14), seed=4)
    points = [(40, 45, True), (110, 80, False)]
    own = SliceSegmenter(model=model)
    two = SliceSegmenter(model=model, cache=own.cache, views=[MIRRORED])
    three = SliceSegmenter(model=model, cache=own.cache, views="flip_x,transpose")
    assert three.views == (MIRRORED, VIEWS["transpose"])
    box_px = np.asarray(box, np.float32)
    boxes = shrunk_boxes(box_px, own.box_shrinks)
    logits, _ = own.decode(own.embed(image), boxes=boxes)
    mirrored = own.decode_mirrored(image, boxes)
    transposed = own.decode_view(image, boxes, VIEWS["transpose"])
    assert dice(transposed[0, 0] > 0, truth) > 0.85  # mapped back onto the slice's grid
    expected = own.box_mask(0.5 * logits[:, 0].mean(axis=0) + 0.5 * mirrored[:, 0].mean(axis=0), box_px)
    mask = two.segment(image, box=box)
    assert np.array_equal(mask, expected) and dice(mask, truth) > 0.85
    assert np.array_equal(two.segment_many([image], [box])[0], expected)
    averaged = (logits[:, 0].mean(axis=0) + mirrored[:, 0].mean(axis=0) + transposed[:, 0].mean(axis=0)) / 3
    assert np.allclose(three.box_logits_many([image], [box_px])[0], logits[:, 0].mean(axis=0), atol=1e-4)
    expected = own.box_mask(averaged, box_px)
    assert np.array_equal(three.segment(image, box=box), expected)
    assert np.array_equal(three.segment_many([image], [box])[0], expected)
    assert own.encoder_calls == 3 and two.encoder_calls == three.encoder_calls == 0  # three views, one cache
    assert np.array_equal(own.segment(image, box=box), own.box_mask(logits[:, 0].mean(axis=0), box_px))
    assert dice(two.segment(image, box=box, points=points), truth) > 0.85
    assert np.array_equal(three.segment(image, points=points), own.segment(image, points=points))
    with pytest.raises(ConfigError, match="flip_z"):
        SliceSegmenter(model=model, views="flip_x,flip_z")


def test_a_zoomed_view_averages_in_inside_its_window(model):
    """A zoomed view decodes the box on a window around it, enlarged to the network's input; outside
    the window the slice's own logits stand in for it, so the mask is the plain average there.
    ``segment`` and ``segment_many`` agree; clicks travel into the window; a warm-up never embeds it
    (its window follows the box), so each new box costs one encoder pass, a repeated one none."""
    image, truth, box = ellipse_slice(120, 150, centre=(50, 60), axes=(9, 6), seed=5)
    zoom = ZOOM_VIEWS["zoom"]
    own = SliceSegmenter(model=model)
    zoomed = SliceSegmenter(model=model, cache=own.cache, views="rot180,zoom")
    box_px = np.asarray(box, np.float32)
    boxes = shrunk_boxes(box_px, own.box_shrinks)
    logits = own.decode(own.embed(image), boxes=boxes)[0][:, 0].mean(axis=0)
    turned = own.decode_view(image, boxes, VIEWS["rot180"])[:, 0].mean(axis=0)
    window = own.decode_view(image, boxes, zoom)[:, 0].mean(axis=0)
    rows, cols = zoom.window(box_px, image.shape)
    inside = np.zeros(image.shape, bool)
    inside[rows, cols] = True
    assert np.isfinite(window[inside]).all() and np.isnan(window[~inside]).all()
    assert dice(window[inside] > 0, truth[inside]) > 0.85
    expected = own.box_mask((logits + turned + np.where(inside, window, logits)) / 3, box_px)
    calls = own.encoder_calls
    assert np.array_equal(zoomed.segment(image, box=box), expected) and dice(expected, truth) > 0.85
    assert np.array_equal(zoomed.segment_many([image], [box])[0], expected)
    assert zoomed.encoder_calls == 0 and own.encoder_calls == calls == 3  # all three cached by now
    moved = box_px + np.float32(3)
    zoomed.segment(image, box=moved)
    assert zoomed.encoder_calls == 1  # the new box's window; the slice and its turned view are cached
    clicked = zoomed.segment(image, box=box, points=[(50, 60, True), (10, 10, False)])
    assert dice(clicked, truth) > 0.85


def test_warm_views_join_a_box_prompt_only_once_warmed(model):
    """``warm_views`` cost no encoder pass: a box on a slice whose views are not cached is decoded on
    the slice alone (as without them), on each view as it becomes warm, and once all are warm the
    mask is the one a segmenter with the same ``views`` gives, by ``segment``, with clicks, and by
    ``segment_many``. A view in both lists is kept once; a zoomed one is refused (never warm)."""
    image, truth, box = ellipse_slice(100, 120, centre=(48, 55), axes=(16, 11), seed=6)
    points = [(55, 48, True), (5, 5, False)]
    own = SliceSegmenter(model=model)
    warm = SliceSegmenter(model=model, cache=own.cache, warm_views="rot180,antitranspose")
    three = SliceSegmenter(model=model, cache=own.cache, views="rot180,antitranspose")
    assert warm.views == () and warm.warm_views == (VIEWS["rot180"], VIEWS["antitranspose"])
    alone = own.segment(image, box=box)
    assert warm.views_for([image]) == () and np.array_equal(warm.segment(image, box=box), alone)
    assert np.array_equal(warm.segment(image, box=box, points=points), own.segment(image, box=box, points=points))
    assert warm.encoder_calls == 0 and own.encoder_calls == 1

    own.embed(VIEWS["antitranspose"].image(image))  # a warm-up, one view at a time
    assert warm.views_for([image]) == (VIEWS["antitranspose"],)
    own.embed(VIEWS["rot180"].image(image))
    assert warm.views_for([image]) == (VIEWS["rot180"], VIEWS["antitranspose"])  # in the order given
    other = ellipse_slice(100, 120, centre=(50, 60), axes=(12, 9), seed=7)[0]
    assert warm.views_for([image, other]) == ()  # a view counts only where every slice has it
    expected = three.segment(image, box=box)
    assert not np.array_equal(expected, alone) and dice(expected, truth) > 0.85
    assert np.array_equal(warm.segment(image, box=box), expected)
    assert np.array_equal(warm.segment_many([image], [box])[0], expected)
    assert np.array_equal(warm.segment(image, box=box, points=points), three.segment(image, box=box, points=points))
    assert warm.encoder_calls == three.encoder_calls == 0 and own.encoder_calls == 3

    assert SliceSegmenter(model=model, views="rot180", warm_views="rot180,flip_x").warm_views == (MIRRORED,)
    with pytest.raises(ConfigError, match="zoom_rot180 is never warm"):
        SliceSegmenter(model=model, warm_views="rot180,zoom_rot180")


def test_a_click_reaches_as_far_as_the_mistake_it_points_at():
    """A click's disc has ``reach`` × its distance to the nearest pixel of the other kind as radius
    (a negative click inside the mask: to the background; a positive one outside: to the mask),
    and at least the minimum: a click on the edge still changes a few pixels around it."""
    mask = np.zeros((60, 80), bool)
    mask[10:50, 10:50] = True  # a 40 px square
    deep = click_reach_region(mask, check_points([(20, 30, False)], mask.shape), reach=1.5)
    radius = 1.5 * 11  # 11 px from (20, 30) to the background at x = 9
    assert deep[30, 20] and abs(int(deep[30].sum()) - (2 * radius + 1)) <= 2 and not deep[30, 38]
    outside = click_reach_region(mask, check_points([(65, 30, True)], mask.shape), reach=2.0)
    assert outside[30, 65] and outside[30, 35] and not outside[30, 30]  # 16 px to the mask at x = 49: 32 px
    edge = click_reach_region(mask, check_points([(10, 30, False)], mask.shape), reach=DEFAULT_CLICK_REACH)
    assert abs(int(edge[30].sum()) - (2 * DEFAULT_CLICK_MIN_REACH_PX + 1)) <= 2  # on the edge: the minimum
    both = click_reach_region(mask, check_points([(20, 30, False), (65, 30, True)], mask.shape), reach=1.5)
    assert both[30, 20] and both[30, 65] and not both[5, 5]
    # the image's edge is not the mask's: a click beside it measures to the mask (and into a mask
    # that runs off the image, to the background)
    near_border = click_reach_region(mask, check_points([(78, 30, True)], mask.shape), reach=1.0)
    assert near_border[30, 50] and not near_border[30, 45]  # 29 px to the mask at x = 49
    touching = np.zeros((60, 80), bool)
    touching[10:50, :30] = True
    inside_at_border = click_reach_region(touching, check_points([(1, 30, False)], mask.shape), reach=1.0)
    assert inside_at_border[30, 20] and not inside_at_border[30, 35]  # 29 px to the background at x = 30


def test_clicks_with_a_box_change_its_mask_only_within_their_reach(model):
    """LiteMedSAM was trained with boxes only, so a box decoded with a click moves the whole outline;
    the segmenter keeps the click's effect within its reach and the box's own mask elsewhere
    (``click_reach=None``: the decoded outline everywhere, as before)."""
    image, truth, box = ellipse_slice(90, 130, centre=(60, 45), axes=(30, 20), seed=5)
    loose = (box[0] - 6, box[1] - 6, box[2] + 6, box[3] + 6)
    segmenter = SliceSegmenter(model=model)
    box_only = segmenter.segment(image, box=loose)
    assert dice(box_only, truth) > 0.85
    points = [(35, 45, False)]  # inside the ellipse, 4-6 px from its left edge
    mask = segmenter.segment(image, box=loose, points=points)
    near = click_reach_region(box_only, check_points(points, image.shape), segmenter.click_reach)
    assert 0 < near.sum() < 0.2 * near.size and near[45, 35]
    assert np.array_equal(mask & ~near, box_only & ~near)  # untouched beyond the click's reach
    assert not np.array_equal(mask, box_only)  # the click did something where it points
    unlimited = SliceSegmenter(model=model, cache=segmenter.cache, click_reach=None)
    box_px = np.asarray(loose, np.float32)
    boxes = shrunk_boxes(box_px, unlimited.box_shrinks)
    coords, labels = check_points(points, image.shape)
    repeated = (np.repeat(coords[None], len(boxes), 0), np.repeat(labels[None], len(boxes), 0))
    logits, _ = unlimited.decode(unlimited.embed(image), boxes=boxes, points=repeated)
    assert np.array_equal(unlimited.segment(image, box=loose, points=points),
                          unlimited.box_mask(logits[:, 0].mean(axis=0), box_px))
    with pytest.raises(ConfigError, match="click_reach"):
        SliceSegmenter(model=model, click_reach=0)


def test_workers_take_their_prompt_views_from_the_environment(monkeypatch):
    """``$STS_PROMPT_VIEWS``: unset → ``DEFAULT_PROMPT_VIEWS`` with a GPU, none on CPU (each view's
    encoder pass would push a first click past 1.5 s on 2 cores); an on/off word or view names either
    way; an unknown name → a ConfigError naming the variable. ``$STS_MIRROR_PROMPTS`` (an older
    .env) still means the mirrored view when the new variable is unset."""
    monkeypatch.delenv("STS_PROMPT_VIEWS", raising=False)
    monkeypatch.delenv("STS_MIRROR_PROMPTS", raising=False)
    assert DEFAULT_PROMPT_VIEWS and prompt_views_from_env(gpu=True) == parse_views(",".join(DEFAULT_PROMPT_VIEWS))
    assert prompt_views_from_env(gpu=False) == ()
    monkeypatch.setenv("STS_PROMPT_VIEWS", "on")
    assert prompt_views_from_env(gpu=False) == parse_views(",".join(DEFAULT_PROMPT_VIEWS))
    for off in ["0", "off", "none"]:
        monkeypatch.setenv("STS_PROMPT_VIEWS", off)
        assert prompt_views_from_env(gpu=True) == ()
    monkeypatch.setenv("STS_PROMPT_VIEWS", " transpose, flip_x ,transpose")
    assert prompt_views_from_env(gpu=False) == (VIEWS["transpose"], MIRRORED)
    monkeypatch.setenv("STS_PROMPT_VIEWS", "auto")
    with pytest.raises(ConfigError, match="STS_PROMPT_VIEWS"):
        prompt_views_from_env(gpu=True)
    monkeypatch.delenv("STS_PROMPT_VIEWS")
    monkeypatch.setenv("STS_MIRROR_PROMPTS", "on")
    assert prompt_views_from_env(gpu=False) == (MIRRORED,)
    monkeypatch.setenv("STS_MIRROR_PROMPTS", "0")
    assert prompt_views_from_env(gpu=True) == ()
    monkeypatch.setenv("STS_MIRROR_PROMPTS", "maybe")
    with pytest.raises(ConfigError, match="STS_MIRROR_PROMPTS"):
        prompt_views_from_env(gpu=True)


def test_workers_take_their_warm_prompt_views_from_the_environment(monkeypatch):
    """``$STS_WARM_PROMPT_VIEWS``: unset → ``DEFAULT_WARM_PROMPT_VIEWS`` on CPU (where the prompt views
    are off), none with a GPU (whose prompt views hold them anyway); on/off words or whole-slice view
    names; a zoomed or unknown view → a ConfigError naming the variable."""
    monkeypatch.delenv("STS_WARM_PROMPT_VIEWS", raising=False)
    assert DEFAULT_WARM_PROMPT_VIEWS == ("rot180", "antitranspose")
    assert set(DEFAULT_WARM_PROMPT_VIEWS) <= set(DEFAULT_PROMPT_VIEWS)
    assert warm_prompt_views_from_env(gpu=False) == (VIEWS["rot180"], VIEWS["antitranspose"])
    assert warm_prompt_views_from_env(gpu=True) == ()
    monkeypatch.setenv("STS_WARM_PROMPT_VIEWS", "on")
    assert warm_prompt_views_from_env(gpu=True) == (VIEWS["rot180"], VIEWS["antitranspose"])
    for off in ["0", "off", "none"]:
        monkeypatch.setenv("STS_WARM_PROMPT_VIEWS", off)
        assert warm_prompt_views_from_env(gpu=False) == ()
    monkeypatch.setenv("STS_WARM_PROMPT_VIEWS", "flip_x, transpose")
    assert warm_prompt_views_from_env(gpu=False) == (MIRRORED, VIEWS["transpose"])
    for bad, problem in [("rot180,zoom", "zoom is never warm"), ("flip_z", "unknown view")]:
        monkeypatch.setenv("STS_WARM_PROMPT_VIEWS", bad)
        with pytest.raises(ConfigError, match=f"STS_WARM_PROMPT_VIEWS.*{problem}"):
            warm_prompt_views_from_env(gpu=False)


def test_workers_take_their_box_shrinks_from_the_environment(monkeypatch):
    """``$STS_BOX_SHRINKS``: unset → the default; '' or '0' → the box alone (a CPU site's choice);
    anything else that is not pixels ≥ 0 → a ConfigError naming the variable, before any model loads."""
    import workers.segmentation

    monkeypatch.delenv("STS_BOX_SHRINKS", raising=False)
    assert box_shrinks_from_env() == DEFAULT_BOX_SHRINKS_PX
    for raw, expected in [("", ()), ("0", ()), ("3", (3.0,)), (" 1.5, 3 ,", (1.5, 3.0))]:
        monkeypatch.setenv("STS_BOX_SHRINKS", raw)
        assert box_shrinks_from_env() == expected
    for bad in ["-2", "two", "2,nan"]:
        monkeypatch.setenv("STS_BOX_SHRINKS", bad)
        with pytest.raises(ConfigError, match="STS_BOX_SHRINKS"):
            box_shrinks_from_env()
    with pytest.raises(ConfigError, match="--box-shrinks"):  # the benchmarks' options read it the same way
        parse_box_shrinks("2,-4", "--box-shrinks")
    monkeypatch.setenv("STS_BOX_SHRINKS", "")
    monkeypatch.setattr(workers.segmentation, "_DEFAULT_SEGMENTER", None)
    assert workers.segmentation.default_segmenter().box_shrinks == ()
    monkeypatch.setattr(workers.segmentation, "_DEFAULT_SEGMENTER", None)


def test_workers_take_the_propagation_views_from_the_environment(monkeypatch):
    """``$STS_PROPAGATION_VIEWS``: unset or on → the default views; names → those; off → each slice
    decoded as it is (a CPU site saves two encoder passes a slice); the older ``$STS_MIRROR_VIEW`` is
    read when it is unset; anything else → a ConfigError naming the variable."""
    monkeypatch.delenv("STS_PROPAGATION_VIEWS", raising=False)
    monkeypatch.delenv("STS_MIRROR_VIEW", raising=False)
    assert propagation_settings_from_env() == DEFAULT_PROPAGATION and propagation_views(DEFAULT_PROPAGATION)
    for raw in ["1", "on", " True "]:
        monkeypatch.setenv("STS_PROPAGATION_VIEWS", raw)
        assert propagation_settings_from_env() == DEFAULT_PROPAGATION
    for raw in ["0", "off", "none"]:
        monkeypatch.setenv("STS_PROPAGATION_VIEWS", raw)
        assert propagation_settings_from_env() == dataclasses.replace(DEFAULT_PROPAGATION, views="")
    monkeypatch.setenv("STS_PROPAGATION_VIEWS", "flip_x")
    assert propagation_settings_from_env() == dataclasses.replace(DEFAULT_PROPAGATION, views="flip_x")
    for bad in ("flip_z", "zoom"):
        monkeypatch.setenv("STS_PROPAGATION_VIEWS", bad)
        with pytest.raises(ConfigError, match=f"STS_PROPAGATION_VIEWS='{bad}'"):
            propagation_settings_from_env()
    monkeypatch.delenv("STS_PROPAGATION_VIEWS")
    for raw, expected in (("on", DEFAULT_PROPAGATION), ("0", dataclasses.replace(DEFAULT_PROPAGATION, views=""))):
        monkeypatch.setenv("STS_MIRROR_VIEW", raw)
        assert propagation_settings_from_env() == expected
    monkeypatch.setenv("STS_MIRROR_VIEW", "sometimes")
    with pytest.raises(ConfigError, match="STS_MIRROR_VIEW"):
        propagation_settings_from_env()


def test_propagation_names_the_views_it_averages_and_refuses_zoomed_ones():
    """``PropagationSettings.views``: whole-slice views averaged in with equal weights; '' for none."""
    assert [view.name for view in propagation_views(DEFAULT_PROPAGATION)] == ["rot180", "antitranspose"]
    assert propagation_views(dataclasses.replace(DEFAULT_PROPAGATION, views="flip_x")) == (MIRRORED,)
    assert propagation_views(dataclasses.replace(DEFAULT_PROPAGATION, views="")) == ()
    for bad in ("zoom_rot180", "rot45"):
        with pytest.raises(ConfigError, match=r"PropagationSettings\.views"):
            propagation_views(dataclasses.replace(DEFAULT_PROPAGATION, views=bad))


@pytest.mark.slow
def test_shrunk_boxes_pull_a_loose_box_onto_a_real_tumour(shared_data: Path, ibsi_cache: EmbeddingCache):
    """STS_019, every tumour slice, box = mask box + 10 px: LiteMedSAM spills into the margin; the
    averaged shrunk boxes pull it back (mean Dice 0.60 alone, 0.69 with 2,4 px cut at 0, 0.71 with the
    default 2,4,6 px cut at -1; measured)."""
    volume, truth, _ = ibsi_patient(shared_data, PROPAGATION_PATIENT)
    alone, averaged = SliceSegmenter(box_shrinks=(), cache=ibsi_cache), SliceSegmenter(cache=ibsi_cache)
    scores: dict[str, list[float]] = {"alone": [], "averaged": []}
    for z in np.nonzero(truth.reshape(len(truth), -1).sum(1) >= 20)[0]:
        ys, xs = np.nonzero(truth[z])
        box = (xs.min() - 10, ys.min() - 10, xs.max() + 10, ys.max() + 10)
        scores["alone"].append(dice(alone.segment(volume[z], box=box), truth[z]))
        scores["averaged"].append(dice(averaged.segment(volume[z], box=box), truth[z]))
    assert len(scores["alone"]) >= 10
    assert np.mean(scores["averaged"]) > np.mean(scores["alone"]) + 0.03


# ----------------------------------------------------------------------------------- propagation


def test_propagate_rejects_bad_seeds():
    volume = np.zeros((5, 30, 40), np.float32)
    seed = np.zeros((30, 40), bool)
    with pytest.raises(InputError, match="empty"):
        propagate(volume, 2, seed)
    seed[10:20, 10:20] = True
    with pytest.raises(InputError, match="seed_index"):
        propagate(volume, 5, seed)
    with pytest.raises(InputError, match="shape"):
        propagate(volume, 2, seed[:, :30])
    with pytest.raises(InputError, match="3-D"):
        propagate(volume[0], 0, seed)
    with pytest.raises(InputError, match="integer slice index"):
        propagate(volume, 2.7, seed)
    with pytest.raises(InputError, match="integer slice index"):
        propagate(volume, None, seed)
    volume[4, 3, 3] = np.nan
    with pytest.raises(InputError, match=r"slice 4 of the volume.*NaN"):
        propagate(volume, 2, seed)


class RecordingSegmenter(SliceSegmenter):
    """The real segmenter, noting the dense mask prompts ``propagate`` gives the decoder."""

    def __init__(self, model) -> None:
        super().__init__(model=model)
        self.mask_prompts: list = []

    def decode(self, embedded, boxes=None, points=None, mask_logits=None, multimask=False):
        self.mask_prompts.append(mask_logits)
        return super().decode(embedded, boxes=boxes, points=points, mask_logits=mask_logits, multimask=multimask)


def test_propagation_can_give_the_previous_outline_as_a_mask_prompt(model):
    slices = [ellipse_slice(64, 72, (36, 30), (14 - abs(z - 1), 10), seed=z) for z in range(3)]
    volume = np.stack([image for image, _, _ in slices])
    seed = slices[1][1]
    segmenter = RecordingSegmenter(model)
    settings = dataclasses.replace(DEFAULT_PROPAGATION, mask_prompt=8.0, min_likeness=0.0, feature_prior=0.0,
                                   taper_cut=0.0, views="")  # one chain, one view
    result = propagate(volume, 1, seed, segmenter=segmenter, settings=settings)
    assert len(segmenter.mask_prompts) == 2 and all(m is not None for m in segmenter.mask_prompts)
    frame = segmenter.embed(volume[0]).frame
    expected = frame.mask_to_model(seed) >= 0.5  # both neighbours are prompted with the seed's outline
    for prompt in segmenter.mask_prompts:
        assert prompt.shape == (1, 256, 256) and np.abs(prompt).max() == pytest.approx(8.0)
        assert np.array_equal(prompt[0] >= 0, expected)
    assert dice(result[0], slices[0][1]) > 0.8 and dice(result[2], slices[2][1]) > 0.8
    off = RecordingSegmenter(model)
    propagate(volume, 1, seed, segmenter=off, settings=dataclasses.replace(settings, mask_prompt=0.0))
    assert off.mask_prompts == [None, None]


@pytest.mark.slow
def test_propagate_on_a_real_patient(shared_data: Path, ibsi_cache: EmbeddingCache):
    volume, truth, seed_index = ibsi_patient(shared_data, PROPAGATION_PATIENT)
    segmenter = SliceSegmenter(cache=ibsi_cache)
    trace: list = []
    result = propagate(volume, seed_index, truth[seed_index], segmenter=segmenter, trace=trace)
    assert result.shape == volume.shape and result.dtype == bool
    assert np.array_equal(result[seed_index], truth[seed_index])
    assert any(not step.kept for step in trace), "propagation never decided that the tumour had ended"
    naive = naive_chain(segmenter, volume, seed_index, truth[seed_index])
    assert dice(result, truth) > dice(naive, truth) + PROPAGATION_MARGIN_OVER_NAIVE
    # The previous slice's outline as a prior is what keeps the chain from drifting (measured on
    # 12 IBSI patients: mean volume Dice 0.695 without, 0.729 with; on this one 0.63 → 0.70).
    unconstrained = propagate(volume, seed_index, truth[seed_index], segmenter=segmenter,
                              settings=dataclasses.replace(DEFAULT_PROPAGATION, shape_prior=0.0))
    assert dice(result, truth) > dice(unconstrained, truth)


@pytest.mark.slow
def test_the_likeness_test_follows_a_tumour_whose_look_drifts_and_forgives_one_dip(
    shared_data: Path, ibsi_cache: EmbeddingCache
):
    """On STS_023 (tumour on slices 16-59) the seed's mean embeddings alone call the masks "unlike"
    the seed a few slices out (likeness 0.60-0.68 against their 0.7 bar, measured) and stopped
    propagation on 34-40 (volume Dice 0.42). With the seed classifier's view in the likeness it
    reaches 31-46 (0.65); with no patience for a slice that dips below the bar it stops sooner
    (31-44, 0.63). Those figures are for one view of each slice; the mirrored view (not used here)
    steadies the masks, and the mean embeddings alone then reach 17 slices, the default 20."""
    volume, truth, seed_index = ibsi_patient(shared_data, "STS_023")
    segmenter = SliceSegmenter(cache=ibsi_cache)
    one_view = dataclasses.replace(DEFAULT_PROPAGATION, views="")
    trace: list = []
    result = propagate(volume, seed_index, truth[seed_index], segmenter=segmenter, trace=trace, settings=one_view)
    means_only = propagate(volume, seed_index, truth[seed_index], segmenter=segmenter, settings=dataclasses.replace(
        one_view, likeness_classifier_weight=0.0, min_likeness=0.7, likeness_patience=2))
    impatient = propagate(volume, seed_index, truth[seed_index], segmenter=segmenter,
                          settings=dataclasses.replace(one_view, likeness_patience=0))
    reached = result.any(axis=(1, 2))
    assert reached.sum() > means_only.any(axis=(1, 2)).sum() + 5
    assert not (reached & ~truth.any(axis=(1, 2))).any()  # and still not past the tumour's ends
    assert dice(result, truth) > dice(means_only, truth) + 0.1
    confirmed = [step for step in trace if step.unlike and step.kept]  # dipped, then a later slice passed
    assert confirmed and all(result[step.index].any() for step in confirmed)
    assert reached.sum() > impatient.any(axis=(1, 2)).sum()
    assert dice(result, truth) > dice(impatient, truth)


def test_seed_likeness_weighs_the_mean_embeddings_against_the_seed_classifier(model):
    (image0, truth0, _), (image1, truth1, _) = (ellipse_slice(96, 96, (48, 46), (20, 14), seed=z) for z in (0, 1))
    segmenter = SliceSegmenter(model=model)
    seed_embedded, other = segmenter.embed(image0), segmenter.embed(image1)
    classifier = SeedClassifier(seed_embedded, truth0)
    views = {
        weight: SeedLikeness(seed_embedded, truth0, 10.0, classifier, weight).likeness(other, truth1)
        for weight in (0.0, 0.5, 1.0)
    }
    assert SeedLikeness(seed_embedded, truth0, 10.0).likeness(other, truth1) == views[0.0]
    assert views[0.5] == pytest.approx((views[0.0] + views[1.0]) / 2)
    assert views[0.0] > 0.9 and views[1.0] > 0.9  # the tumour on the next slice looks like the seed's
    background = np.zeros_like(truth1)
    background[:20, :30] = True  # noise only, far from the ellipse
    assert SeedLikeness(seed_embedded, truth0, 10.0, classifier, 0.5).likeness(other, background) < 0.2
    assert SeedLikeness(seed_embedded, truth0, 10.0, classifier, 0.5).likeness(other, np.zeros_like(truth1)) == 0.0


def disk_logits(shape: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (4.0 * np.tanh((radius - np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)) / 3.0)).astype(np.float32)


def test_smoothing_along_z_pulls_an_outlier_outline_towards_its_neighbours():
    shape, box = (64, 64), np.array([10.0, 10.0, 54.0, 54.0], np.float32)
    seed = disk_logits(shape, 12) > 0
    radii = {1: 11.0, 2: 16.0, 3: 10.0}  # slice 2 drawn too big; nothing drawn past slice 3
    drawn = {z: (disk_logits(shape, r), box) for z, r in radii.items()}
    out = np.zeros((5, *shape), bool)
    out[0] = seed
    for z, (logits, _) in drawn.items():
        out[z] = logits > 0
    before = out.copy()
    smoothing = dataclasses.replace(DEFAULT_PROPAGATION, taper_cut=0.0)
    recut_outlines(out, drawn, 0, seed, SliceSegmenter(), smoothing)
    assert np.array_equal(out[0], seed) and not out[4].any()  # the seed and the slices past the end stay
    assert before[2].sum() > out[2].sum() > (disk_logits(shape, 11) > 0).sum()  # pulled in, not to nothing
    assert out[3].sum() > before[3].sum()  # its missing outer neighbour counts as itself: only slice 2 pulls
    unchanged = before.copy()
    off = dataclasses.replace(smoothing, neighbour_smoothing=0.0)
    recut_outlines(unchanged, drawn, 0, seed, SliceSegmenter(), off)  # weight 0: each slice keeps its own
    assert np.array_equal(unchanged, before)


def test_taper_cut_rises_from_its_start_to_each_end_of_the_extent():
    settings = dataclasses.replace(DEFAULT_PROPAGATION, taper_cut=4.0, taper_from=0.5)
    cuts = taper_cuts([6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 18], 10, settings)  # 4 below the seed, 8 above
    assert cuts[9] == cuts[11] == cuts[12] == cuts[13] == cuts[14] == 0.0  # up to half way: no cut
    assert cuts[8] == pytest.approx(0.0) and cuts[7] == pytest.approx(2.0) and cuts[6] == pytest.approx(4.0)
    assert cuts[16] == pytest.approx(2.0) and cuts[18] == pytest.approx(4.0)  # each side its own reach
    assert all(c == 0.0 for c in taper_cuts([9, 11], 10, dataclasses.replace(settings, taper_cut=0.0)).values())


@pytest.mark.slow
def test_smoothing_along_z_helps_on_a_real_patient(shared_data: Path, ibsi_cache: EmbeddingCache):
    """On STS_019 (15 tumour slices) volume Dice 0.822 without, 0.828 with smoothing
    (measured); the extent is the chain's either way."""
    volume, truth, seed_index = ibsi_patient(shared_data, PROPAGATION_PATIENT)
    segmenter = SliceSegmenter(cache=ibsi_cache)
    no_taper = dataclasses.replace(DEFAULT_PROPAGATION, taper_cut=0.0, views="")  # smoothing alone
    smoothed = propagate(volume, seed_index, truth[seed_index], segmenter=segmenter, settings=no_taper)
    plain = propagate(volume, seed_index, truth[seed_index], segmenter=segmenter,
                      settings=dataclasses.replace(no_taper, neighbour_smoothing=0.0))
    assert np.array_equal(smoothed.any(axis=(1, 2)), plain.any(axis=(1, 2)))
    assert np.array_equal(smoothed[seed_index], truth[seed_index])
    assert dice(smoothed, truth) > dice(plain, truth) + 0.004


@pytest.mark.slow
def test_the_taper_cut_helps_on_a_real_patient(shared_data: Path, ibsi_cache: EmbeddingCache):
    """On STS_008 (tumour on slices 3-21 of 28) volume Dice 0.785 without, 0.795 with the taper cut
    (measured with one view of each slice, before the mirrored view): the outlines near the tumour's
    ends shrink; the seed and the middle stay."""
    assert DEFAULT_PROPAGATION.taper_cut > 0
    truth, seed_index, tapered, untapered = propagate_with_and_without(
        shared_data, ibsi_cache, "STS_008", taper_cut=0.0)
    reached = np.nonzero(untapered.any(axis=(1, 2)))[0]
    assert np.array_equal(tapered[seed_index], truth[seed_index])
    middle = slice(seed_index - 2, seed_index + 3)  # well inside 70 % of the way out: no cut
    assert np.array_equal(tapered[middle], untapered[middle])
    ends = [reached.min(), reached.max()]
    assert tapered[ends].sum() < untapered[ends].sum()
    assert dice(tapered, truth) > dice(untapered, truth) + 0.005


@pytest.mark.slow
def test_the_other_views_help_on_a_real_patient(shared_data: Path, ibsi_cache: EmbeddingCache):
    """On STS_006 volume Dice 0.836 on the slice alone, 0.864 with the default views (rot180,
    antitranspose) averaged in (0.871 with the mirrored view alone, the default before; measured,
    float32): the views' errors partly cancel. The seed stays the annotator's."""
    assert propagation_views(DEFAULT_PROPAGATION)
    truth, seed_index, both, own = propagate_with_and_without(shared_data, ibsi_cache, "STS_006", views="")
    print(f"STS_006 volume Dice: own view {dice(own, truth):.3f}, with the other views {dice(both, truth):.3f}")
    assert np.array_equal(both[seed_index], truth[seed_index])
    assert dice(both, truth) > dice(own, truth) + 0.01


def test_signed_distance_is_positive_inside_and_ignores_the_image_border():
    mask = np.zeros((7, 9), bool)
    mask[2:5, 3:7] = True
    distance = signed_distance(mask)
    assert (distance[mask] > 0).all() and (distance[~mask] < 0).all()
    assert distance[3, 4] == pytest.approx(2.0) and distance[0, 4] == pytest.approx(-2.0)
    edge = np.zeros((5, 5), bool)
    edge[:, :2] = True  # touches the left border: column 0 is two pixels from the mask's own border
    assert signed_distance(edge)[2, 0] == pytest.approx(2.0)


def naive_chain(segmenter: SliceSegmenter, volume: np.ndarray, seed_index: int, seed: np.ndarray) -> np.ndarray:
    """The baseline: each slice prompted with the previous result's box + 5 px, until a mask is empty."""
    out = np.zeros(volume.shape, bool)
    out[seed_index] = seed
    for step in (1, -1):
        previous, z = seed, seed_index + step
        while 0 <= z < len(volume) and previous.any():
            ys, xs = np.nonzero(previous)
            previous = segmenter.segment(volume[z], box=(xs.min() - 5, ys.min() - 5, xs.max() + 5, ys.max() + 5))
            out[z] = previous
            z += step
    return out


def test_segment_volume_says_no_model_yet():
    with pytest.raises(NoAutomaticModelError, match="no automatic model registered yet"):
        segment_volume(np.zeros((3, 8, 8), np.float32), spacing=(1.0, 1.0, 3.0))


def test_logistic_fit_learns_a_linear_boundary_from_soft_targets():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2000, 3))
    truth = features @ np.array([2.0, -1.0, 0.0]) + 0.5 > 0
    soft = np.where(truth, 0.9, 0.1)  # cell coverages are fractions, not 0/1
    weights = fit_logistic(features, soft)
    predicted = features @ weights[:-1] + weights[-1] > 0
    assert weights.shape == (4,)
    assert (predicted == truth).mean() > 0.97
    assert abs(weights[2]) < 0.2 * abs(weights[0])  # the uninformative feature gets little weight


def test_seed_classifier_marks_the_seed_tumour_on_the_next_slice(model):
    (image0, truth0, _), (image1, truth1, _) = (ellipse_slice(96, 96, (48, 46), (20, 14), seed=z) for z in (0, 1))
    segmenter = SliceSegmenter(model=model)
    seed_embedded = segmenter.embed(image0)
    classifier = SeedClassifier(seed_embedded, truth0)
    logits = classifier.logits(segmenter.embed(image1))
    assert logits.shape == truth1.shape and logits.dtype == np.float32
    inner = cv2.erode(truth1.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    outer = cv2.dilate(truth1.astype(np.uint8), np.ones((15, 15), np.uint8)) == 0
    assert (logits[inner] > 0).mean() > 0.9 and (logits[outer] < 0).mean() > 0.9


@pytest.mark.slow
def test_feature_prior_tightens_propagation_on_a_real_patient(shared_data: Path, ibsi_cache: EmbeddingCache):
    """The seed classifier's pull on the outlines: on STS_050 volume Dice 0.806 without, 0.861 with
    at the default weight (measured; at 0.5 it helped 21 of the 25 IBSI patients, by 0.015 on average
    on the first 12). Both chains stop at the same slices: the likeness test, which uses the classifier
    too, sets the extent."""
    volume, truth, seed_index = ibsi_patient(shared_data, "STS_050")
    segmenter = SliceSegmenter(cache=ibsi_cache)
    # No taper: it may end either extent a slice early; one view, as the figures were measured.
    no_taper = dataclasses.replace(DEFAULT_PROPAGATION, taper_cut=0.0, views="")
    plain = propagate(volume, seed_index, truth[seed_index], segmenter=segmenter,
                      settings=dataclasses.replace(no_taper, feature_prior=0.0))
    guided = propagate(volume, seed_index, truth[seed_index], segmenter=segmenter, settings=no_taper)
    assert DEFAULT_PROPAGATION.feature_prior > 0
    assert np.array_equal(guided.any(axis=(1, 2)), plain.any(axis=(1, 2)))
    assert dice(guided, truth) > dice(plain, truth) + 0.02
