"""Flipped and transposed views of a slice, for test-time augmentation of LiteMedSAM's prompts.

TinyViT's image encoder is neither mirror- nor rotation-invariant: the same slice flipped or
transposed gets a different embedding, so a box decoded on each view and mapped back errs in
different places, and the average of the views' logits errs less than any one of them (test-time
augmentation, as nnU-Net mirrors its patches). Each view is its own image, embedded and cached under
its own key; this module only says how the image, the prompts and the logits travel between a slice
and its view, so that ``SliceSegmenter`` (box prompts), ``propagate`` (the mirrored view) and the
warm-up job (``workers.jobs.warm_embeddings``) agree on what a view is.

A zoomed view (``ZOOM_VIEWS``) first crops the slice to a square window around the prompt's box
(``ZOOM_FACTOR`` × the box's longer side), which the network's input then enlarges: a small tumour
gets more of the encoder's 64×64 cells. It depends on the box, so its methods take the box, its
embedding serves only prompts with that box (a warm-up cannot compute it ahead), and its logits come
back as NaN outside the window, where ``average_views`` lets the slice's own logits stand in.

Coordinates are pixel centres (``x`` = column, ``y`` = row), as ``check_box`` gives them. A view crops
first (zoomed views), flips next and transposes last; ``back`` undoes all three in the reverse
order, so any combination is exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from core.errors import ConfigError
from core.settings import FLAG_OFF, FLAG_ON

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

ZOOM_FACTOR = 1.6
"""A zoomed view's window: a square of this many times the box's longer side, centred on the box
(chosen among 1.6 and 2.5 on the first 12 development patients; see ``DEFAULT_PROMPT_VIEWS``)."""

ZOOM_MIN_SIDE_PX = 24
"""A zoomed view's window is at least this wide (a few-pixel box would otherwise fill the network's
input with a handful of pixels blown up)."""


@dataclass(frozen=True)
class SliceView:
    """One of the eight flips and rotations by 90° of a slice (the square's symmetries).

    Attributes:
        name: what ``$STS_PROMPT_VIEWS`` and the benchmarks call it.
        flip_x: mirrored left-right (columns reversed).
        flip_y: flipped top-bottom (rows reversed).
        transpose: rows and columns swapped, after the flips.
        zoom: the slice is first cropped to a square of ``zoom`` × the prompt's box's longer side
            around the box (``window``); None: the whole slice. The methods then need that ``box``.
    """

    name: str
    flip_x: bool = False
    flip_y: bool = False
    transpose: bool = False
    zoom: float | None = None

    def window(self, box: np.ndarray | None, shape: tuple[int, int]) -> tuple[slice, slice]:
        """Rows and columns of the slice this view shows: all of them, or for a zoomed view a square
        of ``zoom`` × the box's longer side (at least ``ZOOM_MIN_SIDE_PX``, at most the slice) centred
        on ``box`` (``(x0, y0, x1, y1)`` pixel centres), moved inside the slice where it would cross
        its edge."""
        height, width = int(shape[0]), int(shape[1])
        if self.zoom is None:
            return slice(0, height), slice(0, width)
        if box is None:
            raise ValueError(f"the view {self.name!r} crops around a box prompt: give the box")
        x0, y0, x1, y1 = (float(v) for v in np.asarray(box, np.float32).reshape(-1)[:4])
        side = max(float(ZOOM_MIN_SIDE_PX), self.zoom * max(x1 - x0 + 1, y1 - y0 + 1))
        spans = []
        for centre, size in (((y0 + y1) / 2, height), ((x0 + x1) / 2, width)):
            extent = min(size, round(side))
            start = min(max(round(centre - extent / 2), 0), size - extent)
            spans.append(slice(start, start + extent))
        return spans[0], spans[1]

    def view_shape(self, shape: tuple[int, int], box: np.ndarray | None = None) -> tuple[int, int]:
        """``(height, width)`` of the view of a slice of ``shape`` (for a zoomed view, around ``box``)."""
        rows, cols = self.window(box, shape)
        height, width = rows.stop - rows.start, cols.stop - cols.start
        return (width, height) if self.transpose else (height, width)

    def image(self, image: np.ndarray, box: np.ndarray | None = None) -> np.ndarray:
        """The view of a ``[height, width]`` slice, or of each plane of ``[..., height, width]`` (a
        contiguous copy: embedding keys hash its bytes); a zoomed view crops around ``box`` first."""
        rows, cols = self.window(box, image.shape[-2:])
        view = image[..., rows, cols][..., ::-1 if self.flip_y else 1, ::-1 if self.flip_x else 1]
        return np.ascontiguousarray(np.swapaxes(view, -1, -2) if self.transpose else view)

    def back(self, logits: ArrayT, box: np.ndarray | None = None, shape: tuple[int, int] | None = None) -> ArrayT:
        """Per-pixel values ``[..., h, w]`` on the view → the same on the slice's grid (a numpy array,
        or a torch tensor where it lies: batched pre-annotation averages the views on the GPU).

        A zoomed view needs its ``box`` and the slice's ``shape``; its values are NaN outside its
        window (``average_views`` takes the slice's own values there)."""
        if isinstance(logits, torch.Tensor):
            out = logits.transpose(-1, -2) if self.transpose else logits
            dims = [dim for dim, flipped in ((-2, self.flip_y), (-1, self.flip_x)) if flipped]
            out = torch.flip(out, dims) if dims else out
        else:
            out = np.swapaxes(logits, -1, -2) if self.transpose else logits
            out = np.ascontiguousarray(out[..., ::-1 if self.flip_y else 1, ::-1 if self.flip_x else 1])
        if self.zoom is None:
            return out
        if shape is None:
            raise ValueError(f"the view {self.name!r} covers part of the slice: give the slice's shape")
        rows, cols = self.window(box, shape)
        full_shape = (*out.shape[:-2], int(shape[0]), int(shape[1]))
        if isinstance(out, torch.Tensor):
            full = torch.full(full_shape, float("nan"), dtype=out.dtype, device=out.device)
        else:
            full = np.full(full_shape, np.nan, dtype=out.dtype)
        full[..., rows, cols] = out
        return full

    def coords(self, coords: np.ndarray, shape: tuple[int, int], box: np.ndarray | None = None) -> np.ndarray:
        """Points ``[..., 2]`` ``(x, y)`` on a slice of ``shape`` → the same points on the view (float32;
        a zoomed view's, around ``box``, may fall outside it)."""
        rows, cols = self.window(box, shape)
        height, width = rows.stop - rows.start, cols.stop - cols.start
        out = np.array(coords, np.float32)
        out[..., 0] -= cols.start
        out[..., 1] -= rows.start
        if self.flip_x:
            out[..., 0] = (width - 1) - out[..., 0]
        if self.flip_y:
            out[..., 1] = (height - 1) - out[..., 1]
        return out[..., ::-1].copy() if self.transpose else out

    def boxes(self, boxes: np.ndarray, shape: tuple[int, int], box: np.ndarray | None = None) -> np.ndarray:
        """Boxes ``[N, 4]`` ``(x0, y0, x1, y1)`` on a slice of ``shape`` → the same boxes on the view
        (a zoomed view's window is ``box``'s, by default the first of ``boxes``)."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if self.zoom is not None and box is None:
            box = boxes[0]
        corners = self.coords(boxes.reshape(-1, 2, 2), shape, box)
        return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1).astype(np.float32)

    def model_logits(self, logits: np.ndarray, resized: tuple[int, int]) -> np.ndarray:
        """SAM mask-prompt logits ``[..., 256, 256]`` of the slice (its resized image at the top left,
        ``resized`` = ``(height, width)``, padding after) → the same for the view, padding after too.
        The padding keeps its value (the bottom-right pixel's: padding unless the slice is square).
        Whole-slice views only (a zoomed view's frame differs from the slice's)."""
        if self.zoom is not None:
            raise ValueError(f"the view {self.name!r} is zoomed: a mask prompt cannot travel with it")
        height, width = resized
        logits = np.asarray(logits, np.float32)
        out = logits.copy()
        if self.transpose:  # the padding moves: start from the padding value everywhere
            out[...] = logits[..., -1:, -1:]
        inner = self.image(logits[..., :height, :width])
        out[..., : inner.shape[-2], : inner.shape[-1]] = inner
        return out


MIRRORED = SliceView("flip_x", flip_x=True)
"""Left-right: limbs are imaged on either side, so this is a slice the model has seen the like of."""

VIEWS: dict[str, SliceView] = {
    view.name: view
    for view in (
        MIRRORED,
        SliceView("flip_y", flip_y=True),
        SliceView("rot180", flip_x=True, flip_y=True),
        SliceView("transpose", transpose=True),
        SliceView("rot90", flip_x=True, transpose=True),  # counter-clockwise, as numpy.rot90
        SliceView("rot270", flip_y=True, transpose=True),
        SliceView("antitranspose", flip_x=True, flip_y=True, transpose=True),
    )
}
"""The views by name: the slice's seven other symmetries of the square (the slice itself is always in)."""

ZOOM_VIEWS: dict[str, SliceView] = {
    name: SliceView(name, flip_x=view.flip_x, flip_y=view.flip_y, transpose=view.transpose, zoom=ZOOM_FACTOR)
    for name, view in (("zoom", SliceView("slice")), *((f"zoom_{name}", view) for name, view in VIEWS.items()))
}
"""Zoomed views by name: ``zoom`` (the window around the box), ``zoom_rot180`` (the window turned) etc."""


def parse_views(raw: str, source: str = "views") -> tuple[SliceView, ...]:
    """Comma-separated view names (``VIEWS``, ``ZOOM_VIEWS``) → views, in order, without repeats; '' or
    'none' → ().

    Raises:
        ConfigError: an unknown name (the message names ``source`` and lists the known ones).
    """
    names = [part.strip().lower() for part in raw.split(",") if part.strip()]
    if names == ["none"]:
        return ()
    known = {**VIEWS, **ZOOM_VIEWS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"{source}: unknown view(s) {', '.join(map(repr, unknown))}; "
                          f"expected a comma-separated list of {', '.join(VIEWS)}, zoom, "
                          f"zoom_<one of those>, or none")
    return tuple(known[name] for name in dict.fromkeys(names))


def view_names(views: Sequence[SliceView]) -> list[str]:
    """Names of ``views`` (for logs, job results and benchmark headers)."""
    return [view.name for view in views]


def views_label(names: Iterable[str]) -> str:
    """'slice + rot180 + ...': what a prompt averages, for benchmark headers and tables."""
    return "slice" + "".join(f" + {name}" for name in names)


def average_views(logits: Sequence[ArrayT]) -> ArrayT:
    """The mean of one prompt's logits ``[H, W]`` on each view of its slice (all on the slice's grid;
    numpy arrays, or tensors on the GPU), with equal weights: what ``segment`` and ``segment_many``
    both cut. Summed in order, then divided, in either library, so that both give the same mask.

    The first is the slice's own; where another is NaN (outside a zoomed view's window) the slice's
    own value stands in for it."""
    if len(logits) == 1:
        return logits[0]
    own = logits[0]
    if isinstance(own, torch.Tensor):
        filled = [own, *(torch.where(torch.isnan(other), own, other) for other in logits[1:])]
        return torch.stack(filled).sum(dim=0) / len(logits)
    filled = [own, *(np.where(np.isnan(other), own, other) for other in logits[1:])]
    return np.stack(filled).sum(axis=0) / len(logits)


def views_from_env(variable: str, default: Sequence[str], on_when_unset: bool) -> tuple[SliceView, ...]:
    """The views a views variable names: view names; an on word for ``default``, an off word (or
    'none') for none; unset or empty, ``default`` if ``on_when_unset``. A bad name → a ``ConfigError``
    naming the variable and its value."""
    raw = os.environ.get(variable, "").strip() or ("on" if on_when_unset else "off")
    if raw.lower() in FLAG_ON:
        return parse_views(",".join(default), f"the default of ${variable}")
    if raw.lower() in FLAG_OFF:
        return ()
    return parse_views(raw, f"${variable}={raw!r}")
