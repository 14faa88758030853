"""The flipped and transposed views of a slice (``workers.slice_views``): an image, its clicks, its
boxes and its mask prompt must land on the same pixels of the view, and logits must come back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from workers.slice_views import (
    MIRRORED,
    VIEWS,
    ZOOM_FACTOR,
    ZOOM_MIN_SIDE_PX,
    ZOOM_VIEWS,
    SliceView,
    parse_views,
    view_names,
)

ALL = [SliceView("slice"), *VIEWS.values()]


@pytest.fixture()
def image() -> np.ndarray:
    """A non-square slice of distinct values, so that any misplaced pixel shows."""
    return np.arange(7 * 11, dtype=np.float32).reshape(7, 11)


def test_there_are_the_eight_symmetries_of_the_square(image: np.ndarray) -> None:
    seen = {view.image(image).tobytes() + bytes(view.view_shape(image.shape)) for view in ALL}
    assert len(seen) == 8
    assert MIRRORED is VIEWS["flip_x"] and np.array_equal(MIRRORED.image(image), image[:, ::-1])
    assert np.array_equal(VIEWS["rot90"].image(image), np.rot90(image))  # names say what they do
    assert np.array_equal(VIEWS["rot180"].image(image), np.rot90(image, 2))
    assert np.array_equal(VIEWS["rot270"].image(image), np.rot90(image, 3))
    assert np.array_equal(VIEWS["transpose"].image(image), image.T)


@pytest.mark.parametrize("view", ALL, ids=lambda v: v.name)
def test_a_view_and_its_prompts_map_the_same_pixels(view: SliceView, image: np.ndarray) -> None:
    seen = view.image(image)
    assert seen.flags.c_contiguous and seen.shape == view.view_shape(image.shape)
    assert np.array_equal(view.back(seen), image)  # logits on the view come back exactly
    stack = np.stack([image, image + 100])
    assert np.array_equal(view.back(view.image(stack)), stack)  # leading axes ride along
    ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
    coords = view.coords(np.stack([xs.ravel(), ys.ravel()], axis=1), image.shape)
    assert coords.dtype == np.float32
    assert np.array_equal(seen[coords[:, 1].astype(int), coords[:, 0].astype(int)], image.ravel())
    box = np.array([[2.0, 1.0, 8.0, 4.0]])
    inside = np.zeros(image.shape, bool)
    inside[1:5, 2:9] = True
    x0, y0, x1, y1 = view.boxes(box, image.shape)[0].astype(int)
    on_view = np.zeros(seen.shape, bool)
    on_view[y0 : y1 + 1, x0 : x1 + 1] = True
    assert np.array_equal(view.image(inside), on_view)


@pytest.mark.parametrize("view", ALL, ids=lambda v: v.name)
def test_a_mask_prompt_travels_with_its_slice(view: SliceView) -> None:
    """SAM's mask prompt holds the resized slice at the top left and padding after: the view's prompt
    holds the view of that region there, and the padding value elsewhere."""
    resized = (5, 9)
    logits = np.full((1, 16, 16), -8.0, np.float32)
    logits[0, :5, :9] = np.arange(45, dtype=np.float32).reshape(5, 9)
    out = view.model_logits(logits, resized)
    inner = view.image(logits[0, :5, :9])
    height, width = inner.shape
    assert np.array_equal(out[0, :height, :width], inner)
    assert np.all(out[0, height:, :] == -8.0) and np.all(out[0, :, width:] == -8.0)
    assert logits[0, 0, 0] == 0.0  # the caller's array is left as it was


def test_view_names_parse_strictly() -> None:
    assert parse_views("flip_x, transpose,flip_x") == (MIRRORED, VIEWS["transpose"])
    assert parse_views("") == () and parse_views("none") == ()
    assert view_names(parse_views("ROT90")) == ["rot90"]
    with pytest.raises(ConfigError, match=r"--views: unknown view\(s\) 'flip_z'.*flip_x"):
        parse_views("flip_x,flip_z", "--views")


@pytest.mark.parametrize("view", list(VIEWS.values()), ids=list(VIEWS))
def test_logits_come_back_alike_from_numpy_and_torch(view: SliceView) -> None:
    """Batched pre-annotation maps the views' logits back on the GPU: the same pixels as numpy's."""
    logits = np.random.default_rng(1).normal(size=(2, 5, 7)).astype(np.float32)
    assert np.array_equal(view.back(torch.from_numpy(logits)).numpy(), view.back(logits))


ZOOMED = list(ZOOM_VIEWS.values())


@pytest.mark.parametrize("view", ZOOMED, ids=lambda v: v.name)
def test_a_zoomed_view_shows_the_window_around_the_box(view: SliceView) -> None:
    """A zoomed view crops a square of ``ZOOM_FACTOR`` × the box's longer side around the box (moved
    inside the slice), then flips and turns it like its whole-slice namesake; its prompts land on the
    same pixels, and its logits come back on the slice's grid, NaN outside the window."""
    image = np.arange(60 * 90, dtype=np.float32).reshape(60, 90)
    box = np.array([30.0, 20.0, 49.0, 29.0])  # 20 × 10 px
    rows, cols = view.window(box, image.shape)
    side = round(ZOOM_FACTOR * 20)
    assert (rows.stop - rows.start, cols.stop - cols.start) == (side, side)
    assert rows.start <= 20 and rows.stop > 29 and cols.start <= 30 and cols.stop > 49  # the box is in
    whole = VIEWS.get(view.name.removeprefix("zoom_"), SliceView("slice"))
    seen = view.image(image, box)
    assert np.array_equal(seen, whole.image(image[rows, cols]))
    assert seen.shape == view.view_shape(image.shape, box)
    back = view.back(seen, box, image.shape)
    inside = np.zeros(image.shape, bool)
    inside[rows, cols] = True
    assert np.array_equal(back[inside], image[inside]) and np.isnan(back[~inside]).all()
    torch_back = view.back(torch.from_numpy(seen), box, image.shape).numpy()
    assert np.array_equal(torch_back, back, equal_nan=True)
    ys, xs = np.mgrid[rows, cols]
    coords = view.coords(np.stack([xs.ravel(), ys.ravel()], axis=1), image.shape, box)
    assert np.array_equal(seen[coords[:, 1].astype(int), coords[:, 0].astype(int)], image[rows, cols].ravel())
    on_view = view.boxes(box[None], image.shape)[0].astype(int)  # the window of the first box by default
    drawn = np.zeros(image.shape, np.float32)
    drawn[20:30, 30:50] = 1
    x0, y0, x1, y1 = on_view
    assert view.image(drawn, box)[y0 : y1 + 1, x0 : x1 + 1].all() and view.image(drawn, box).sum() == 200
    with pytest.raises(ValueError, match="box"):
        view.image(image)
    with pytest.raises(ValueError, match="mask prompt"):
        view.model_logits(np.zeros((1, 16, 16), np.float32), (5, 9))


def test_a_zoomed_window_stays_inside_the_slice_and_is_never_tiny() -> None:
    zoom = ZOOM_VIEWS["zoom"]
    assert zoom.window(np.array([0.0, 0.0, 5.0, 3.0]), (100, 100)) == (slice(0, ZOOM_MIN_SIDE_PX),
                                                                        slice(0, ZOOM_MIN_SIDE_PX))
    rows, cols = zoom.window(np.array([80.0, 10.0, 99.0, 40.0]), (50, 100))  # 20 × 31 px at the right edge
    assert (rows, cols) == (slice(0, 50), slice(100 - round(ZOOM_FACTOR * 31), 100))
    assert SliceView("slice").window(None, (7, 11)) == (slice(0, 7), slice(0, 11))


def test_zoomed_views_parse_by_name() -> None:
    assert parse_views("zoom, zoom_rot180,rot180") == (ZOOM_VIEWS["zoom"], ZOOM_VIEWS["zoom_rot180"], VIEWS["rot180"])
    assert all(view.zoom == ZOOM_FACTOR for view in ZOOM_VIEWS.values()) and len(ZOOM_VIEWS) == 8
    with pytest.raises(ConfigError, match="'zoom_flip_z'"):
        parse_views("zoom_flip_z")
