"""Task data and interactive prompts: percent → pixels, and every way a payload can be unusable."""

from __future__ import annotations

import copy

import pytest

from backend.errors import PayloadError, PromptError, TaskDataError
from backend.prompts import (
    MIN_BOX_SIDE_PX,
    Prompt,
    SliceRef,
    keypoint_to_point,
    parse_prompt,
    rectangle_to_box,
    slice_ref,
)

W, H = 200, 100


def rectangle(x=25.0, y=50.0, width=50.0, height=25.0, **extra) -> dict:
    region = {"original_width": W, "original_height": H, "image_rotation": 0, "from_name": "box", "to_name": "image",
              "type": "rectanglelabels",
              "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0, "rectanglelabels": ["Tumor"]}}
    region.update(extra)
    return region


def keypoint(x=50.0, y=50.0, label="Tumor", **extra) -> dict:
    region = {"original_width": W, "original_height": H, "image_rotation": 0, "from_name": "point",
              "to_name": "image", "type": "keypointlabels",
              "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]}, "is_positive": True}
    region.update(extra)
    return region


# ------------------------------------------------------------------------------------ conversion


def test_rectangle_percent_to_pixel_box() -> None:
    # 25 %..75 % of 200 px = edges 50..150: first column 50, last column 149; rows: edges 50..75.
    assert rectangle_to_box({"x": 25, "y": 50, "width": 50, "height": 25}, W, H) == (50.0, 50.0, 149.0, 74.0)


def test_whole_image_rectangle_covers_every_pixel() -> None:
    assert rectangle_to_box({"x": 0, "y": 0, "width": 100, "height": 100}, W, H) == (0.0, 0.0, W - 1.0, H - 1.0)


def test_round_off_just_outside_is_clipped() -> None:
    box = rectangle_to_box({"x": -0.0001, "y": 0, "width": 100.0002, "height": 100}, W, H)
    assert box == (0.0, 0.0, W - 1.0, H - 1.0)


def test_keypoint_is_placed_on_pixel_centres() -> None:
    # 50.25 % of 200 px is edge position 100.5: the centre of column 100.
    assert keypoint_to_point(keypoint(x=50.25, y=50.5), W, H) == (100.0, 50.0, True)
    assert keypoint_to_point(keypoint(x=0, y=0), W, H) == (0.0, 0.0, True)  # the corner clicks the first pixel
    assert keypoint_to_point(keypoint(x=100, y=100), W, H) == (W - 1.0, H - 1.0, True)


@pytest.mark.parametrize(("label", "is_positive", "expected"), [
    ("Tumor", True, True), ("Background", True, False), ("Tumor", False, False), ("Background", False, False),
])
def test_keypoint_polarity(label: str, is_positive: bool, expected: bool) -> None:
    assert keypoint_to_point(keypoint(label=label, is_positive=is_positive), W, H)[2] is expected


# --------------------------------------------------------------------------------------- prompts


def test_no_context_or_empty_result_is_not_interactive() -> None:
    assert parse_prompt(None) is None
    assert parse_prompt({}) is None
    assert parse_prompt({"result": []}) is None


def test_box_and_points_together() -> None:
    prompt = parse_prompt({"result": [rectangle(), keypoint(), keypoint(x=30, label="Background")]})
    assert prompt == Prompt(width=W, height=H, box=(50.0, 50.0, 149.0, 74.0),
                            points=((99.5, 49.5, True), (59.5, 49.5, False)))


def test_last_rectangle_wins() -> None:
    prompt = parse_prompt({"result": [rectangle(x=0), rectangle(x=10)]})
    assert prompt is not None and prompt.box is not None and prompt.box[0] == 20.0


def test_other_controls_are_ignored() -> None:
    brush = {"type": "brushlabels", "from_name": "tumor", "value": {"rle": [1, 2]}}
    prompt = parse_prompt({"result": [brush, keypoint()]})
    assert prompt is not None and prompt.box is None and len(prompt.points) == 1


@pytest.mark.parametrize(("regions", "fragment"), [
    ([rectangle(x=80)], "outside the image"),                       # 80 + 50 = 130 %
    ([rectangle(y=-5)], "outside the image"),
    ([keypoint(x=101)], "outside the image"),
    ([rectangle(width=0)], "zero-size"),
    ([rectangle(height=-3)], "zero-size"),
    ([rectangle(width=0.5)], f"at least {MIN_BOX_SIDE_PX:g} px"),   # 1 px wide
    ([rectangle(image_rotation=90)], "rotated by 90"),
    ([{**rectangle(), "value": {**rectangle()["value"], "rotation": 15}}], "rotated by 15"),
    ([rectangle(original_width=0)], "original_width"),
    ([rectangle(original_height=None)], "original_height"),
    ([{**rectangle(), "value": {"x": "a", "y": 1, "width": 1, "height": 1}}], "not a finite number"),
    ([{**rectangle(), "value": {"x": float("nan"), "y": 1, "width": 1, "height": 1}}], "not a finite number"),
    ([rectangle(), keypoint(original_width=W * 2)], "disagree on the image size"),
    ([keypoint(label="Background")], "only negative"),
    ([{**rectangle(), "value": {"x": 10**400, "y": 1, "width": 1, "height": 1}}], "not a finite number"),
    ([{**rectangle(), "value": {**rectangle()["value"], "rotation": -(10**400)}}], "rotation .* not a number"),
    ([rectangle(original_width=10**400)], "original_width"),
    ([rectangle(original_height=70000)], "up to 65536"),
    ([keypoint(value={"x": 5, "y": 5, "keypointlabels": 5})], "must be a list"),
    ([{"type": "brushlabels", "from_name": "tumor"}], "no prompt in the request"),
    ([rectangle(from_name="other_box")], "no prompt in the request"),
])
def test_unusable_prompts_are_prompt_errors(regions: list, fragment: str) -> None:
    with pytest.raises(PromptError, match=fragment):
        parse_prompt({"result": regions})


def test_rotation_of_a_full_turn_is_no_rotation() -> None:
    assert parse_prompt({"result": [rectangle(image_rotation=360)]}) is not None


@pytest.mark.parametrize("context", ["text", [1, 2], {"result": "x"}, {"result": [1]}])
def test_malformed_context_is_a_payload_error(context) -> None:
    with pytest.raises(PayloadError):
        parse_prompt(context)


def test_prompt_errors_are_422_payload_errors_are_400() -> None:
    assert PromptError.http_status == 422 and PayloadError.http_status == 400 and TaskDataError.http_status == 422


# ----------------------------------------------------------------------------------------- tasks


TASK = {"id": 7, "data": {"case_id": "STS-0001", "modality": "T2", "slice_index": 13, "n_slices": 24,
                          "image": "/data/local-files/?d=x.png"}}


def test_slice_ref_from_task_data() -> None:
    assert slice_ref(TASK) == SliceRef("STS-0001", "T2", 13)


@pytest.mark.parametrize(("change", "error", "fragment"), [
    (lambda d: d.pop("case_id"), TaskDataError, "no case_id"),
    (lambda d: d.update(case_id="../etc"), TaskDataError, "not a case id"),
    (lambda d: d.update(case_id="STS-0001\n"), TaskDataError, "not a case id"),
    (lambda d: d.update(modality="FLAIR"), TaskDataError, "modality 'FLAIR'"),
    (lambda d: d.update(slice_index="13"), TaskDataError, "slice_index '13'"),
    (lambda d: d.update(slice_index=True), TaskDataError, "slice_index True"),
    (lambda d: d.update(slice_index=-1), TaskDataError, "slice_index -1"),
    (lambda d: d.update(slice_index=24), TaskDataError, "outside its 24 slices"),
])
def test_bad_task_data(change, error, fragment: str) -> None:
    task = copy.deepcopy(TASK)
    change(task["data"])
    with pytest.raises(error, match=fragment):
        slice_ref(task)


@pytest.mark.parametrize("task", [None, "x", {"id": 1}, {"id": 1, "data": "x"}])
def test_task_without_data_object_is_a_payload_error(task) -> None:
    with pytest.raises(PayloadError):
        slice_ref(task)


def test_a_rejected_case_id_is_not_echoed() -> None:
    """A case_id that is not a pseudonym may be a patient's name typed by mistake: never repeat it."""
    task = copy.deepcopy(TASK)
    task["data"]["case_id"] = "Jane Doe 1961-02-03"
    with pytest.raises(TaskDataError) as caught:
        slice_ref(task)
    assert "Jane" not in str(caught.value) and "1961" not in str(caught.value)
    assert "19 characters" in str(caught.value)
