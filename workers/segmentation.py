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

This module holds the prompting (``SliceSegmenter``: boxes, clicks, views, batching) and the
workers' settings from the environment. Propagation's rules live in ``workers.propagation`` (its
public names are re-exported here), the embedding caches in ``workers.embedding_cache``, prompt
validation and mask clean-up in ``workers.slice_masks`` and the views in ``workers.slice_views``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
import torch

from core.errors import ConfigError, InputError, ProjectError
from core.settings import env_flag
from workers.embedding_cache import (
    DEFAULT_EMBEDDING_CACHE_SIZE,
    EMBEDDING_CACHE_ENV,
    DiskEmbeddingCache,
    EmbeddedSlice,
    EmbeddingCache,
    embedding_cache_budget_bytes,
    embedding_key,
)
from workers.models.litemedsam import LiteMedSAM, ModelFrame, load_litemedsam, preprocess_slice
from workers.propagation import DEFAULT_PROPAGATION as DEFAULT_PROPAGATION
from workers.propagation import PropagationSettings as PropagationSettings
from workers.propagation import propagate as propagate
from workers.propagation import propagation_settings_from_env as propagation_settings_from_env
from workers.slice_masks import as_slice, box_region, check_box, check_points, fill_holes, keep_components
from workers.slice_views import MIRRORED, SliceView, average_views, parse_views, views_from_env

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


# ------------------------------------------------------------------------------------ the segmenter


class SliceSegmenter:
    """LiteMedSAM plus an embedding cache: what a worker keeps resident to answer prompts fast.

    >>> seg = SliceSegmenter()                     # doctest: +SKIP
    >>> mask = seg.segment(image, box=(40, 30, 90, 80))   # doctest: +SKIP

    Attributes:
        views: the other views of the slice (``workers.slice_views``) a box prompt is decoded on as
            well, their logits averaged with the slice's own with equal weights (``decode_view``;
            empty: the slice alone; see ``DEFAULT_PROMPT_VIEWS``). Each view is embedded and cached
            on its own. ``propagate`` has its own (``PropagationSettings.views``).
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
    # No padding: OpenCV counts the pixels beyond the image as far, so the image's edge is not taken
    # for the mask's (a click near it would reach only ``min_reach_px``).
    inside = cv2.distanceTransform(box_mask.astype(np.uint8), cv2.DIST_L2, 5)
    outside = cv2.distanceTransform((~box_mask).astype(np.uint8), cv2.DIST_L2, 5)
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
                                                     max_entries=DEFAULT_EMBEDDING_CACHE_SIZE,
                                                     max_bytes=embedding_cache_budget_bytes())
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
    return views_from_env(PROMPT_VIEWS_ENV, DEFAULT_PROMPT_VIEWS, on_when_unset=gpu)


def warm_prompt_views_from_env(gpu: bool | None = None) -> tuple[SliceView, ...]:
    """``SliceSegmenter.warm_views`` as ``$STS_WARM_PROMPT_VIEWS`` sets it (see ``WARM_PROMPT_VIEWS_ENV``).

    Args:
        gpu: whether the model runs on a GPU (default: whether torch sees CUDA), the default when unset.

    Raises:
        ConfigError: an unknown view name or a zoomed one (never warm), naming the variable.
    """
    gpu = torch.cuda.is_available() if gpu is None else gpu
    views = views_from_env(WARM_PROMPT_VIEWS_ENV, DEFAULT_WARM_PROMPT_VIEWS, on_when_unset=not gpu)
    return refuse_zoomed(views, f"${WARM_PROMPT_VIEWS_ENV}={os.environ.get(WARM_PROMPT_VIEWS_ENV, '')!r}")


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
