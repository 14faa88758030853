"""Reading Label Studio payloads: which slice a task is, and what an annotator's prompt means in pixels.

Label Studio gives region coordinates in PERCENT of the image (0-100, origin top-left, ``x`` to the
right, ``y`` down), with the image's size as ``original_width``/``original_height``. The workers
(``workers.segmentation``) take pixel coordinates in which the centre of pixel column ``i`` is
``x = i``, and boxes ``(x0, y0, x1, y1)`` that name the first and last column and row inside the box
(as a mask's bounding box). So, with ``X = x% * width / 100`` the position in pixel *edges*:

* a click at ``X`` is at ``X - 0.5`` (the centre of pixel ``i`` is edge position ``i + 0.5``);
* a rectangle from edge ``X0`` to edge ``X1`` holds the pixels whose centres lie inside it, the first
  at ``X0`` and the last at ``X1 - 1``, so the box is ``(X0, Y0, X1 - 1, Y1 - 1)``.

Only unrotated images and rectangles are understood (``image_rotation`` and ``value.rotation`` 0);
the labeling config disables rotation, and anything else is refused with a ``PromptError``.

>>> rectangle_to_box({"x": 25, "y": 50, "width": 50, "height": 25}, width=200, height=100)
(50.0, 50.0, 149.0, 74.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backend.errors import PayloadError, PromptError, TaskDataError
from core.case_store import MODALITIES, check_patient_id
from core.errors import InputError
from core.labeling import BACKGROUND_LABEL, BOX_CONTROL, POINT_CONTROL

PERCENT_TOLERANCE = 1e-3
"""Coordinates this far outside 0-100 % (float round-off in the browser) are clipped, not refused."""
MIN_BOX_SIDE_PX = 2.0
"""A rectangle narrower or lower than this (pixels) is a mis-click, not a prompt."""
MAX_IMAGE_SIDE_PX = 65536
"""No slice of an MRI series is wider or higher; a larger ``original_width`` is a malformed payload."""

Box = tuple[float, float, float, float]
Point = tuple[float, float, bool]


@dataclass(frozen=True)
class SliceRef:
    """One slice of one case: what a Label Studio task stands for."""

    case_id: str
    modality: str
    slice_index: int


@dataclass(frozen=True)
class Prompt:
    """An interactive prompt in pixels of a ``width × height`` slice (see the module docstring).

    Attributes:
        width: ``original_width`` of the image (columns, ``x``).
        height: ``original_height`` (rows, ``y``).
        box: ``(x0, y0, x1, y1)`` or None.
        points: ``[(x, y, is_positive), ...]``, possibly empty.
    """

    width: int
    height: int
    box: Box | None = None
    points: tuple[Point, ...] = ()


# ----------------------------------------------------------------------------------------- tasks


def slice_ref(task: Any) -> SliceRef:
    """The slice a task stands for, from its ``data`` (written by ``importers.tasks``).

    Raises:
        PayloadError: ``task`` is not an object with a ``data`` object.
        TaskDataError: ``case_id``, ``modality`` or ``slice_index`` is missing or unusable.
    """
    if not isinstance(task, Mapping):
        raise PayloadError(f"a task must be an object, got {type(task).__name__}")
    data = task.get("data")
    task_id = task.get("id", "?")
    if not isinstance(data, Mapping):
        raise PayloadError(f"task {task_id}: no 'data' object")
    case_id = data.get("case_id")
    if not isinstance(case_id, str) or not case_id:
        raise TaskDataError(f"task {task_id}: no case_id in its data (not a task created by import-patient)")
    try:
        check_patient_id(case_id)
    except InputError:  # the rejected value is not echoed: it might be a name typed by mistake
        raise TaskDataError(f"task {task_id}: its case_id ({len(case_id)} characters) is not a case id: "
                            "1-64 letters, digits, '.', '_' or '-'") from None
    modality = data.get("modality")
    if modality not in MODALITIES:
        raise TaskDataError(f"task {task_id}: modality {modality!r} is not one of {', '.join(MODALITIES)}")
    index = data.get("slice_index")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise TaskDataError(f"task {task_id}: slice_index {index!r} is not a non-negative integer")
    n_slices = data.get("n_slices")
    if isinstance(n_slices, int) and not isinstance(n_slices, bool) and index >= n_slices:
        raise TaskDataError(f"task {task_id}: slice_index {index} is outside its {n_slices} slices")
    return SliceRef(case_id, modality, index)


# --------------------------------------------------------------------------------------- prompts


def _finite(raw: Any) -> float | None:
    """``raw`` as a finite float, or None (a bool, a string, NaN, ±inf, or a JSON integer past float's range)."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    try:
        number = float(raw)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _shown(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _number(value: Mapping[str, Any], key: str, what: str) -> float:
    number = _finite(value.get(key))
    if number is None:
        raise PromptError(f"{what}: value.{key} is {_shown(value.get(key))}, not a finite number")
    return number


def _percent(raw: float, what: str, axis: str) -> float:
    if raw < -PERCENT_TOLERANCE or raw > 100 + PERCENT_TOLERANCE:
        raise PromptError(f"{what}: {axis} = {raw:g} % lies outside the image (0-100 %)")
    return min(max(raw, 0.0), 100.0)


def _check_unrotated(rotation: Any, what: str) -> None:
    if rotation in (None, 0):
        return
    degrees = _finite(rotation)
    if degrees is None:
        raise PromptError(f"{what}: rotation {_shown(rotation)} is not a number")
    if abs(math.remainder(degrees, 360.0)) > 1e-6:
        raise PromptError(f"{what}: rotated by {degrees:g}°; only unrotated images and rectangles are supported")


def rectangle_to_box(value: Mapping[str, Any], width: int, height: int) -> Box:
    """A rectangle's ``value`` (percent) as a pixel box ``(x0, y0, x1, y1)`` (see the module docstring).

    Raises:
        PromptError: missing or non-finite coordinates, a rotated rectangle, a rectangle outside the
            image or smaller than ``MIN_BOX_SIDE_PX`` on a side.
    """
    what = "rectangle"
    _check_unrotated(value.get("rotation"), what)
    x, y = _number(value, "x", what), _number(value, "y", what)
    w, h = _number(value, "width", what), _number(value, "height", what)
    if w <= 0 or h <= 0:
        raise PromptError(f"{what}: zero-size or negative box (width {w:g} %, height {h:g} %)")
    left, right = _percent(x, what, "x"), _percent(x + w, what, "x + width")
    top, bottom = _percent(y, what, "y"), _percent(y + h, what, "y + height")
    x0, x1 = left * width / 100.0, right * width / 100.0
    y0, y1 = top * height / 100.0, bottom * height / 100.0
    if x1 - x0 < MIN_BOX_SIDE_PX or y1 - y0 < MIN_BOX_SIDE_PX:
        raise PromptError(
            f"{what}: {x1 - x0:.1f} × {y1 - y0:.1f} px inside the {width}×{height} image; "
            f"at least {MIN_BOX_SIDE_PX:g} px on each side is needed"
        )
    return (x0, y0, x1 - 1.0, y1 - 1.0)


def keypoint_to_point(region: Mapping[str, Any], width: int, height: int) -> Point:
    """A keypoint region as ``(x, y, is_positive)`` in pixels.

    Negative when its label is ``Background`` or Label Studio marked it ``is_positive: false``
    (a click with Alt held); positive otherwise.

    Raises:
        PromptError: missing or non-finite coordinates, or a point outside the image.
    """
    what = "keypoint"
    value = region.get("value")
    if not isinstance(value, Mapping):
        raise PromptError(f"{what}: no 'value' object")
    x = _percent(_number(value, "x", what), what, "x")
    y = _percent(_number(value, "y", what), what, "y")
    labels = value.get("keypointlabels") or []
    if not isinstance(labels, list):
        raise PromptError(f"{what}: value.keypointlabels must be a list of labels")
    negative = BACKGROUND_LABEL in labels or region.get("is_positive") is False
    px = min(max(x * width / 100.0 - 0.5, 0.0), width - 1.0)
    py = min(max(y * height / 100.0 - 0.5, 0.0), height - 1.0)
    return (px, py, not negative)


def _image_size(region: Mapping[str, Any]) -> tuple[int, int]:
    width, height = region.get("original_width"), region.get("original_height")
    for name, v in (("original_width", width), ("original_height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_IMAGE_SIDE_PX:
            raise PromptError(f"{region.get('type', 'region')}: {name} is {_shown(v)}, "
                              f"not a positive integer up to {MAX_IMAGE_SIDE_PX}")
    return int(width), int(height)


def parse_prompt(context: Any) -> Prompt | None:
    """The prompt in ``params.context`` of an interactive ``/predict``, or None when there is none.

    Rectangles come from the ``box`` control, keypoints from ``point``; regions of other controls
    (a brush stroke, a choice) are ignored. With several rectangles the last one counts (the one just
    drawn); all keypoints count.

    Args:
        context: ``params.context`` as Label Studio sends it: ``{"result": [region, ...]}`` or None.

    Returns:
        A ``Prompt`` with a box and/or points, or None if ``context`` holds no result at all
        (a plain "retrieve predictions" call).

    Raises:
        PayloadError: ``context`` or its ``result`` has the wrong type.
        PromptError: regions are present but none is a usable prompt, sizes disagree, a rotated image,
            or a prompt outside the image.
    """
    if context is None:
        return None
    if not isinstance(context, Mapping):
        raise PayloadError(f"params.context must be an object, got {type(context).__name__}")
    regions = context.get("result")
    if regions is None or regions == []:
        return None
    if not isinstance(regions, Sequence) or isinstance(regions, str):
        raise PayloadError(f"params.context.result must be a list, got {type(regions).__name__}")
    box: Box | None = None
    points: list[Point] = []
    size: tuple[int, int] | None = None
    seen: list[str] = []
    for region in regions:
        if not isinstance(region, Mapping):
            raise PayloadError(f"params.context.result items must be objects, got {type(region).__name__}")
        kind, control = region.get("type"), region.get("from_name")
        seen.append(f"{kind}/{control}")
        is_box = kind == "rectanglelabels" and control == BOX_CONTROL
        is_point = kind == "keypointlabels" and control == POINT_CONTROL
        if not (is_box or is_point):
            continue
        region_size = _image_size(region)
        if size is not None and region_size != size:
            raise PromptError(f"prompt regions disagree on the image size: {size} and {region_size} (width, height)")
        size = region_size
        _check_unrotated(region.get("image_rotation"), "image")
        if is_box:
            value = region.get("value")
            if not isinstance(value, Mapping):
                raise PromptError("rectangle: no 'value' object")
            box = rectangle_to_box(value, *size)
        else:
            points.append(keypoint_to_point(region, *size))
    if size is None:
        raise PromptError(
            f"no prompt in the request: expected a rectangle from '{BOX_CONTROL}' or keypoints from "
            f"'{POINT_CONTROL}', got {', '.join(seen)}"
        )
    if box is None and not any(positive for _, _, positive in points):
        raise PromptError("only negative (Background) points: add a Tumor point or draw a box")
    return Prompt(width=size[0], height=size[1], box=box, points=tuple(points))
