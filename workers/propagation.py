"""Propagation: one annotated slice's mask spread through the volume until the tumour ends.

``propagate`` prompts each next slice with the box of the slice before it, decides where the tumour
ends (``PropagationSettings``, ``SeedLikeness``), draws the outlines in a second chain guided by a
classifier fitted to the seed (``SeedClassifier``) and tapered towards the ends, and smooths them
along z. Every rule and default here was measured on the development patients; the evidence is in
``DEFAULT_PROPAGATION``'s notes and docs/segmentation-notes.md. ``workers.segmentation`` re-exports
the public names (``propagate``, ``PropagationSettings``, ``DEFAULT_PROPAGATION``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch

from core.errors import ConfigError, InputError
from core.settings import env_flag
from workers.embedding_cache import EmbeddedSlice
from workers.models.litemedsam import ModelFrame, mask_prompt_logits
from workers.slice_masks import as_slice, check_box, disk, fill_holes, keep_components, mask_box, outline_logits
from workers.slice_views import SliceView, average_views, parse_views, view_names, views_from_env

if TYPE_CHECKING:
    from workers.segmentation import SliceSegmenter

PROPAGATION_VIEWS_ENV = "STS_PROPAGATION_VIEWS"
"""The other views each propagated slice is also decoded on (``PropagationSettings.views``):
comma-separated whole-slice view names (``workers.slice_views``), an on word or unset for the
default, an off word or ``none`` for the slice alone (one encoder pass a slice instead of three on a
CPU-only site; about 0.01 of mean volume Dice, see ``DEFAULT_PROPAGATION``). Read by
``propagation_settings_from_env``."""

MIRROR_VIEW_ENV = "STS_MIRROR_VIEW"
"""The older switch, read when ``$STS_PROPAGATION_VIEWS`` is unset: an off word for the slice alone,
an on word for the default views (it named the mirrored view, the default until 2026-12-06)."""


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
        views: the other views of each slice (comma-separated ``workers.slice_views`` names of
            whole-slice views) it is decoded on as well, the logits of all averaged with equal weights
            (``average_views``), in both chains. The image encoder is neither mirror- nor
            rotation-invariant, so each view errs elsewhere and the errors partly cancel (test-time
            augmentation). Each costs one more image-encoder pass per slice (cached; the CPU workers
            warm the same two views for box prompts). '' decodes the slice alone.
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
    views: str = "rot180,antitranspose"


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

The mirrored view (then ``mirror_weight`` 0.5: each slice's logits averaged with those decoded on the
slice mirrored left-right, in both chains): on the first 12 patients (cut volumes) 0.8273 → 0.8289
(8 better, 4 worse: STS_021 by 0.030, STS_001 by 0.015; STS_006 gained 0.035), on the other 13
0.8691 → 0.8703 (6 better, 5 worse by up to 0.009). All 25 cut volumes 0.8490 → 0.8505 (median 0.836
→ 0.841), full volumes 0.8405 → 0.8430 (median 0.836 → 0.835). A small gain for a second
image-encoder pass per slice (``$STS_MIRROR_VIEW=0`` turned it off in the workers). Rejected in the
same session, on the 12 against 0.8274 (cut volumes): a box margin of 5 or 7 px in the model's frame
(0.8238, 0.8127); the seed classifier at 1.25 (0.8302 on the 12, but 0.8690 → 0.8682 on the 13, 7
worse), 1.5 (0.8279) or 2 (0.8269); smoothing 0.8 (0.8275); shape prior 3 (0.8265); taper cut 5
(0.8270); ``max_shift_px`` 4 (0.8275); a likeness cut at 0.5 (0.8248); two slices of likeness
patience (0.8200).

The two views box prompts chose (rot180 and antitranspose, each slice's logits the mean of three)
instead of the mirrored one (2026-12-06; encoder in bfloat16 on an AVX512-BF16 CPU, cut volumes,
chosen on the first 12 patients and checked on the other 13): on the 12, 0.8384 → 0.8492 (10 better,
2 worse by up to 0.017; STS_015 0.848 → 0.895, STS_023 0.720 → 0.771), on the 13 0.8737 → 0.8755
(8 better, 5 worse by up to 0.017); all 25 0.8568 → 0.8629. In float32, the 12: 0.8289 → 0.8420.
A CPU worker warms these two views for box prompts anyway, so propagation's own view is one encoder
pass a slice less to warm."""


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
        ring = (cv2.dilate(seed.astype(np.uint8), disk(ring_px)) > 0) & ~seed
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


def _cut_to_reach(mask: np.ndarray, previous: np.ndarray, settings: PropagationSettings) -> tuple[np.ndarray, float]:
    """``mask`` cut to the previous mask dilated by ``max_shift_px``, and the fraction that lay there."""
    area = int(mask.sum())
    if settings.max_shift_px is None or not area:
        return mask, 1.0
    reach = cv2.dilate(previous.astype(np.uint8), disk(settings.max_shift_px)) > 0
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
    others = [segmenter.decode_view(image, box[None], view, mask_logits=mask_logits)[0, 0]
              for view in propagation_views(settings)]
    logit = average_views([logit, *others])
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
    if isinstance(seed_index, bool) or not isinstance(seed_index, int | np.integer):
        raise InputError(f"seed_index must be an integer slice index, got {seed_index!r}")
    if not 0 <= int(seed_index) < array.shape[0]:
        raise InputError(f"seed_index {seed_index} outside the volume's {array.shape[0]} slices")
    for z, plane in enumerate(array):  # every slice checked before any work: the error names the slice
        try:
            as_slice(plane)
        except InputError as exc:
            raise InputError(f"slice {z} of the volume: {exc}") from None
    seed = np.asarray(seed_mask).astype(bool)
    if seed.shape != array.shape[1:]:
        raise InputError(f"seed_mask shape {seed.shape} differs from a slice's shape {array.shape[1:]}")
    if not seed.any():
        raise InputError(f"seed_mask on slice {seed_index} is empty: nothing to propagate")
    if segmenter is None:
        from workers.segmentation import default_segmenter  # the process-wide one, made on first use

        segmenter = default_segmenter()
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


def propagation_views(settings: PropagationSettings) -> tuple[SliceView, ...]:
    """The other views each propagated slice is decoded on (``PropagationSettings.views``).

    Raises:
        ConfigError: an unknown or zoomed view (a zoomed view's window would follow every slice's box,
            so its embeddings could never be warmed ahead).
    """
    return _whole_slice_views(settings.views, "PropagationSettings.views")


@functools.lru_cache(maxsize=32)
def _whole_slice_views(raw: str, source: str) -> tuple[SliceView, ...]:
    """``parse_views`` without zoomed views; cached, as every propagated slice asks again."""
    return _refuse_zoomed(parse_views(raw, f"{source}={raw!r}"), f"{source}={raw!r}")


def _refuse_zoomed(views: tuple[SliceView, ...], source: str) -> tuple[SliceView, ...]:
    if any(view.zoom is not None for view in views):
        raise ConfigError(f"{source}: expected whole-slice views (a zoomed one follows every slice's box)")
    return views


def propagation_settings_from_env() -> PropagationSettings:
    """``DEFAULT_PROPAGATION`` with the views ``$STS_PROPAGATION_VIEWS`` names (else as the older
    ``$STS_MIRROR_VIEW`` says: off → the slice alone, on → the default views).

    Raises:
        ConfigError: an unknown or zoomed view name, or a word that is not on/off, naming the variable.
    """
    raw = os.environ.get(PROPAGATION_VIEWS_ENV, "").strip()
    default = DEFAULT_PROPAGATION.views.split(",")
    views = views_from_env(PROPAGATION_VIEWS_ENV, default, on_when_unset=not raw and env_flag(MIRROR_VIEW_ENV))
    return replace(DEFAULT_PROPAGATION, views=",".join(view_names(
        _refuse_zoomed(views, f"${PROPAGATION_VIEWS_ENV}={raw!r}"))))
