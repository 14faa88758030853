"""The flipped and transposed views of a slice (``workers.slice_views``): an image, its clicks, its
boxes and its mask prompt must land on the same pixels of the view, and logits must come back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from workers.slice_views import MIRRORED, VIEWS, SliceView, parse_views, view_names

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
