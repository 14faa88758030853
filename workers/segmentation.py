"""Prompted 2-D segmentation with LiteMedSAM, slice-to-slice propagation, and automatic segmentation.

Public API (used by the RQ jobs, the ML backend's workers, tests and evaluation; keep the signatures):

- ``segment_slice(image, box=None, points=None)``: one slice ``[y, x]``, a box and/or clicks →
  bool mask ``[y, x]``.
- ``propagate(volume, seed_index, seed_mask)``: one annotated slice of ``volume[z, y, x]`` → a
  mask of the whole tumour, slice by slice outwards from the seed until the tumour ends.
- ``segment_volume(volume, spacing=None)``: automatic segmentation; raises
  ``NoAutomaticModelError`` until a 2.5-D model is trained and registered.
- ``SliceSegmenter``: the model plus an LRU cache of image embeddings, so that a second prompt on
  the same slice costs only the prompt encoder and mask decoder (the encoder is ~95 % of the time).

Coordinates are pixels of the slice as given: ``x`` is the column, ``y`` the row, boxes are
``(x0, y0, x1, y1)`` with ``x0 <= x1`` and ``y0 <= y1`` (a mask's box is ``(min col, min row,
max col, max row)``, as LiteMedSAM was trained). Each function picks CUDA when available, else CPU,
and loads the model once per process (``workers.models.load_litemedsam``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from core.errors import ConfigError, InputError, ProjectError
from core.settings import FLAG_OFF, FLAG_ON, env_flag
from workers.models.litemedsam import LiteMedSAM, ModelFrame, load_litemedsam, mask_prompt_logits, preprocess_slice
from workers.slice_views import MIRRORED, ArrayT, SliceView, parse_views

DEFAULT_EMBEDDING_CACHE_SIZE = 256
"""Image embeddings kept per process (float16, 2 MiB each: 512 MiB at most); a few cases' slices."""

EMBEDDING_CACHE_ENV = "STS_EMBEDDING_CACHE"
"""Folder of the on-disk embedding cache that the workers of one host share (unset: memory only)."""

EMBEDDING_CACHE_GB_ENV = "STS_EMBEDDING_CACHE_GB"
"""Size the on-disk embedding cache is pruned back to, in GB (default ``DEFAULT_EMBEDDING_CACHE_GB``)."""

DEFAULT_EMBEDDING_CACHE_GB = 20.0
"""About 10,000 slices (2 MiB each): the cases a team is working on, not the archive."""

DEFAULT_CPU_THREADS = 2
"""Torch threads on CPU: this project's machines have few cores, shared with other work."""

DEFAULT_BOX_KEEP_MARGIN_PX = 0.15
"""Connected components of a box-prompted mask are kept when they overlap the box grown by this
fraction of its size on each side; the rest are leaks into neighbouring structures."""

DEFAULT_BOX_SHRINKS_PX = (2.0, 4.0, 6.0)
"""A box prompt is also given shrunk by each of these (px, each side) and the logits are averaged.

LiteMedSAM takes a box as the object's bounds, so a box drawn with a margin comes back with a mask
that spills into it (muscle, fat); the shrunk boxes pull the outline in, while averaging keeps what
the tighter boxes alone would cut off where the model is sure. The average is cut at
``DEFAULT_BOX_THRESHOLD`` (−1 logit, not 0), which gives a tight box its border back: whatever pulls
the outline in helps loose boxes and hurts tight ones, and this pair is where neither loses. A box
never shrinks below 4 px a side. It costs one decoder call with four prompts instead of one: on two
CPU cores 187-190 ms instead of 46-48 ms per click (141-143 ms with 2,4 px; p50, cached embedding),
on a GPU a few ms; the encoder does not run again.

Measured with the 25 IBSI patients (mean slice Dice; (a) box + 5 px, (b) loose box), always chosen
on the first 12 and checked on the other 13:
- 2,4 px at 0 against the box alone, off-the-shelf: (a) 0.841 → 0.857, (b) 0.762 → 0.797 on the 12;
  (a) 0.878 → 0.882, (b) 0.833 → 0.855 on the 13.
- 2,4,6 px at −1 against 2,4 px at 0, chosen among {2,4; 2,4,6} × thresholds −1 … +1: off-the-shelf
  (a) 0.857 → 0.868, (b) 0.797 → 0.803 on the 12, (a) 0.882 → 0.890, (b) 0.855 → 0.852 on the 13;
  with each patient's fold decoder of a 5-fold CV (``finetune_cv.py --train-neck --save-models``),
  (a) 0.849 → 0.857, (b) 0.823 → 0.825 on the 12, (a) 0.883 → 0.890, (b) 0.8685 → 0.8686 on the 13;
  the decoder-only recipe's 5-fold CV, all 25: (a) 0.866 → 0.874, (b) 0.844 → 0.845.
Tried and rejected: boxes shrunk towards the first mask's own box (0.005-0.01 below the fixed
shrinks on the 12); a cut chosen by the gap between the first mask and the box (within 0.001: the
gaps of tight and loose boxes overlap too much, medians 6.0 and 7.3 px off-the-shelf); the same
averaging in ``propagate`` (12 patients 0.765 → 0.774 but median 0.824 → 0.812: its outlines became
too small, STS_013 0.906 → 0.854), which keeps a single box."""

BATCHED_DECODER_BF16 = True
"""Box prompts' mask decoder under bfloat16 autocast on CUDA (``segment_many``, ``segment`` with a box
alone), as the encoder always is. Measured on an H200 (``bench_preannotate.py --bf16-decoder``, 922
IBSI tumour slices, box + 5 px): mean Dice 0.8818 → 0.8819, throughput 164 → 179 slices/s."""

DEFAULT_BOX_THRESHOLD = -1.0
"""Logit at which the shrunk-box average is cut (see ``DEFAULT_BOX_SHRINKS_PX``); a box decoded
alone is cut at 0 (probability 0.5), as the model was trained."""

MIRROR_VIEW_ENV = "STS_MIRROR_VIEW"
"""0/false/off: propagation decodes each slice as it is, without its mirrored view
(``PropagationSettings.mirror_weight``), and the workers warm no mirrored embeddings: half the
encoder time on a CPU-only site, for 0.0015-0.0025 of mean volume Dice (see ``DEFAULT_PROPAGATION``;
read by ``propagation_settings_from_env``)."""

PROMPT_VIEWS_ENV = "STS_PROMPT_VIEWS"
"""Which other views of the slice (``workers.slice_views.VIEWS`` and ``ZOOM_VIEWS``) a box prompt,
with or without clicks (``segment``, ``segment_many``), is also decoded on, the views' logits
averaged with the slice's own (``SliceSegmenter.views``): comma-separated view names; 'none' or an
off word (0/off) for the slice alone; an on word for ``DEFAULT_PROMPT_VIEWS``. Unset:
``DEFAULT_PROMPT_VIEWS`` when the worker has a GPU, the slice alone on CPU, where each view's encoder
pass costs 0.7-1.2 s on 2 cores, past the 1.5 s target: once per slice for a whole-slice view (and
warmed ahead), on every new box for a zoomed one (``prompt_views_from_env``). A CPU worker still
averages in the whole-slice views where they are warm (``WARM_PROMPT_VIEWS_ENV``)."""

LEGACY_MIRROR_PROMPTS_ENV = "STS_MIRROR_PROMPTS"
"""Read when ``$STS_PROMPT_VIEWS`` is unset, with its old meaning: on, the mirrored view alone; off,
the slice alone (so that an older ``.env`` keeps doing what it did)."""

DEFAULT_PROMPT_VIEWS = ("rot180", "antitranspose", "zoom", "zoom_rot180", "zoom_antitranspose")
"""The views a box prompt is also decoded on when they are on (a GPU worker, by default): the slice
turned by 180° and the slice flipped about its anti-diagonal, and the same three zoomed on the box
(``workers.slice_views.ZOOM_VIEWS``: a window of 1.6× the box's longer side), six views averaged with
equal weights (the slice's own logits stand in outside the zoomed windows).

The zoomed views came last (two CPU cores, float32, off-the-shelf, mean slice Dice, against the three
whole-slice views): (a) 0.8934 → 0.9035 on the first 6 patients (better on 5, worse on one by 0.0008;
the half of their slices with the smaller tumours 0.8487 → 0.8686), 0.9072 → 0.9178 on the first 5 of
the other 13 (better on all 5); on the first 8 patients (n = 330 slices) (a) 0.8925 → 0.9011 (better
on 6, equal on one, worse on one by 0.001) and (b) 0.8401 → 0.8368 (worse on 7 by up to 0.007): a
tight box gains more than twice what a loose one loses, so they are in. A window of 2.5× gained less on
(a) (0.9065 against 0.9101 for 1.6×, the zoomed view alone with the slice, 3 patients); a zoomed view
instead of the slice (no averaging) gained nothing. The whole-slice views were chosen before, with
equal weights (``benchmarks/eval_views.py``, on an H200, bf16, off-the-shelf, mean slice Dice; boxes as
``eval_segmentation.py`` (a) box + 5 px, (b) loose box). Chosen by greedy forward selection on the
first 12 of the 25 development patients (n = 462 slices), checked on the other 13 (n = 460):

=====================================  ===============  ===============  ===============
views                                  12 (a) / (b)     13 (a) / (b)     all 25 (a) / (b)
=====================================  ===============  ===============  ===============
the slice alone                        0.8684 / 0.8002  0.8953 / 0.8505  0.8818 / 0.8253
+ flip_x (the default until now)       0.8742 / 0.8028  0.8973 / 0.8536  0.8857 / 0.8281
+ rot180 + antitranspose (then)       0.8828 / 0.8132  0.9041 / 0.8579  0.8934 / 0.8355
+ rot90 + flip_y as well (greedy end)  0.8847 / 0.8139  0.9048 / 0.8586  0.8947 / 0.8362
all eight views                        0.8843 / 0.8115  0.9055 / 0.8570  0.8949 / 0.8342
=====================================  ===============  ===============  ===============

The greedy's last two steps gained 0.0013 on the 12 and 0.0007 on the 13 for two more encoder
passes per slice, so the default stops after two. Each of the seven views helps alone, the turns
and the flip about the anti-diagonal most on (a). On two CPU cores in float32 on the original
images the three views give 0.8788 / 0.8257 → 0.8907 / 0.8358 on all 25 (the 13: 0.9001 / 0.8574);
with them, a cut at −0.5 instead of ``DEFAULT_BOX_THRESHOLD`` traded (a) −0.007 for (b) +0.009, a
wash on both halves, so the cut stays. Views upside down show anatomy no annotator sees,
but they are only averaged in at test time, and the encoder's errors on them differ from its errors
on the slice as it is.
Each whole-slice view is one more image-encoder pass on a slice's first click (about 20 ms on an H200,
0.7-1.2 s on two CPU cores) and one more decoder call on every click; the three zoomed views are one
more encoder call (of three crops) on every new box, which no warm-up can do ahead, while clicks added
to the same box reuse them. ``STS_PROMPT_VIEWS=rot180,antitranspose`` keeps the whole-slice views only.
Clicks without a box keep one view."""

WARM_PROMPT_VIEWS_ENV = "STS_WARM_PROMPT_VIEWS"
"""Whole-slice views a box prompt is decoded on only where they are warm: when the view's embedding of
the slice is already cached, because ``workers.jobs.warm_embeddings`` ran it through the encoder
ahead of the annotator (``SliceSegmenter.warm_views``). Comma-separated view names; an off word or
'none' for none; an on word for ``DEFAULT_WARM_PROMPT_VIEWS``. Unset: ``DEFAULT_WARM_PROMPT_VIEWS`` on
CPU, none with a GPU (its ``DEFAULT_PROMPT_VIEWS`` already hold them, warm or not). A zoomed view is
refused: its window follows the box, so it is never warm (``warm_prompt_views_from_env``)."""

DEFAULT_WARM_PROMPT_VIEWS = ("rot180", "antitranspose")
"""The GPU default's whole-slice views, used on CPU where warm. A CPU worker cannot afford their encoder
passes on a click (0.7-1.2 s each on 2 cores, past the 1.5 s target), but a warm-up can: a slice
embedded ahead in all three views answers a box with three decoder calls and no encoder pass, and
gets the three views' quality (2 CPU cores, float32, all 25 development patients, mean slice Dice:
(a) 0.8788 → 0.8907, (b) 0.8257 → 0.8358; see ``DEFAULT_PROMPT_VIEWS``). A slice not warmed yet is
decoded on the views that are warm (each helps alone on (a)), or alone: never an encoder pass more."""

BOX_SHRINKS_ENV = "STS_BOX_SHRINKS"
"""Comma-separated px overriding ``DEFAULT_BOX_SHRINKS_PX`` in the workers (``box_shrinks_from_env``);
empty or ``0`` decodes the box alone (cut at 0): a CPU-only site trades about 0.01 on tight boxes and
0.02-0.05 on loose ones for ~200 ms per click. Other shrinks keep ``DEFAULT_BOX_THRESHOLD``."""

DEFAULT_POINT_BOX_HALF_SIDES_PX = (12.0, 20.0, 30.0, 45.0)
"""Points only: candidate half-sides (px, in the slice) of boxes centred on the positive clicks."""

DEFAULT_CLICK_REACH = 1.5
"""Clicks given with a box change the box's mask only within this many times the click's distance
from the box mask's edge (at least ``DEFAULT_CLICK_MIN_REACH_PX``; ``SliceSegmenter.click_reach``).

LiteMedSAM was trained with boxes only: decoded with the box, a click moves the outline everywhere,
mostly for the worse. Simulated corrections on the 25 development patients (loose box of part (b),
one click in the middle of the largest error, 90 % of them negative: the model over-segments loose
boxes), mean slice Dice, n = 922: the box 0.823, box + click decoded as they are 0.718 (worse on all
25 patients), the click's effect kept within 10 px 0.832, within 1.5 × its distance from the edge
0.840 (better on all 25). The reach was chosen among 5-45 px and 1-3 × on the first 12 patients
(0.798 → 0.817) and checked on the other 13 (0.849 → 0.864). ``benchmarks/eval_segmentation.py
--parts bf`` (all 25, its own jitter): the box 0.8257, one click 0.8430, two clicks 0.8481."""

DEFAULT_CLICK_MIN_REACH_PX = 5.0
"""The smallest reach of a click given with a box (px of the slice); see ``DEFAULT_CLICK_REACH``."""


class NoAutomaticModelError(ProjectError):
    """No automatic (prompt-free) segmentation model is registered yet."""


Box = tuple[float, float, float, float]
Point = tuple[float, float, bool]


# --------------------------------------------------------------------------------------- validation


def as_slice(image: Any) -> np.ndarray:
    """A numeric 2-D ``[y, x]`` array; RGB(A) images ``[y, x, 3|4]`` become grey (channel mean).

    Raises:
        InputError: not 2-D, empty, not numeric, or containing NaN/inf.
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[..., :3].mean(axis=2) if array.shape[2] > 1 else array[..., 0]
    if array.ndim != 2:
        raise InputError(f"a slice must be a 2-D [y, x] array, got shape {array.shape}")
    if array.size == 0 or min(array.shape) < 2:
        raise InputError(f"a slice must be at least 2×2 pixels, got shape {array.shape}")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"a slice must be numeric, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError("the slice contains NaN or infinite values")
    return array


def check_box(box: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """``(x0, y0, x1, y1)`` clipped to the image, as float32; None stays None.

    Raises:
        InputError: not four finite numbers, reversed corners, zero width or height, or no overlap
            with the ``shape = (height, width)`` image.
    """
    if box is None:
        return None
    try:
        values = np.asarray(box, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InputError(f"box must be 4 numbers (x0, y0, x1, y1), got {box!r}") from exc
    if values.size != 4 or not np.isfinite(values).all():
        raise InputError(f"box must be 4 finite numbers (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = values
    if x1 < x0 or y1 < y0:
        raise InputError(f"box {tuple(values.tolist())} has x1 < x0 or y1 < y0: expected (x0, y0, x1, y1)")
    if x1 == x0 or y1 == y0:
        raise InputError(f"box {tuple(values.tolist())} has zero width or height")
    height, width = shape
    if x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
        raise InputError(f"box {tuple(values.tolist())} lies outside the {width}×{height} (x × y) image")
    clipped = np.array([max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1)], np.float32)
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise InputError(f"box {tuple(values.tolist())} has zero size inside the {width}×{height} image")
    return clipped


def check_points(points: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """``[(x, y, is_positive), ...]`` → coordinates ``[P, 2]`` float32 and labels ``[P]`` (1/0).

    Raises:
        InputError: malformed entries, or a point outside the ``(height, width)`` image (a click is
            not clipped: moved, it would mean something else).
    """
    if points is None:
        return None
    points = list(points)
    if not points:
        return None
    coords, labels = [], []
    height, width = shape
    for point in points:
        try:
            x, y, positive = point
            x, y = float(x), float(y)
        except (TypeError, ValueError) as exc:
            raise InputError(f"a point must be (x, y, is_positive), got {point!r}") from exc
        if not (np.isfinite(x) and np.isfinite(y)):
            raise InputError(f"point {point!r} is not finite")
        if not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
            raise InputError(f"point ({x}, {y}) lies outside the {width}×{height} (x × y) image")
        coords.append((min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0)))
        labels.append(1 if bool(positive) else 0)
    return np.asarray(coords, np.float32), np.asarray(labels, np.int64)


# ----------------------------------------------------------------------------------- post-processing


def occupied_window(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice] | None:
    """Rows and columns of ``mask``'s bounding box grown by ``pad`` (clipped to the image); None when empty.

    The post-processing below works inside this window: everything outside it is background, so on a
    512×512 slice with a 100 px tumour it labels 3 % of the pixels (5.8 → 0.6 ms a slice, which
    was the host's share capping whole-case pre-annotation near 170 slices/s on one helper thread).
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    return (slice(max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, height)),
            slice(max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, width)))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions not connected to the image border become foreground (a tumour has no holes
    in a slice: necrosis and cysts are part of the GTV).

    Only the mask's bounding box can hold a hole: it is labelled with a one-pixel background frame
    around it, which every background pixel outside the box reaches, as the image border does.
    """
    window = occupied_window(mask)
    if window is None:
        return mask.copy()
    inside = np.pad(~mask[window], 1, constant_values=True).astype(np.uint8)
    n, labels = cv2.connectedComponents(inside, connectivity=4)
    if n <= 2:  # the background around the mask is one component: no hole
        return mask.copy()
    out = mask.copy()
    out[window] |= (labels != labels[0, 0])[1:-1, 1:-1]
    return out


def keep_components(mask: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Only the 8-connected components of ``mask`` that overlap ``region`` (bool, same shape)."""
    window = occupied_window(mask)
    if window is None:
        return mask.copy()
    n, labels = cv2.connectedComponents(mask[window].astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask.copy()
    keep = np.zeros(n, bool)
    keep[labels[region[window] & mask[window]]] = True
    keep[0] = False
    out = np.zeros_like(mask)
    out[window] = keep[labels]
    return out


def box_region(box: np.ndarray, shape: tuple[int, int], margin: float) -> np.ndarray:
    """Bool ``[y, x]`` mask of ``box`` grown by ``margin`` × its size on each side."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    region = np.zeros(shape, bool)
    ys = slice(max(0, int(np.floor(y0 - dy))), int(np.ceil(y1 + dy)) + 1)
    xs = slice(max(0, int(np.floor(x0 - dx))), int(np.ceil(x1 + dx)) + 1)
    region[ys, xs] = True
    return region


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """``(x0, y0, x1, y1)`` of a bool mask (min/max column and row), None when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


# ------------------------------------------------------------------------------------ the segmenter


@dataclass(frozen=True)
class EmbeddedSlice:
    """A slice's image embedding ``[1, 256, 64, 64]`` and where the slice lies in the model frame."""

    embedding: torch.Tensor
    frame: ModelFrame
    key: str


class EmbeddingCache:
    """A bounded LRU map from an embedding key to a float16 embedding ``[1, 256, 64, 64]`` (CPU).

    Float16 halves the memory (2 MiB per slice); the decoder always sees the value read back from the
    cache, so a first and a second prompt on a slice give identical masks.
    """

    def __init__(self, max_entries: int = DEFAULT_EMBEDDING_CACHE_SIZE) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, embedding: torch.Tensor) -> torch.Tensor:
        """Store (as float16 on CPU) and return the stored value."""
        stored = embedding.detach().to("cpu", torch.float16).reshape(1, *embedding.shape[-3:]).contiguous()
        with self._lock:
            self._items[key] = stored
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return stored

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class DiskEmbeddingCache(EmbeddingCache):
    """An ``EmbeddingCache`` that also keeps every embedding on disk, for evaluation and fine-tuning.

    Files are ``<root>/<model version>/<key[:2]>/<key>.npz`` (float16 ``embedding [256, 64, 64]``),
    content-addressed by the same key as the memory cache, so a changed preprocessing or model can
    never serve a stale embedding. Writes are atomic (a reader never sees half a file).
    """

    def __init__(self, root: str | os.PathLike[str], model_version: str, max_entries: int = 1024) -> None:
        super().__init__(max_entries)
        self.root = Path(root).expanduser() / model_version

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str) -> torch.Tensor | None:
        value = super().get(key)
        if value is not None:
            return value
        path = self.path_for(key)
        try:
            with np.load(path) as data:
                embedding = torch.from_numpy(data["embedding"])
            os.utime(path)  # recently used: pruned last
        except (OSError, ValueError, KeyError):  # absent, pruned meanwhile, or unreadable: compute again
            return None
        self.misses -= 1
        self.hits += 1
        return super().put(key, embedding)

    def __contains__(self, key: str) -> bool:
        return super().__contains__(key) or self.path_for(key).is_file()

    def prune(self, max_bytes: int) -> int:
        """Delete the least recently used files until the cache holds at most ``max_bytes``; returns
        how many were deleted. Other workers may read meanwhile: a file gone under them is a miss."""
        files = []
        for path in self.root.glob("*/*.npz"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        removed = 0
        for _, size, path in sorted(files):
            if total <= max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed

    def put(self, key: str, embedding: torch.Tensor) -> torch.Tensor:
        stored = super().put(key, embedding)
        path = self.path_for(key)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npz", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    np.savez(handle, embedding=stored[0].numpy())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return stored


def embedding_key(model_input: np.ndarray, model_version: str) -> str:
    """SHA-1 of the preprocessed 256×256 network input and the weights' version."""
    digest = hashlib.sha1(model_version.encode())
    digest.update(np.ascontiguousarray(model_input, dtype=np.float32).tobytes())
    return digest.hexdigest()


class SliceSegmenter:
    """LiteMedSAM plus an embedding cache: what a worker keeps resident to answer prompts fast.

    >>> seg = SliceSegmenter()                     # doctest: +SKIP
    >>> mask = seg.segment(image, box=(40, 30, 90, 80))   # doctest: +SKIP

    Attributes:
        views: the other views of the slice (``workers.slice_views``) a box prompt is decoded on as
            well, their logits averaged with the slice's own with equal weights (``decode_view``;
            empty: the slice alone; see ``DEFAULT_PROMPT_VIEWS``). Each view is embedded and cached
            on its own. ``propagate`` has its own (``PropagationSettings.mirror_weight``).
        warm_views: whole-slice views averaged in as ``views`` are, but only where warm: on a slice
            whose view is already in the cache (``views_for``), so they never cost an encoder pass
            (CPU workers; see ``DEFAULT_WARM_PROMPT_VIEWS``).
        encoder_calls: slices run through the image encoder so far (cache misses), for tests/metrics.
    """

    def __init__(
        self,
        model: LiteMedSAM | None = None,
        device: torch.device | str | None = None,
        cache_size: int = DEFAULT_EMBEDDING_CACHE_SIZE,
        cache: EmbeddingCache | None = None,
        box_keep_margin: float | None = DEFAULT_BOX_KEEP_MARGIN_PX,
        box_shrinks: Sequence[float] = DEFAULT_BOX_SHRINKS_PX,
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        views: str | Sequence[SliceView | str] = (),
        click_reach: float | None = DEFAULT_CLICK_REACH,
        warm_views: str | Sequence[SliceView | str] = (),
    ) -> None:
        self._model = model
        self._device = torch.device(device) if device is not None else None
        self.cache = cache if cache is not None else EmbeddingCache(cache_size)
        self.box_keep_margin = box_keep_margin
        self.box_shrinks = tuple(float(px) for px in box_shrinks)
        self.box_threshold = float(box_threshold)
        self.views = _view_tuple(views, "SliceSegmenter views")
        self.warm_views = tuple(view for view in _view_tuple(warm_views, "SliceSegmenter warm_views")
                                if view not in self.views)
        refuse_zoomed(self.warm_views, "SliceSegmenter warm_views")
        if click_reach is not None and click_reach <= 0:
            raise ConfigError(f"click_reach {click_reach}: expected a positive factor, or None for no limit")
        self.click_reach = None if click_reach is None else float(click_reach)
        self.encoder_calls = 0

    @property
    def box_cut(self) -> float:
        """The logit a box prompt's mask is cut at: ``box_threshold`` for the shrunk-box average, 0 for
        a box decoded alone."""
        return self.box_threshold if self.box_shrinks else 0.0

    @property
    def model(self) -> LiteMedSAM:
        """The model, loaded on first use (so constructing a segmenter is cheap)."""
        if self._model is None:
            if (self._device is None or self._device.type == "cpu") and torch.get_num_threads() > DEFAULT_CPU_THREADS:
                torch.set_num_threads(DEFAULT_CPU_THREADS)
            self._model = load_litemedsam(self._device)
        return self._model

    # ------------------------------------------------------------------------------- embeddings

    def prepare(self, image: Any) -> tuple[np.ndarray, np.ndarray, ModelFrame, str]:
        """Validated slice, its network input ``[256, 256]``, its frame and its embedding key."""
        array = as_slice(image)
        model_input, frame = preprocess_slice(array)
        return array, model_input, frame, embedding_key(model_input, self.model.encoder_version)

    def embed(self, image: Any) -> EmbeddedSlice:
        """The slice's image embedding, from the cache or computed (and cached)."""
        return self.embed_many([image])[0]

    def embed_many(self, images: Sequence[Any], batch_size: int = 8) -> list[EmbeddedSlice]:
        """Embeddings of several slices; the cache misses go through the encoder in batches on a GPU.

        On CPU one slice at a time: TinyViT took 1056 ms per slice alone against 1703 ms per slice
        in batches of 8 (2 cores, in-process p50), its activations outgrowing the caches.
        """
        prepared = [self.prepare(image)[1:] for image in images]
        found = self._embeddings([(model_input, key) for model_input, _, key in prepared], batch_size)
        return [EmbeddedSlice(found[key], frame, key) for _, frame, key in prepared]

    def views_for(self, arrays: Sequence[np.ndarray]) -> tuple[SliceView, ...]:
        """The views a box prompt on ``arrays`` is decoded on: ``views``, then each of ``warm_views``
        whose embedding of every one of ``arrays`` is already cached (a key's check, no encoder pass)."""
        warm = tuple(view for view in self.warm_views
                     if all(self.prepare(view.image(array))[3] in self.cache for array in arrays))
        return self.views + warm

    def _embeddings(self, inputs: Sequence[tuple[np.ndarray, str]], batch_size: int,
                    on_device: bool = False, store: bool = True) -> dict[str, torch.Tensor]:
        """Key → embedding ``[1, 256, 64, 64]`` of each ``(network input, key)``: from the cache, else
        through the encoder ``batch_size`` at a time (1 on CPU), and cached unless ``store`` is False.

        The host holds the cache; ``on_device`` returns the embeddings on the model's device (float32,
        rounded through float16 as the cache stores them, so the masks are the ones a cached
        embedding gives): batched pre-annotation then decodes the encoder's output where it lies
        instead of copying 2 MiB per slice to the host and back, and copies nothing at all when it
        does not ``store`` them.
        """
        if not (store or on_device):
            raise ValueError("embeddings neither stored nor kept on the device would be lost")
        if self.model.device.type == "cpu":
            batch_size = 1
        device = self.model.device
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, np.ndarray] = {}
        for model_input, key in inputs:
            if key in found or key in missing:
                continue
            cached = self.cache.get(key)
            if cached is not None:
                found[key] = cached.to(device, non_blocking=True).float() if on_device else cached
            else:
                missing[key] = model_input
        keys = list(missing)
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            batch = torch.from_numpy(np.stack([missing[k] for k in chunk]))[:, None]
            with torch.inference_mode():
                embeddings = self.model.embed(batch).to(torch.float16)
                # one device-to-host copy per batch: a copy per slice waited on the GPU each time and
                # held a batch of 64 to 218 slices/s on an H200, against 486 for the encoder alone
                on_host = embeddings.cpu() if store else None
            self.encoder_calls += len(chunk)
            for index, key in enumerate(chunk):
                if on_host is not None:  # a copy: not a view that keeps the whole batch alive
                    stored = self.cache.put(key, on_host[index].clone())
                found[key] = embeddings[index : index + 1].float() if on_device else stored
        return found

    # --------------------------------------------------------------------------------- decoding

    def decode(
        self,
        embedded: EmbeddedSlice,
        boxes: np.ndarray | None = None,
        points: tuple[np.ndarray, np.ndarray] | None = None,
        mask_logits: np.ndarray | None = None,
        multimask: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits on the slice's own grid for N prompts on one embedded slice.

        Args:
            embedded: from ``embed``.
            boxes: ``[N, 4]`` boxes in slice pixels (already validated).
            points: coordinates ``[N, P, 2]`` in slice pixels and labels ``[N, P]`` (1/0).
            mask_logits: ``[N, 256, 256]`` model-frame logits of a previous prediction (SAM's mask prompt).
            multimask: SAM's three candidates per prompt instead of one.

        Returns:
            Logits ``[N, C, height, width]`` (float32; > 0 is inside) and predicted IoUs ``[N, C]``.
        """
        frame = embedded.frame
        device = self.model.device
        box_t = None if boxes is None else torch.from_numpy(frame.to_model(boxes).reshape(-1, 4)).to(device)
        point_t = None
        if points is not None:
            coords, labels = points
            point_t = (
                torch.from_numpy(frame.to_model(coords).reshape(len(coords), -1, 2)).to(device),
                torch.as_tensor(labels, dtype=torch.int64, device=device).reshape(len(coords), -1),
            )
        mask_t = None if mask_logits is None else torch.from_numpy(np.asarray(mask_logits, np.float32))[:, None]
        with torch.inference_mode():
            logits, iou = self.model.decode(
                embedded.embedding,
                boxes=box_t,
                points=point_t,
                mask_logits=None if mask_t is None else mask_t.to(device),
                multimask=multimask,
            )
            image_logits = frame.logits_to_image(logits)
        return image_logits.cpu().numpy(), iou.cpu().numpy()

    def decode_view(
        self,
        image: Any,
        boxes: np.ndarray,
        view: SliceView,
        mask_logits: np.ndarray | None = None,
        points: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Logits ``[N, 1, height, width]`` of ``boxes`` decoded on a view of ``image`` (flipped or
        transposed, see ``workers.slice_views``) and mapped back onto ``image``'s grid: another view
        of the slice for test-time augmentation. A zoomed view crops around the first of ``boxes`` (the
        box itself; the shrunk boxes lie inside it) and is NaN outside its window.

        The view has its own embedding (cached under its own key). ``mask_logits`` (model frame, as
        in ``decode``) and ``points`` (as in ``decode``) travel with their slice.
        """
        array = as_slice(image)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        box = boxes[0] if view.zoom is not None else None  # the box itself; the shrunk ones lie inside it
        if mask_logits is not None:
            frame = ModelFrame.for_shape(*array.shape)
            mask_logits = view.model_logits(mask_logits, (frame.resized_height, frame.resized_width))
        embedded = self.embed(view.image(array, box))
        if points is not None:
            points = (view.coords(points[0], array.shape, box), points[1])
        logits, _ = self.decode(embedded, boxes=view.boxes(boxes, array.shape, box), points=points,
                                mask_logits=mask_logits)
        return view.back(logits, box, array.shape)

    def decode_mirrored(
        self,
        image: Any,
        boxes: np.ndarray,
        mask_logits: np.ndarray | None = None,
        points: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """``decode_view`` on the slice mirrored left-right, the second view ``propagate`` averages in."""
        return self.decode_view(image, boxes, MIRRORED, mask_logits=mask_logits, points=points)

    def with_views(self, image: np.ndarray, logits: np.ndarray, boxes: np.ndarray,
                   points: tuple[np.ndarray, np.ndarray] | None = None,
                   views: Sequence[SliceView] | None = None) -> np.ndarray:
        """``[H, W]``: ``logits`` (``[N, H, W]``, one per box) averaged over the boxes, then averaged
        with the same prompts decoded on each of ``views`` (default ``views_for`` the slice;
        unchanged without views)."""
        views = self.views_for([image]) if views is None else views
        per_view = [logits.mean(axis=0)]
        per_view += [self.decode_view(image, boxes, view, points=points)[:, 0].mean(axis=0) for view in views]
        return average_views(per_view)

    def box_mask(self, average_logits: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The mask of a box prompt from the logits averaged over the box and its shrunk boxes: cut at
        ``box_cut``, then ``postprocess`` (what ``segment`` and ``segment_many`` both return)."""
        return self.postprocess(average_logits - self.box_cut, box)

    def postprocess(self, logits: np.ndarray, box: np.ndarray | None) -> np.ndarray:
        """Threshold at 0 (probability 0.5), then ``clean``."""
        return self.clean(logits > 0, box)

    def clean(self, mask: np.ndarray, box: np.ndarray | None) -> np.ndarray:
        """Drop components away from the box, fill holes."""
        if not mask.any():
            return mask
        if box is not None and self.box_keep_margin is not None:
            mask = keep_components(mask, box_region(box, mask.shape, self.box_keep_margin))
        return fill_holes(mask)

    # --------------------------------------------------------------------------------- prompts

    def segment(self, image: Any, box: Any = None, points: Any = None) -> np.ndarray:
        """Bool mask ``[y, x]`` of the object the box and/or clicks point at (see ``segment_slice``)."""
        array = as_slice(image)
        shape = array.shape
        box_px = check_box(box, shape)
        point_px = check_points(points, shape)
        if box_px is None:
            if point_px is None or not point_px[1].any():
                raise InputError("a box or at least one positive point (x, y, True) is needed")
            return self._segment_points(array, point_px)
        if point_px is None:  # a box alone: the batched path (views averaged and cut on the device)
            return self.segment_many([array], [box_px], helper_threads=0)[0]
        views = self.views_for([array])
        if views:  # a first prompt on the slice: all its views through the encoder in one call
            self.embed_many([array, *(view.image(array, box_px) for view in views)], batch_size=1 + len(views))
        embedded = self.embed(array)
        boxes = shrunk_boxes(box_px, self.box_shrinks)
        points = (
            np.repeat(point_px[0][None], len(boxes), axis=0), np.repeat(point_px[1][None], len(boxes), axis=0)
        )
        logits, _ = self.decode(embedded, boxes=boxes, points=points)
        clicked = self.with_views(array, logits[:, 0], boxes, points, views=views)
        if self.click_reach is None:
            return self.box_mask(clicked, box_px)
        box_logits, _ = self.decode(embedded, boxes=boxes)
        box_only = self.with_views(array, box_logits[:, 0], boxes, views=views)
        near = click_reach_region(self.box_mask(box_only, box_px), point_px, self.click_reach)
        return self.box_mask(np.where(near, clicked, box_only), box_px)

    def _segment_points(self, image: np.ndarray, points: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Clicks only: LiteMedSAM was trained with boxes, so boxes of several sizes are tried around the
        positive clicks (with the clicks) and the one the model rates best is kept.

        No other views here: blending the mirrored one into the chosen box lost on one click at the
        tumour's innermost pixel (25 patients, mean slice Dice 0.538 → 0.526, 15 patients worse)."""
        coords, labels = points
        embedded = self.embed(image)
        boxes = point_boxes(coords[labels == 1], image.shape, DEFAULT_POINT_BOX_HALF_SIDES_PX)
        n = len(boxes)
        logits, iou = self.decode(
            embedded, boxes=boxes, points=(np.repeat(coords[None], n, 0), np.repeat(labels[None], n, 0))
        )
        best = int(np.argmax(iou[:, 0]))
        return self.postprocess(logits[best, 0], boxes[best])

    def segment_many(self, images: Sequence[Any], boxes: Sequence[Any], batch_size: int = 64,
                     finish: Callable[[np.ndarray], Any] | None = None,
                     helper_threads: int | None = None, cache_embeddings: bool = True) -> list[Any]:
        """Box-prompted masks for many slices at once (GPU pre-annotation).

        The masks are the ones ``segment`` gives one slice at a time. The encoder and the decoder
        run on ``batch_size`` slices per call (with ``views``, each view's slices are a batch of their
        own: one more encoder pass per view; ``warm_views`` join where every slice has them cached);
        the views' logits are averaged and cut where they were computed, so one byte per pixel comes
        back to the host. On a GPU the host's share (the
        slices' network inputs and keys, the post-processing and ``finish``, e.g. the brush RLE) runs
        on helper threads, overlapped with the GPU's work on the next or previous batch.

        Args:
            finish: applied to each mask on a helper thread; its results are returned instead.
            helper_threads: default 2 on a GPU, 0 on CPU (the encoder takes every core there, helpers
                would only compete with it; 0 runs the host's share in turn on the calling thread).
            cache_embeddings: False leaves the cache as it is (cached embeddings are still used): whole
                cases pre-annotated would only evict the slices annotators are prompting on, and on a
                GPU each stored embedding costs a 2 MiB copy to the host.
        """
        if len(images) != len(boxes):
            raise InputError(f"segment_many needs one box per image, got {len(images)} images, {len(boxes)} boxes")
        arrays = [as_slice(image) for image in images]
        checked = [check_box(box, array.shape) for array, box in zip(arrays, boxes, strict=True)]
        for index, box in enumerate(checked):
            if box is None:
                raise InputError(f"segment_many: image {index} has no box")
        chunks = [range(start, min(start + batch_size, len(arrays))) for start in range(0, len(arrays), batch_size)]
        views = (None, *self.views_for(arrays))

        def prepare(chunk: range) -> list[list[tuple[np.ndarray, ModelFrame, str]]]:
            return [[self.prepare(arrays[i] if view is None else view.image(arrays[i], checked[i]))[1:]
                     for i in chunk] for view in views]

        def post(chunk: range, masks: list[np.ndarray]) -> list[Any]:
            cleaned = [self.clean(mask, checked[i]) for i, mask in zip(chunk, masks, strict=True)]
            return cleaned if finish is None else [finish(mask) for mask in cleaned]

        if helper_threads is None:
            helper_threads = 2 if self.model.device.type == "cuda" else 0
        with ThreadPoolExecutor(helper_threads) if helper_threads > 0 else _InlineExecutor() as helpers:
            if not chunks:
                return []
            prepared = helpers.submit(prepare, chunks[0])
            finished = []
            copying: tuple[range, _HostCopy] | None = None
            for number, chunk in enumerate(chunks):
                inputs = prepared.result()
                if number + 1 < len(chunks):
                    prepared = helpers.submit(prepare, chunks[number + 1])
                # every view's misses in batches together: a single slice's views in one encoder call
                embeddings = self._embeddings([(model_input, key) for view_inputs in inputs
                                               for model_input, _, key in view_inputs], batch_size,
                                              on_device=True, store=cache_embeddings)
                per_view = [self._box_logits_on_device([arrays[i] for i in chunk], [checked[i] for i in chunk],
                                                       view_inputs, embeddings, view)
                            for view, view_inputs in zip(views, inputs, strict=True)]
                masks = [average_views(list(logits)) - self.box_cut > 0 for logits in zip(*per_view, strict=True)]
                # the last batch's masks are waited for only now, with this batch queued behind them:
                # the GPU works on while the host takes them over
                if copying is not None:
                    finished.append(helpers.submit(post, copying[0], copying[1].result()))
                copying = (chunk, _HostCopy(masks))
            if copying is not None:
                finished.append(helpers.submit(post, copying[0], copying[1].result()))
            return [item for future in finished for item in future.result()]

    def box_logits_many(self, arrays: Sequence[np.ndarray], boxes: Sequence[np.ndarray],
                        batch_size: int = 64, view: SliceView | None = None) -> list[np.ndarray]:
        """Each slice's logits ``[H, W]`` averaged over its box (``check_box``'s pixel centres) and
        shrunk boxes, in one decoder call; with ``view``, decoded on that view of each slice and
        mapped back onto the slice's grid (``segment_many`` averages the views; the benchmarks keep
        them apart to choose among them)."""
        inputs = [self.prepare(array if view is None else view.image(array, box))[1:]
                  for array, box in zip(arrays, boxes, strict=True)]
        embeddings = self._embeddings([(model_input, key) for model_input, _, key in inputs], batch_size,
                                      on_device=True)
        return _to_host(self._box_logits_on_device(arrays, boxes, inputs, embeddings, view))

    def _box_logits_on_device(self, arrays: Sequence[np.ndarray], boxes: Sequence[np.ndarray],
                              inputs: Sequence[tuple[np.ndarray, ModelFrame, str]],
                              embeddings: dict[str, torch.Tensor], view: SliceView | None) -> list[torch.Tensor]:
        """``box_logits_many`` left on the model's device; ``inputs`` are ``prepare``'s network input,
        frame and key of each slice's view, ``embeddings`` hold their keys' (``_embeddings``).

        On CUDA the decoder runs under bfloat16 autocast (``BATCHED_DECODER_BF16``)."""
        device = self.model.device
        per_slice = 1 + len(self.box_shrinks)
        stacked = torch.cat([embeddings[key] for _, _, key in inputs])
        on_view = boxes if view is None else [view.boxes(box, array.shape, box)[0]
                                              for array, box in zip(arrays, boxes, strict=True)]
        model_boxes = np.concatenate([frame.to_model(shrunk_boxes(box, self.box_shrinks))
                                      for (_, frame, _), box in zip(inputs, on_view, strict=True)])
        bf16 = BATCHED_DECODER_BF16 and device.type == "cuda"
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            # non-blocking: a blocking copy would wait for all the GPU's queued work (the encoder)
            logits, _ = self.model.decode_many(
                stacked.repeat_interleave(per_slice, dim=0), torch.from_numpy(model_boxes).to(device, non_blocking=True)
            )
        with torch.inference_mode():
            logits = logits.float().reshape(len(boxes), per_slice, *logits.shape[-2:]).mean(dim=1, keepdim=True)
            on_grid: list[torch.Tensor | None] = [None] * len(inputs)
            by_frame: dict[ModelFrame, list[int]] = {}
            for index, (_, frame, _) in enumerate(inputs):
                by_frame.setdefault(frame, []).append(index)
            for frame, indices in by_frame.items():  # one resize per slice size: a case's slices share one
                # a run of indices is a slice of the batch; a list would be copied to the device, waiting
                same = logits[indices[0] : indices[-1] + 1] if indices[-1] - indices[0] + 1 == len(indices) else \
                    logits[torch.tensor(indices).to(device, non_blocking=True)]
                resized = frame.logits_to_image(same)[:, 0]
                for index, item in zip(indices, resized, strict=True):
                    on_grid[index] = item if view is None else view.back(item, boxes[index], arrays[index].shape)
        return on_grid


class _InlineExecutor:
    """``ThreadPoolExecutor``'s ``submit`` run at once on the calling thread (CPU workers)."""

    def __enter__(self) -> _InlineExecutor:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future


def _to_host(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Tensors of different shapes → numpy arrays, in ONE device-to-host copy (a copy per tensor
    waits on the GPU each time); on CPU the same path, so that the tests run it."""
    return _HostCopy(tensors).result()


class _HostCopy:
    """Tensors of different shapes on their way to the host as numpy arrays, in ONE copy.

    On CUDA the copy is queued (into page-locked memory, behind the work that computes the tensors)
    and ``result`` waits for it alone, so the caller can queue more GPU work first; elsewhere it is
    done at once.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.shapes = [tuple(item.shape) for item in tensors]
        self.event: torch.cuda.Event | None = None
        if not tensors:
            self.flat = torch.empty(0)
            return
        flat = torch.cat([item.reshape(-1) for item in tensors])
        if flat.device.type == "cuda":
            self.flat = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.flat.copy_(flat, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.flat = flat.cpu()

    def result(self) -> list[np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        flat = self.flat.numpy()
        out, start = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape))
            out.append(flat[start : start + size].reshape(shape))
            start += size
        return out


def refuse_zoomed(views: tuple[SliceView, ...], source: str) -> tuple[SliceView, ...]:
    """``views``, if none is zoomed: a zoomed view's window follows the box, so no warm-up can embed it.

    Raises:
        ConfigError: naming ``source`` and the zoomed views.
    """
    zoomed = [view.name for view in views if view.zoom is not None]
    if zoomed:
        raise ConfigError(f"{source}: {', '.join(zoomed)} is never warm (a zoomed view's window follows "
                          f"the box); name it in ${PROMPT_VIEWS_ENV} instead")
    return views


def _view_tuple(views: str | Sequence[SliceView | str], source: str) -> tuple[SliceView, ...]:
    """Views given as ``SliceView``s and/or names (one string may hold several, comma-separated), in
    order, each once; an unknown name is a ``ConfigError`` naming ``source``."""
    if isinstance(views, str):
        views = (views,)
    return tuple(dict.fromkeys(
        found for view in views
        for found in ((view,) if isinstance(view, SliceView) else parse_views(view, source))
    ))


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


def blend_views(own: np.ndarray, mirrored: np.ndarray, weight: float) -> np.ndarray:
    """Logits of a slice's own view and of its mirrored view (already mirrored back onto the slice's
    grid), weighted ``1 - weight`` and ``weight``: the one test-time augmentation rule that
    propagation (``PropagationSettings.mirror_weight``) uses; box prompts average any number of views
    with equal weights (``average_views``)."""
    return (1.0 - weight) * own + weight * mirrored


def shrunk_boxes(box: np.ndarray, shrinks_px: Sequence[float], min_side_px: float = 4.0) -> np.ndarray:
    """``[1 + len(shrinks_px), 4]``: ``box`` and ``box`` shrunk by each amount on every side (float32).

    A side already shorter than ``min_side_px`` plus twice the shrink is shrunk only that far, so a
    small tumour's box keeps its centre and never inverts (see ``DEFAULT_BOX_SHRINKS_PX``).

    >>> shrunk_boxes(np.array([10, 10, 30, 16]), [2, 4]).tolist()
    [[10.0, 10.0, 30.0, 16.0], [12.0, 11.0, 28.0, 15.0], [14.0, 11.0, 26.0, 15.0]]
    """
    box = np.asarray(box, np.float32).reshape(4)
    width, height = box[2] - box[0], box[3] - box[1]
    boxes = [box]
    for shrink in shrinks_px:
        dx = min(float(shrink), max(0.0, (width - min_side_px) / 2))
        dy = min(float(shrink), max(0.0, (height - min_side_px) / 2))
        boxes.append(box + np.array([dx, dy, -dx, -dy], np.float32))
    return np.stack(boxes).astype(np.float32)


def click_reach_region(box_mask: np.ndarray, points: tuple[np.ndarray, np.ndarray], reach: float,
                       min_reach_px: float = DEFAULT_CLICK_MIN_REACH_PX) -> np.ndarray:
    """Bool ``[y, x]``: the discs within which clicks given with a box may change the box's mask.

    A click's disc has a radius of ``reach`` × its distance to the nearest pixel of the other kind
    (a negative click inside the mask: to the background; a positive one outside: to the mask), at
    least ``min_reach_px``. An annotator clicks in the middle of a mistake, so that distance is about
    half the mistake's width, and the disc covers the mistake without reaching across the tumour.
    """
    coords, labels = points
    height, width = box_mask.shape
    inside = cv2.distanceTransform(np.pad(box_mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    outside = cv2.distanceTransform(np.pad(~box_mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    region = np.zeros((height, width), np.uint8)
    for (x, y), label in zip(coords, labels, strict=True):
        col, row = round(float(x)), round(float(y))
        distance = float(outside[row, col] if label else inside[row, col])
        radius = max(min_reach_px, reach * distance)
        cv2.circle(region, (col, row), round(radius), 1, thickness=-1)
    return region.astype(bool)


def point_boxes(positive_xy: np.ndarray, shape: tuple[int, int], half_sides: Sequence[float]) -> np.ndarray:
    """Candidate boxes ``[K, 4]``: the positive clicks' bounding box grown by each half-side, clipped."""
    height, width = shape
    x0, y0 = positive_xy.min(axis=0)
    x1, y1 = positive_xy.max(axis=0)
    boxes = []
    for half in half_sides:
        box = [max(0.0, x0 - half), max(0.0, y0 - half), min(width - 1.0, x1 + half), min(height - 1.0, y1 + half)]
        boxes.append(box)
    return np.asarray(boxes, np.float32)


# ----------------------------------------------------------------------------------- propagation


@dataclass(frozen=True)
class PropagationSettings:
    """How ``propagate`` prompts each next slice and decides that the tumour has ended.

    Attributes:
        box_margin_px: the previous slice's mask box is grown by this much (px) to prompt the next.
        max_shift_px: the new mask is cut to the previous mask dilated by this much: between slices
            3-5 mm apart a tumour's outline moves a few pixels, a leak into a neighbour moves more.
        min_area_px: stop when the new mask is smaller than this.
        min_seed_area_fraction: ... or smaller than this fraction of the seed's area.
        min_overlap: stop when less than this fraction of the (uncut) new mask lies inside the
            previous mask dilated by ``max_shift_px`` (the model jumped to another structure).
        max_growth: stop when the new mask is more than this times the previous one's area.
        min_likeness: stop when the new mask's likeness to the seed tumour is below this: the model
            outlined something that does not look like the tumour the annotator drew. The likeness
            (``SeedLikeness``) is a weighted mean of two fractions of the mask's embedding cells: those
            closer (cosine) to the seed tumour's mean embedding than to its surroundings' (a ring of
            ``ring_px`` around the seed mask), and those the seed classifier (``SeedClassifier``) calls
            tumour.
        ring_px: width of that ring.
        likeness_classifier_weight: the seed classifier's weight in the likeness (0: the mean
            embeddings alone, 1: the classifier alone).
        shape_prior: weight (in logits) of the previous slice's outline: ``shape_prior ×
            tanh(d / shape_prior_px)`` is added to the model's logits, ``d`` being the signed distance
            (px, positive inside) to the previous mask's border. Between slices 3-5 mm apart a tumour's
            outline changes little, while the model alone, prompted by a box only, drifts a little each
            slice and the drift compounds; the prior pulls ambiguous pixels towards the last outline
            and leaves confident ones to the model. 0 turns it off.
        shape_prior_px: distance (px) over which that pull saturates.
        mask_threshold: the logit at which each propagated slice's outline is cut (0: probability 0.5).
        neighbour_smoothing: once the chain has run, each propagated slice's logits are mixed with
            the mean of its two neighbours' (this weight for the neighbours, the rest for its own;
            a slice beyond the extent counts as itself, the seed as its mask's signed distance) and
            cut again. The chain drew each outline from the slice before it only; this lets the slice
            after it (outwards, where the tumour is usually smaller) have its say too. 0 turns it off.
        taper_cut: logits taken off the outermost slice's outline in the outline chain (the second
            chain, which runs over the extent the first one found), rising linearly from 0 at
            ``taper_from`` of the way from the seed to each end of that extent. A chain draws each
            outline from the one before it, so where the tumour tapers towards its ends the outlines
            keep their size (predicted area 1.32× the truth on the outer fifth); the cut lets them
            shrink there, and the next slice's box with them, and leaves the middle alone. 0 turns
            it off.
        taper_from: where the taper cut starts, as a fraction of the way from the seed to the end.
        likeness_patience: how many slices in a row may fail ``min_likeness`` alone (their mask is
            otherwise fine) before propagation stops; they are kept when a later slice passes again.
            The likeness of one slice is noisy, so a single dip is not yet the tumour's end.
        mask_prompt: when > 0, the previous slice's mask also goes to the model as SAM's dense mask
            prompt, as logits of ± this magnitude (0 turns it off). Off by default: the off-the-shelf
            decoder ignores it, and a decoder fine-tuned with it (``make_samples(mask_prompts=True)``)
            propagated worse in cross-validation (0.788 → 0.733 mean volume Dice): it copies the
            outline where the tumour tapers.
        feature_prior: weight of a per-patient classifier (``SeedClassifier``: a logistic regression on
            the seed slice's image-embedding cells) whose clipped logits are added to the model's on
            each slice, pulling the outline towards tissue that looks like the annotated tumour and
            away from the muscle and fat it leaks into. The classifier also makes every mask look
            like the tumour, which blinds the likeness test, so the extent (which slices) comes from a
            chain without it and the outlines from a chain with it. 0 turns it off.
        mirror_weight: weight of the logits decoded on the slice mirrored left-right
            (``SliceSegmenter.decode_mirrored``) in each slice's logits, the rest being the slice's
            own. The image encoder is not mirror-invariant, so the mirrored slice is a second view whose
            errors partly cancel the first's (test-time augmentation). It costs a second image-encoder
            pass per slice (cached like the first). 0 turns it off.
    """

    box_margin_px: float = 3.0
    max_shift_px: float | None = 5.0
    min_area_px: int = 10
    min_seed_area_fraction: float = 0.0
    min_overlap: float = 0.0
    max_growth: float = float("inf")
    min_likeness: float = 0.55
    ring_px: float = 10.0
    likeness_classifier_weight: float = 0.5
    shape_prior: float = 2.0
    shape_prior_px: float = 3.0
    mask_threshold: float = 0.0
    neighbour_smoothing: float = 0.67
    taper_cut: float = 4.0
    taper_from: float = 0.7
    mask_prompt: float = 0.0
    likeness_patience: int = 1
    feature_prior: float = 1.0
    mirror_weight: float = 0.5


DEFAULT_PROPAGATION = PropagationSettings()
"""The settings ``propagate`` uses unless told otherwise (measured in benchmarks/eval_segmentation.py).

The shape prior (2 logits over 3 px) was chosen on the first 12 IBSI patients (mean volume Dice
0.695 → 0.729; weights 2-8 and widths 3-6 px all gave 0.713-0.735) and then checked on the other 13,
which played no part in the choice: 0.807 → 0.824 (median 0.805 → 0.835). A tighter box margin
failed the same test: on the 12, margins of 4, 3, 2, 1.5 and 1 px gave 0.685, 0.729, 0.750, 0.760 and
0.747, but on the other 13, 1.5 px gave 0.816 against 0.824 for 3 px, so 3 px stays.

Two slices of likeness patience: of the wrong voxels (``eval_segmentation.py --parts d``, 25 patients,
cut to the tumour ± 3 slices), 35 % were tumour on slices never reached, mostly because one slice's
mask looked "unlike" the seed (0.62-0.70 against the 0.7 bar) while the tumour went on. Chosen on the
first 12 patients (full volumes; patience 0, 1, 2, 3: 0.729, 0.741, 0.746, 0.744) and checked on the
other 13: 0.817 → 0.829, better on 5, worse on 2 (by 0.012 and 0.007), the same on 6; slices never
reached fell from 22 % to 11 % of the wrong voxels, slices past the tumour's end rose from 14 % to 18 %.

The seed classifier (``feature_prior``, logit weight 0.5 then; 1 now, see the end): on the first
12 patients (full volumes)
weights 0.25, 0.5, 0.75 and 1 gave 0.766, 0.788, 0.770 and 0.783 (0.746 without) with one chain, the
classifier's; on the other 13 that lost (0.829 → 0.823): its chain ran past the tumour's end (STS_032
0.824 → 0.739). With the extent taken from the chain without the classifier (designed after seeing
that failure, so the 13 are no longer untouched for this choice): 0.746 → 0.765 on the 12 (10 better,
none worse by more than 0.001) and 0.829 → 0.834 on the 13 (9 better, 4 worse by up to 0.011). Tried
and rejected the same way: a mean-embedding (prototype) classifier instead of the logistic one
(0.778 on the 12), a seed-calibrated logit threshold (0.713), and a shape prior shifted 1 px inwards
so that tapering outlines shrink (0.766 on the 12, 0.827 on the 13).

The likeness (``SeedLikeness``): half the mean-embedding test, half the seed classifier's, cut at
0.55 with one slice of patience (before: the mean embeddings alone, cut at 0.7, two slices). Of the
wrong voxels on the first 12 patients (full volumes) with the old test, 45 % were tumour on slices never
reached: the mean embeddings drift as the tumour's look changes away from the seed (STS_023, tumour
on 44 slices, reached 7). Every chain was recorded once without a stop, with both views of each
slice, and the rules replayed on the records (the masks a chain draws do not depend on where it
stops; the replay gave the live figure exactly, 0.8119). Chosen on the 12 among cuts of each view
alone, both (and / or) and their mean, patience 0-4: the mean at 0.55 with patience 1 gave 0.765 →
0.812 (the classifier alone at 0.4: 0.804; the mean embeddings alone at 0.6: 0.796). On the other
13: 0.834 → 0.844 (median 0.827 → 0.847; better on 8, the same on 1, worse on 4: STS_032 0.835 →
0.762, where it ran 11 slices past the tumour's start, STS_050 0.878 → 0.845, STS_040 and STS_031 by
0.004 and 0.001).
On all 25: 0.801 → 0.829. On the 12, tumour never reached fell from 45 % to 20 % of the wrong voxels
and outlined past the ends rose from 0 % to 7 %. In the 5-fold CV (``finetune_cv.py``, volumes cut to
the tumour ± 3 slices): 0.806 → 0.837 off-the-shelf, 0.816 → 0.831 fine-tuned.

Also tried and rejected (first 12 patients, 0.765 with the settings above): the likeness test on the
mask eroded by 1.5-3 px (0.771 / 0.770, but it ran past the tumour's ends on 3 patients); a tumour
prototype that follows the chain, 30 % from the last kept slice (0.781 on the 12, 0.833 on the 13
against 0.834: past the ends there, STS_046 found 0-83 for a tumour on 16-67; 50 %: 0.777); the
classifier at weight 1 (0.764) or a 1.5 px box margin (0.742) for the guided chain; the decoder
adapted to the seed slice at test time (12 AdamW steps on boxes of margin 1-5 px, outlines only:
0.768, STS_013 0.906 → 0.865; 20 s per propagation on CPU).

Smoothing along z (``neighbour_smoothing`` 0.67, i.e. a slice's own logits and its two neighbours'
weighted equally): of the wrong voxels left on all 25 patients (cut to the tumour ± 3 slices), most
lie on the slices near the tumour's ends (Dice 0.64 on the outer fifth, predicted area 1.32× the
truth, against 0.94 on the fifth next to the seed): the chain draws each outline from the one before
it and keeps its size where the tumour tapers. Chosen on the first 12 patients (cut volumes; weights
0.5, 0.67, 0.8: 0.8185, 0.8191, 0.8192 against 0.8166 without; better on 9, worse on 1 by 0.002),
checked on the other 13: 0.8555 → 0.8566 (better on 8, none worse by more than 0.001). A small,
steady gain; on full volumes 0.829 → 0.830 (median 0.834 → 0.838; the 12: 0.812 → 0.814, the 13:
0.844 → 0.845). Tried and rejected the same session (on the 12, against 0.8166): a higher
cut for the outlines only (logit 0.5: 0.8161, 1: 0.8129; on the 13 0.5 gained, 0.8602, but the
outlines in the middle of the tumour became too small), the box averaged with its shrunk boxes in
the guided chain (0.743: the shrinking compounds along the chain), the shape prior moved inwards by
the last two slices' shrinkage (0.8170: the chain's own outlines hardly shrink, so neither does the
prior), and other weights for the guided chain alone (classifier 1: 0.8191, 0.25: 0.8116; shape
prior 1: 0.8120, 3: 0.8176). What remains is mostly a tumour that fades into the muscle it grows in
(STS_001: the chain outlines the muscle compartment at a constant 5,500 px while the tumour shrinks
to 400), where T1 alone shows little boundary.

The classifier's weight chosen again with the two-view likeness and the smoothing (it moves the
outlines only: the unguided chain sets the extent): on the first 12 patients (cut volumes) 0.5,
0.75 and 1 gave 0.8191, 0.8213 and 0.8212 (1 lost 0.020 on STS_013; 0.75 better on 9, worse on 2
by up to 0.005); on the other 13, 0.8566 → 0.8589 (median 0.850 → 0.859; better on 8, worse on 4 by
up to 0.005); all 25 cut volumes 0.8386 → 0.8409 (the CV's off-the-shelf (d)); on full volumes
0.830 → 0.832 (median 0.838 → 0.835; the 12: 0.814 → 0.816, the 13: 0.845 → 0.847).

The taper cut (``taper_cut`` 4 logits at the outermost slice, from ``taper_from`` 0.7 of the way
out): what to fix first was measured with oracles on the 25 cut volumes (0.8409 then). Stopping at
the true ends gave only 0.848 (the outer outlines are too big, so reaching further costs as much
as it gains), while prompting every slice with its true box + 3 px gave 0.891: the outlines are the
lever, and 56 % of the wrong voxels lay on the outer two fifths of the way to each end (23 % too
much on the outermost fifth alone). Chosen on the first 12 patients (cut volumes, against 0.8213)
among 2 from 0.5, 4 from 0.5, 4 from 0.7, 2 from 0.2 and 6 from 0.7: 0.8233, 0.8239, 0.8237,
0.8232, 0.8235; 4 from 0.7 made fewest worse (8 better, 2 worse, by up to 0.017 on STS_019). On
the other 13: 0.8590 → 0.8652 (11 better, 2 worse by up to 0.003). All 25 cut volumes (the CV's
off-the-shelf (d)) 0.8410 → 0.8452 (median 0.842 → 0.844; 19 better, 4 worse); past the tumour's
ends fell from 13 % to 6 % of the wrong voxels. That cut was first applied when the outlines were
re-cut after the chain; applied in the outline chain itself, where the extent is already known (so
the next slice's box shrinks too, and a slice the cut empties ends the tumour there), it gained
again: on the 12, 0.8237 → 0.8255 (9 better, 3 worse by up to 0.006; ramps 3 from 0.7 and 4 from
0.6 gave 0.8250 and 0.8252), on the 13, 0.8652 → 0.8681 (10 better, 2 worse by up to 0.007).
All 25 cut volumes 0.8452 → 0.8476 (median 0.838), full volumes 0.836 → 0.840 (median 0.837); in
all, 0.8410 → 0.8476 and 0.832 → 0.840 for the taper cut.

With the taper cut in the chain, the seed classifier's weight 1 (``feature_prior``; 0.75 before)
no longer loses on STS_013: on the 12, 0.8255 → 0.8273 (8 better, 2 worse by up to 0.006; moving
the taper's start to 0.8 instead gave 0.8243); on the 13, 0.8681 → 0.8691 (9 better, 3 worse by up
to 0.007). All 25 cut volumes 0.8476 → 0.8490 (median 0.836), full volumes 0.8396 → 0.8405.

Tried and rejected in the same session (12 patients, cut volumes): the outline chain decoding the
box with its shrunk boxes (as ``segment`` does) from a 5 px margin, so that the shrink does not
compound (8 of the first 10 patients worse, 1 better: STS_006); a second chain run back from each end
towards the seed, averaged with the first (STS_006 0.833 → 0.614: the smaller outer outlines
compound inwards); the seed classifier refitted on the seed and the chain's masks within 2 slices of
it (0.8237 → 0.8237); re-prompting each slice with its own mask's box, or with the box the seed
classifier finds there (worse on 11 and 9 of the first 11 patients: the chain's outline beats a
fresh box prompt); and, for (a) and (b), a classifier fitted per slice to the box's confident core against the
cells outside it, added to the logits (on the 12, (a) 0.868 → 0.862 and (b) 0.803 → 0.804 at
weight 0.25). With the taper cut (on the 12, against 0.8237 before it moved into the chain): two
slices of likeness patience (0.8162) or a likeness cut at 0.5 (0.8205), now that reaching further
costs less; ``max_shift_px`` 8 (0.8235); a 4 px box margin (0.8144); smoothing weight 0.8 (0.8242,
within noise).

The mirrored view (``mirror_weight`` 0.5: each slice's logits averaged with those decoded on the
slice mirrored left-right, in both chains): on the first 12 patients (cut volumes) 0.8273 → 0.8289
(8 better, 4 worse: STS_021 by 0.030, STS_001 by 0.015; STS_006 gained 0.035), on the other 13
0.8691 → 0.8703 (6 better, 5 worse by up to 0.009). All 25 cut volumes 0.8490 → 0.8505 (median 0.836
→ 0.841), full volumes 0.8405 → 0.8430 (median 0.836 → 0.835). A small gain for a second
image-encoder pass per slice; ``$STS_MIRROR_VIEW=0`` turns it off in the workers. Rejected in the
same session, on the 12 against 0.8274 (cut volumes): a box margin of 5 or 7 px in the model's frame
(0.8238, 0.8127); the seed classifier at 1.25 (0.8302 on the 12, but 0.8690 → 0.8682 on the 13, 7
worse), 1.5 (0.8279) or 2 (0.8269); smoothing 0.8 (0.8275); shape prior 3 (0.8265); taper cut 5
(0.8270); ``max_shift_px`` 4 (0.8275); a likeness cut at 0.5 (0.8248); two slices of likeness
patience (0.8200)."""


@dataclass
class PropagationStep:
    """What happened on one slice (for logging and tuning)."""

    index: int
    area_px: int
    kept: bool
    reason: str = ""
    unlike: bool = False
    """It failed only the likeness test (see ``PropagationSettings.likeness_patience``)."""
    overlap: float = 1.0
    score: float = 0.0
    likeness: float = 1.0


class SeedLikeness:
    """How much a mask on another slice looks like the seed tumour, to the image encoder (0 to 1).

    Two views of the seed slice's embedding cells, averaged with ``classifier_weight``: the fraction
    of the mask's cells closer (cosine) to the seed tumour's mean vector than to its surroundings'
    (a ring of ``ring_px`` around the seed mask), and the fraction the seed classifier calls tumour.
    The mean vectors alone drift as the tumour's appearance changes away from the seed and stopped
    propagation inside the tumour (STS_023 reached 7 of its 44 slices); the classifier alone runs on
    into tissue that shares some of the tumour's texture. Each is weighted by how much of a cell the
    mask covers.
    """

    def __init__(self, embedded: EmbeddedSlice, seed: np.ndarray, ring_px: float,
                 classifier: SeedClassifier | None = None, classifier_weight: float = 0.0) -> None:
        ring = (cv2.dilate(seed.astype(np.uint8), _disk(ring_px)) > 0) & ~seed
        cells = _unit_cells(embedded)
        self.tumour = _mean_direction(cells, _cell_weights(seed, embedded.frame))
        self.background = _mean_direction(cells, _cell_weights(ring, embedded.frame))
        self.classifier = classifier if classifier_weight > 0 else None
        self.classifier_weight = float(classifier_weight) if self.classifier is not None else 0.0

    def likeness(self, embedded: EmbeddedSlice, mask: np.ndarray) -> float:
        """Weighted fraction of the mask's cells that look like the seed tumour (see the class)."""
        weights = _cell_weights(mask, embedded.frame)
        if weights.sum() == 0:
            return 0.0
        cells = _unit_cells(embedded)
        nearer = float((weights * ((cells @ self.tumour) > (cells @ self.background))).sum() / weights.sum())
        if self.classifier is None:
            return nearer
        called = float((weights * (self.classifier.cell_logits(cells) > 0)).sum() / weights.sum())
        return (1.0 - self.classifier_weight) * nearer + self.classifier_weight * called


class SeedClassifier:
    """A per-patient linear classifier of image-embedding cells, fitted on the annotated seed slice.

    The seed mask says which 4×4 model-frame cells of that slice are tumour; a logistic regression on
    their 256-d (unit) embedding vectors learns what this patient's tumour looks like to the encoder,
    and its logits on another slice of the same series say where that tissue is there. It costs one
    small fit (about 0.3 s on a CPU core) per propagation and a matrix product per slice.
    """

    def __init__(self, embedded: EmbeddedSlice, seed: np.ndarray, l2: float = 1.0) -> None:
        frame = embedded.frame
        side = frame.size // 4
        coverage = _cell_coverage(seed, frame)
        valid = np.zeros((side, side), bool)  # cells of the slice, not of the padding
        valid[: -(-frame.resized_height // 4), : -(-frame.resized_width // 4)] = True
        valid = valid.reshape(-1)
        self.weights = fit_logistic(_unit_cells(embedded)[valid], coverage[valid], l2=l2)

    def cell_logits(self, cells: np.ndarray) -> np.ndarray:
        """Logits ``[64 * 64]`` of ``_unit_cells`` vectors (> 0: looks like the tumour)."""
        return cells @ self.weights[:-1] + self.weights[-1]

    def logits(self, embedded: EmbeddedSlice) -> np.ndarray:
        """Float32 logits ``[height, width]`` on ``embedded``'s slice grid (> 0: looks like the tumour)."""
        frame = embedded.frame
        side = frame.size // 4
        cells = self.cell_logits(_unit_cells(embedded))
        grid = torch.from_numpy(cells.reshape(1, 1, side, side).astype(np.float32))
        grid = torch.nn.functional.interpolate(grid, size=(frame.size, frame.size), mode="bilinear",
                                               align_corners=False)
        return frame.logits_to_image(grid)[0, 0].numpy()


def fit_logistic(features: np.ndarray, targets: np.ndarray, l2: float = 1.0, steps: int = 15) -> np.ndarray:
    """Weights (the last is the bias) of an L2-penalised logistic regression, by Newton's method.

    ``targets`` may be fractions (a cell half covered by the mask counts half). A dozen Newton steps
    on a 257-parameter problem converge, where a generic solver would be another dependency.
    """
    x = np.concatenate([features, np.ones((len(features), 1))], axis=1).astype(np.float64)
    y = np.asarray(targets, np.float64)
    w = np.zeros(x.shape[1])
    penalty = np.full(x.shape[1], float(l2))
    penalty[-1] = 0.0  # the bias is not shrunk
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        gradient = x.T @ (p - y) + penalty * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty + 1e-6)
        w -= np.linalg.solve(hessian, gradient)
    return w


def _unit_cells(embedded: EmbeddedSlice) -> np.ndarray:
    """The embedding as ``[64 * 64, 256]`` unit vectors, one per 4×4 model-frame cell."""
    cells = embedded.embedding[0].float().numpy().reshape(embedded.embedding.shape[1], -1).T
    return cells / np.maximum(np.linalg.norm(cells, axis=1, keepdims=True), 1e-6)


def _cell_coverage(mask: np.ndarray, frame: ModelFrame) -> np.ndarray:
    """Fraction of each embedding cell covered by ``mask`` (``[64 * 64]``)."""
    side = frame.size // 4
    return cv2.resize(frame.mask_to_model(mask), (side, side), interpolation=cv2.INTER_AREA).reshape(-1)


def _cell_weights(mask: np.ndarray, frame: ModelFrame) -> np.ndarray:
    """``_cell_coverage`` without the cells the mask barely touches (small masks count fully)."""
    coverage = _cell_coverage(mask, frame)
    return coverage * (coverage >= min(0.5, float(coverage.max())))


def _mean_direction(cells: np.ndarray, weights: np.ndarray) -> np.ndarray:
    mean = (cells * weights[:, None]).sum(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-6)


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Float32 distance (px) to ``mask``'s border: positive inside, negative outside.

    The image border does not count as the mask's border (a mask touching it stays "inside" there).
    """
    inside = mask.astype(np.uint8)
    d_in = cv2.distanceTransform(np.pad(inside, 1, mode="edge"), cv2.DIST_L2, 5)[1:-1, 1:-1]
    d_out = cv2.distanceTransform(np.pad(1 - inside, 1, mode="edge"), cv2.DIST_L2, 5)[1:-1, 1:-1]
    return d_in - d_out


def outline_logits(mask: np.ndarray, magnitude: float, width_px: float) -> np.ndarray:
    """``magnitude × tanh(d / width_px)``, ``d`` the signed distance to ``mask``'s border: an outline as
    logits that are sure far from it and undecided on it (the shape prior, the seed when smoothing)."""
    return magnitude * np.tanh(signed_distance(mask) / width_px)


def _disk(radius_px: float) -> np.ndarray:
    size = 2 * int(np.ceil(radius_px)) + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _cut_to_reach(mask: np.ndarray, previous: np.ndarray, settings: PropagationSettings) -> tuple[np.ndarray, float]:
    """``mask`` cut to the previous mask dilated by ``max_shift_px``, and the fraction that lay there."""
    area = int(mask.sum())
    if settings.max_shift_px is None or not area:
        return mask, 1.0
    reach = cv2.dilate(previous.astype(np.uint8), _disk(settings.max_shift_px)) > 0
    overlap = float((mask & reach).sum()) / area
    return (fill_holes(keep_components(mask & reach, previous)) if overlap < 1 else mask), overlap


def _propagate_step(
    segmenter: SliceSegmenter,
    image: np.ndarray,
    previous: np.ndarray,
    seed_area: int,
    likeness: SeedLikeness | None,
    settings: PropagationSettings,
    index: int,
    classifier: SeedClassifier | None = None,
    taper: float = 0.0,
) -> tuple[np.ndarray, PropagationStep, np.ndarray, np.ndarray]:
    """Segment ``image`` prompted by the previous slice's mask; say whether the tumour goes on.

    ``taper`` logits are taken off with ``mask_threshold`` (this slice's taper cut, ``taper_cuts``).
    Returns the mask, the step, and the logits (already less both) and box it was cut from (for
    ``recut_outlines``).
    """
    box = check_box(mask_box(previous) + np.array([-1, -1, 1, 1]) * settings.box_margin_px, image.shape)
    embedded = segmenter.embed(image)
    mask_logits = None
    if settings.mask_prompt > 0:
        mask_logits = mask_prompt_logits(embedded.frame.mask_to_model(previous), settings.mask_prompt)[None]
    logits, iou = segmenter.decode(embedded, boxes=box[None], mask_logits=mask_logits)
    logit = logits[0, 0]
    if settings.mirror_weight:
        mirrored = segmenter.decode_mirrored(image, box[None], mask_logits=mask_logits)[0, 0]
        logit = blend_views(logit, mirrored, settings.mirror_weight)
    if settings.shape_prior:
        logit = logit + outline_logits(previous, settings.shape_prior, settings.shape_prior_px)
    judged = None  # what the likeness test sees: the model's own outline, without the classifier's pull
    if classifier is not None:
        judged, _ = _cut_to_reach(segmenter.postprocess(logit - settings.mask_threshold, box), previous, settings)
        logit = logit + settings.feature_prior * np.clip(classifier.logits(embedded), -8.0, 8.0)
    logit = logit - settings.mask_threshold - taper
    mask, overlap = _cut_to_reach(segmenter.postprocess(logit, box), previous, settings)
    judged = mask if judged is None else judged
    area = int(mask.sum())
    step = PropagationStep(index=index, area_px=area, kept=False, overlap=overlap, score=float(iou[0, 0]))
    if likeness is not None and area:
        step.likeness = likeness.likeness(embedded, judged) if judged.any() else 0.0
    if area < max(settings.min_area_px, settings.min_seed_area_fraction * seed_area):
        step.reason = f"area {area} px too small"
    elif step.likeness < settings.min_likeness:
        step.reason = f"only {step.likeness:.0%} of the mask looks like the seed tumour"
        step.unlike = True
    elif overlap < settings.min_overlap:
        step.reason = f"only {overlap:.0%} of the mask near the previous one"
    elif area > settings.max_growth * int(previous.sum()):
        step.reason = f"area grew {area / max(1, int(previous.sum())):.1f}×"
    else:
        step.kept = True
    return mask, step, logit, box


def propagate(
    volume: Any,
    seed_index: int,
    seed_mask: Any,
    *,
    segmenter: SliceSegmenter | None = None,
    settings: PropagationSettings = DEFAULT_PROPAGATION,
    trace: list[PropagationStep] | None = None,
) -> np.ndarray:
    """Spread one annotated slice's mask through the volume, slice by slice, until the tumour ends.

    From the seed outwards in both directions, each slice is prompted with the box of the previous
    slice's result (see ``PropagationSettings`` for the margins and the stopping rule); the seed slice
    keeps ``seed_mask`` exactly. With ``feature_prior`` or ``taper_cut`` on, a second chain draws the
    outlines on the slices the first chain reached, guided by a classifier fitted to the seed
    (``SeedClassifier``) and cut harder towards the ends (``taper_cuts``). With ``neighbour_smoothing``
    on, each outline is finally re-cut from its logits mixed with its neighbours' (``recut_outlines``).

    Args:
        volume: ``[z, y, x]`` array, any numeric dtype (each slice is scaled on its own).
        seed_index: z index of the annotated slice.
        seed_mask: ``[y, x]`` bool/0-1 mask of the tumour on that slice (not empty).
        segmenter: the ``SliceSegmenter`` to use (default: the process-wide one).
        settings: prompting and stopping parameters.
        trace: when a list is given, one ``PropagationStep`` per slice tried is appended to it (of
            the chain that decides where the tumour ends).

    Returns:
        Bool mask ``[z, y, x]`` of ``volume``'s shape.

    Raises:
        InputError: ``volume`` is not 3-D, ``seed_index`` is out of range, ``seed_mask`` has another
            shape than a slice or is empty.
    """
    array = np.asarray(volume)
    if array.ndim != 3:
        raise InputError(f"volume must be a 3-D [z, y, x] array, got shape {array.shape}")
    if not 0 <= int(seed_index) < array.shape[0]:
        raise InputError(f"seed_index {seed_index} outside the volume's {array.shape[0]} slices")
    seed = np.asarray(seed_mask).astype(bool)
    if seed.shape != array.shape[1:]:
        raise InputError(f"seed_mask shape {seed.shape} differs from a slice's shape {array.shape[1:]}")
    if not seed.any():
        raise InputError(f"seed_mask on slice {seed_index} is empty: nothing to propagate")
    segmenter = segmenter if segmenter is not None else default_segmenter()
    seed_index = int(seed_index)
    seed_embedded = segmenter.embed(array[seed_index])
    classifier = None
    if settings.feature_prior or (settings.min_likeness > 0 and settings.likeness_classifier_weight > 0):
        classifier = SeedClassifier(seed_embedded, seed)
    likeness = None
    if settings.min_likeness > 0:
        likeness = SeedLikeness(seed_embedded, seed, settings.ring_px, classifier, settings.likeness_classifier_weight)
    outline_chain = bool(settings.feature_prior or settings.taper_cut)
    drawn: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    out = _chain(segmenter, array, seed_index, seed, likeness, settings, None, trace,
                 drawn=None if outline_chain else drawn)
    if outline_chain:
        # The outlines come from a second chain over the extent the first one found. The classifier's
        # outlines are better, but a chain it guides no longer knows where the tumour ends (its masks
        # look like the tumour by construction); and only a known extent says how far out each slice
        # lies, for the taper cut. The second chain never goes past the extent (no encoder or decoder
        # work on slices left empty); where it stops sooner, the tumour ends there.
        extent = out.any(axis=(1, 2))
        out = _chain(segmenter, array, seed_index, seed, likeness, settings,
                     classifier if settings.feature_prior else None, None, extent, drawn=drawn)
    if settings.neighbour_smoothing > 0:
        recut_outlines(out, drawn, seed_index, seed, segmenter, settings)
    return out


SEED_LOGIT = 10.0
"""How sure the annotated seed outline is, as a logit deep inside or outside it (for smoothing)."""


def taper_cuts(indices: Sequence[int], seed_index: int, settings: PropagationSettings) -> dict[int, float]:
    """The logit ``taper_cut`` takes off each slice of an extent (``indices``, the seed's included):
    0 up to ``taper_from`` of the way from the seed to that side's outermost slice, then rising
    linearly to ``taper_cut`` there."""
    above = max((i for i in indices if i > seed_index), default=seed_index)
    below = min((i for i in indices if i < seed_index), default=seed_index)
    cuts = {}
    for index in indices:
        reach = abs((above if index > seed_index else below) - seed_index)
        fraction = abs(index - seed_index) / max(1, reach)
        ramp = (fraction - settings.taper_from) / max(1e-6, 1.0 - settings.taper_from)
        cuts[index] = settings.taper_cut * min(1.0, max(0.0, ramp))
    return cuts


def recut_outlines(
    out: np.ndarray,
    drawn: dict[int, tuple[np.ndarray, np.ndarray]],
    seed_index: int,
    seed: np.ndarray,
    segmenter: SliceSegmenter,
    settings: PropagationSettings,
) -> None:
    """Cut each propagated slice of ``out`` again (in place) from its logits mixed with its
    neighbours' (``neighbour_smoothing``), once the chain has run.

    ``drawn`` holds the logits (less any taper cut) and box each kept slice was cut from. A neighbour
    that was not drawn (past the extent, or the volume's edge) counts as the slice itself, so the
    ends are not pulled towards nothing; the seed counts as its outline's signed distance, saturated
    at ``SEED_LOGIT``. A slice that would come out empty keeps its outline. Measured in
    ``DEFAULT_PROPAGATION``'s notes.
    """
    weight = settings.neighbour_smoothing
    logits = {index: item[0] for index, item in drawn.items()}
    logits[seed_index] = outline_logits(seed, SEED_LOGIT, settings.shape_prior_px)
    for index, (own, box) in drawn.items():
        below, above = logits.get(index - 1, own), logits.get(index + 1, own)
        mask = segmenter.postprocess((1.0 - weight) * own + weight * 0.5 * (below + above), box)
        if mask.any():
            out[index] = mask


def _chain(
    segmenter: SliceSegmenter,
    array: np.ndarray,
    seed_index: int,
    seed: np.ndarray,
    likeness: SeedLikeness | None,
    settings: PropagationSettings,
    classifier: SeedClassifier | None,
    trace: list[PropagationStep] | None,
    extent: np.ndarray | None = None,
    drawn: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> np.ndarray:
    """One chain of ``_propagate_step`` from the seed outwards, both ways, until the stopping rule says
    (or, when ``extent`` is given, until the first slice it marks False, each outline cut harder
    towards the extent's ends by ``taper_cuts``). When ``drawn`` is given, the logits and box of each
    slice kept go into it, by slice index."""
    out = np.zeros(array.shape, bool)
    out[seed_index] = seed
    seed_area = int(seed.sum())
    cuts = {} if extent is None else taper_cuts(np.nonzero(extent)[0].tolist(), seed_index, settings)
    for direction in (1, -1):
        previous, index = seed, seed_index + direction
        doubtful: list[tuple[np.ndarray, PropagationStep, np.ndarray, np.ndarray]] = []  # only looked unlike
        while 0 <= index < array.shape[0] and (extent is None or extent[index]):
            mask, step, logits, box = _propagate_step(
                segmenter, array[index], previous, seed_area, likeness, settings, index, classifier,
                cuts.get(index, 0.0),
            )
            if trace is not None:
                trace.append(step)
            if step.kept:
                doubtful.append((mask, step, logits, box))
                for kept_mask, kept_step, kept_logits, kept_box in doubtful:  # a passing slice: all tumour
                    out[kept_step.index] = kept_mask
                    kept_step.kept = True
                    if drawn is not None:
                        drawn[kept_step.index] = (kept_logits, kept_box)
                doubtful = []
            elif step.unlike and len(doubtful) < settings.likeness_patience:
                doubtful.append((mask, step, logits, box))
            else:
                break
            previous = mask
            index += direction
    return out


# ------------------------------------------------------------------------------ process-wide default

_DEFAULT_SEGMENTER: SliceSegmenter | None = None
_DEFAULT_LOCK = threading.Lock()


def default_segmenter() -> SliceSegmenter:
    """The process-wide ``SliceSegmenter``, created on first use (model on CUDA if available).

    With ``$STS_EMBEDDING_CACHE`` set, its embeddings also go to that folder, so the workers of one
    host share them: a slice embedded ahead of time (``workers.jobs.warm_embeddings``) answers its
    first click with the decoder alone. ``$STS_BOX_SHRINKS`` sets its ``box_shrinks`` and
    ``$STS_PROMPT_VIEWS`` its ``views``.
    """
    global _DEFAULT_SEGMENTER
    with _DEFAULT_LOCK:
        if _DEFAULT_SEGMENTER is None:
            segmenter = SliceSegmenter(box_shrinks=box_shrinks_from_env(), views=prompt_views_from_env(),
                                       warm_views=warm_prompt_views_from_env())
            root = os.environ.get(EMBEDDING_CACHE_ENV)
            if root:
                segmenter.cache = DiskEmbeddingCache(root, segmenter.model.encoder_version,
                                                     max_entries=DEFAULT_EMBEDDING_CACHE_SIZE)
            _DEFAULT_SEGMENTER = segmenter
        return _DEFAULT_SEGMENTER


def parse_box_shrinks(raw: str, source: str = "box shrinks") -> tuple[float, ...]:
    """Comma-separated px (``"2,4"``) as ``box_shrinks``; empty entries and zeros mean none.

    The one reading of this format, shared by ``$STS_BOX_SHRINKS`` and the benchmarks' options.

    Raises:
        ConfigError: an entry is not a finite number >= 0 (the message names ``source``).
    """
    shrinks = []
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        try:
            value = float(entry)
        except ValueError:
            value = -1.0
        if not (value >= 0 and np.isfinite(value)):
            raise ConfigError(f"{source}={raw!r}: expected comma-separated pixels >= 0, e.g. '2,4'")
        if value > 0:
            shrinks.append(value)
    return tuple(shrinks)


def box_shrinks_from_env() -> tuple[float, ...]:
    """``$STS_BOX_SHRINKS`` as px (unset: ``DEFAULT_BOX_SHRINKS_PX``; empty or ``0``: none).

    Raises:
        ConfigError: an entry is not a number >= 0.
    """
    raw = os.environ.get(BOX_SHRINKS_ENV)
    return DEFAULT_BOX_SHRINKS_PX if raw is None else parse_box_shrinks(raw, f"${BOX_SHRINKS_ENV}")


def propagation_settings_from_env() -> PropagationSettings:
    """``DEFAULT_PROPAGATION``, without the mirrored view when ``$STS_MIRROR_VIEW`` is 0/false/no/off.

    Raises:
        ConfigError: the variable is set to something else than 1/true/yes/on or 0/false/no/off.
    """
    return DEFAULT_PROPAGATION if env_flag(MIRROR_VIEW_ENV) else replace(DEFAULT_PROPAGATION, mirror_weight=0.0)


def prompt_views_from_env(gpu: bool | None = None) -> tuple[SliceView, ...]:
    """``SliceSegmenter.views`` as ``$STS_PROMPT_VIEWS`` sets it (see ``PROMPT_VIEWS_ENV``; when it is
    unset, ``$STS_MIRROR_PROMPTS`` as ``LEGACY_MIRROR_PROMPTS_ENV`` says).

    Args:
        gpu: whether the model runs on a GPU (default: whether torch sees CUDA), the default when unset.

    Raises:
        ConfigError: an unknown view name, or a legacy value that is not an on/off word.
    """
    if not os.environ.get(PROMPT_VIEWS_ENV, "").strip() and os.environ.get(LEGACY_MIRROR_PROMPTS_ENV, "").strip():
        return (MIRRORED,) if env_flag(LEGACY_MIRROR_PROMPTS_ENV) else ()
    gpu = torch.cuda.is_available() if gpu is None else gpu
    return _views_from_env(PROMPT_VIEWS_ENV, DEFAULT_PROMPT_VIEWS, on_when_unset=gpu)


def warm_prompt_views_from_env(gpu: bool | None = None) -> tuple[SliceView, ...]:
    """``SliceSegmenter.warm_views`` as ``$STS_WARM_PROMPT_VIEWS`` sets it (see ``WARM_PROMPT_VIEWS_ENV``).

    Args:
        gpu: whether the model runs on a GPU (default: whether torch sees CUDA), the default when unset.

    Raises:
        ConfigError: an unknown view name or a zoomed one (never warm), naming the variable.
    """
    gpu = torch.cuda.is_available() if gpu is None else gpu
    views = _views_from_env(WARM_PROMPT_VIEWS_ENV, DEFAULT_WARM_PROMPT_VIEWS, on_when_unset=not gpu)
    return refuse_zoomed(views, f"${WARM_PROMPT_VIEWS_ENV}={os.environ.get(WARM_PROMPT_VIEWS_ENV, '')!r}")


def _views_from_env(variable: str, default: Sequence[str], on_when_unset: bool) -> tuple[SliceView, ...]:
    """The views a views variable names: view names; an on word for ``default``, an off word (or
    'none') for none; unset or empty, ``default`` if ``on_when_unset``. A bad name → a ``ConfigError``
    naming the variable and its value."""
    raw = os.environ.get(variable, "").strip() or ("on" if on_when_unset else "off")
    if raw.lower() in FLAG_ON:
        return parse_views(",".join(default), f"the default of ${variable}")
    if raw.lower() in FLAG_OFF:
        return ()
    return parse_views(raw, f"${variable}={raw!r}")


def embedding_cache_budget_bytes() -> int:
    """``$STS_EMBEDDING_CACHE_GB`` (default ``DEFAULT_EMBEDDING_CACHE_GB``) in bytes.

    Raises:
        ConfigError: the variable is not a positive number.
    """
    raw = os.environ.get(EMBEDDING_CACHE_GB_ENV, "")
    try:
        gigabytes = float(raw) if raw else DEFAULT_EMBEDDING_CACHE_GB
    except ValueError:
        gigabytes = -1.0
    if not gigabytes > 0:
        raise ConfigError(f"${EMBEDDING_CACHE_GB_ENV}={raw!r}: expected a positive number of GB")
    return int(gigabytes * 1e9)


def segment_slice(image: Any, box: Any = None, points: Any = None) -> np.ndarray:
    """Segment the object a box and/or clicks point at in one 2-D slice.

    Args:
        image: ``[y, x]`` array of any numeric dtype (a uint8 PNG, raw MRI floats); intensities are
            scaled per slice.
        box: ``(x0, y0, x1, y1)`` in pixels of ``image``; parts outside the image are clipped.
        points: ``[(x, y, is_positive), ...]`` in pixels; with a box they correct the box's mask
            near them (``DEFAULT_CLICK_REACH``), alone they are turned into candidate boxes (see
            ``SliceSegmenter._segment_points``).

    Returns:
        Bool mask ``[y, x]`` with ``image``'s shape.

    Raises:
        InputError: no prompt, a malformed/zero-size/outside box, a point outside the image.

    >>> mask = segment_slice(mri_slice, box=(40, 30, 90, 80))   # doctest: +SKIP
    """
    return default_segmenter().segment(image, box=box, points=points)


def segment_volume(volume: Any, spacing: Any = None) -> np.ndarray:
    """Automatic (prompt-free) segmentation of ``volume[z, y, x]`` with the current model.

    Raises:
        NoAutomaticModelError: always, for now: no 2.5-D model has been trained and registered.
    """
    raise NoAutomaticModelError("no automatic model registered yet; annotate with the box tool or train one")
