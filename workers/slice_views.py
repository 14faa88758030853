"""Flipped and transposed views of a slice, for test-time augmentation of LiteMedSAM's prompts.

TinyViT's image encoder is neither mirror- nor rotation-invariant: the same slice flipped or
transposed gets a different embedding, so a box decoded on each view and mapped back errs in
different places, and the average of the views' logits errs less than any one of them (test-time
augmentation, as nnU-Net mirrors its patches). Each view is its own image, embedded and cached under
its own key; this module only says how the image, the prompts and the logits travel between a slice
and its view, so that ``SliceSegmenter`` (box prompts), ``propagate`` (the mirrored view) and the
warm-up job (``workers.jobs.warm_embeddings``) agree on what a view is.

Coordinates are pixel centres (``x`` = column, ``y`` = row), as ``check_box`` gives them. A view flips
first and transposes last; ``back`` undoes both in the reverse order, so any combination is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from core.errors import ConfigError

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class SliceView:
    """One of the eight flips and rotations by 90° of a slice (the square's symmetries).

    Attributes:
        name: what ``$STS_PROMPT_VIEWS`` and the benchmarks call it.
        flip_x: mirrored left-right (columns reversed).
        flip_y: flipped top-bottom (rows reversed).
        transpose: rows and columns swapped, after the flips.
    """

    name: str
    flip_x: bool = False
    flip_y: bool = False
    transpose: bool = False

    def view_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """``(height, width)`` of the view of a slice of ``shape``."""
        return (shape[1], shape[0]) if self.transpose else (int(shape[0]), int(shape[1]))

    def image(self, image: np.ndarray) -> np.ndarray:
        """The view of a ``[height, width]`` slice, or of each plane of ``[..., height, width]`` (a
        contiguous copy: embedding keys hash its bytes)."""
        view = image[..., ::-1 if self.flip_y else 1, ::-1 if self.flip_x else 1]
        return np.ascontiguousarray(np.swapaxes(view, -1, -2) if self.transpose else view)

    def back(self, logits: ArrayT) -> ArrayT:
        """Per-pixel values ``[..., h, w]`` on the view → the same on the slice's grid (a numpy array,
        or a torch tensor where it lies: batched pre-annotation averages the views on the GPU)."""
        if isinstance(logits, torch.Tensor):
            out = logits.transpose(-1, -2) if self.transpose else logits
            dims = [dim for dim, flipped in ((-2, self.flip_y), (-1, self.flip_x)) if flipped]
            return torch.flip(out, dims) if dims else out
        out = np.swapaxes(logits, -1, -2) if self.transpose else logits
        return np.ascontiguousarray(out[..., ::-1 if self.flip_y else 1, ::-1 if self.flip_x else 1])

    def coords(self, coords: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Points ``[..., 2]`` ``(x, y)`` on a slice of ``shape`` → the same points on the view (float32)."""
        height, width = shape
        out = np.array(coords, np.float32)
        if self.flip_x:
            out[..., 0] = (width - 1) - out[..., 0]
        if self.flip_y:
            out[..., 1] = (height - 1) - out[..., 1]
        return out[..., ::-1].copy() if self.transpose else out

    def boxes(self, boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Boxes ``[N, 4]`` ``(x0, y0, x1, y1)`` on a slice of ``shape`` → the same boxes on the view."""
        corners = self.coords(np.asarray(boxes, np.float32).reshape(-1, 2, 2), shape)
        return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1).astype(np.float32)

    def model_logits(self, logits: np.ndarray, resized: tuple[int, int]) -> np.ndarray:
        """SAM mask-prompt logits ``[..., 256, 256]`` of the slice (its resized image at the top left,
        ``resized`` = ``(height, width)``, padding after) → the same for the view, padding after too.
        The padding keeps its value (the bottom-right pixel's: padding unless the slice is square)."""
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


def parse_views(raw: str, source: str = "views") -> tuple[SliceView, ...]:
    """Comma-separated view names (``VIEWS``) → views, in order, without repeats; '' or 'none' → ().

    Raises:
        ConfigError: an unknown name (the message names ``source`` and lists the known ones).
    """
    names = [part.strip().lower() for part in raw.split(",") if part.strip()]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in VIEWS]
    if unknown:
        raise ConfigError(f"{source}: unknown view(s) {', '.join(map(repr, unknown))}; "
                          f"expected a comma-separated list of {', '.join(VIEWS)}, or none")
    return tuple(VIEWS[name] for name in dict.fromkeys(names))


def view_names(views: Sequence[SliceView]) -> list[str]:
    """Names of ``views`` (for logs, job results and benchmark headers)."""
    return [view.name for view in views]


def views_label(names: Iterable[str]) -> str:
    """'slice + rot180 + ...': what a prompt averages, for benchmark headers and tables."""
    return "slice" + "".join(f" + {name}" for name in names)
