"""Fine-tuning LiteMedSAM on our own annotations: the decoder side, and on a GPU the encoder too.

By default only the prompt encoder and mask decoder learn: the image encoder (TinyViT, ~95 % of the
compute) stays frozen, so its embeddings can be computed once, cached on disk
(``DiskEmbeddingCache``) and reused by every epoch, every cross-validation fold and the live workers
alike; training then fits on CPU. On a GPU, ``train_litemedsam(train_encoder=True)`` also adapts the
encoder to our MRI (with augmentation); its embeddings then get new cache keys. On a CPU,
``train_neck=True`` adapts only the encoder's last two convolutions (its neck) from cached inputs of
the neck (``neck_inputs``): 1.7 s per step of 8 on two cores against 1.0 s for the decoder alone.
What is learnt is how boxes drawn by *our* annotators relate to *our* tumours:

- ``tight``: the mask's box + 5 px (a careful annotator);
- ``loose``: the mask's box + 10 px, each side moved by up to ±5 px (a quick one);
- ``neighbour``: the box of the tumour on the adjacent slice (+ a small margin), with the target
  being this slice's tumour, *empty when the tumour has ended*. This is what propagation asks
  (``workers.segmentation.propagate``) and it teaches the decoder to answer "nothing here" past
  the tumour's end instead of outlining the nearest structure.

The weights are saved as a checkpoint (prompt encoder + mask decoder, ~16 MB; ~39 MB with the
encoder) holding the base weights' SHA-256; ``load_litemedsam(finetuned_path=...)`` (or
``$STS_LITEMEDSAM_DECODER``) applies it over the pinned base weights.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.nn import functional

from workers.models.litemedsam import LiteMedSAM, ModelFrame, mask_prompt_logits
from workers.segmentation import shrunk_boxes

PROMPT_KINDS = ("tight", "loose", "neighbour")
"""The prompt kinds ``make_samples`` draws (see the module docstring)."""

DEFAULT_MIN_AREA_PX = 20
"""Slices with a smaller tumour give no ``tight``/``loose`` sample (a box a few clicks wide)."""


@dataclass(frozen=True)
class Sample:
    """One training example: which slice's embedding, a box prompt and the target, in the model frame.

    Attributes:
        slice_key: the embedding cache key of the slice.
        box: ``(x0, y0, x1, y1)`` in the 256×256 model frame.
        target: ``[256, 256]`` bool mask in the model frame (may be empty for ``neighbour`` samples).
        valid: ``[256, 256]`` bool, the part of the frame that is image (not padding).
        kind: one of ``PROMPT_KINDS``.
        mask_prompt: ``[256, 256]`` float 0-1 mask in the model frame given as SAM's dense mask
            prompt (the neighbour's tumour, for ``neighbour`` samples drawn with ``mask_prompts``),
            or None.
        shrunk: ``[S, 4]`` the box shrunk as ``SliceSegmenter.segment`` shrinks it
            (``shrunk_boxes``, model frame), or None: training then averages the logits of ``box``
            and these, as inference does.
    """

    slice_key: str
    box: np.ndarray
    target: np.ndarray
    valid: np.ndarray
    kind: str
    mask_prompt: np.ndarray | None = None
    shrunk: np.ndarray | None = None


@dataclass
class SliceItem:
    """A slice ready for sampling: its embedding key, frame and tumour mask (pixels of the slice)."""

    key: str
    frame: ModelFrame
    mask: np.ndarray
    above: np.ndarray | None = None
    below: np.ndarray | None = None


@dataclass
class TrainingReport:
    """What ``train_litemedsam`` did, for logs and the model registry."""

    samples: int
    epochs: int
    steps: int
    losses: list[float] = field(default_factory=list)


def box_of(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def prompt_box(mask: np.ndarray, kind: str, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray | None:
    """A box (slice pixels) an annotator of this ``kind`` would draw around ``mask``, clipped to the slice."""
    box = box_of(mask)
    if box is None:
        return None
    if kind == "tight":
        box = box + np.array([-5, -5, 5, 5], np.float32)
    elif kind == "loose":
        box = box + np.array([-10, -10, 10, 10], np.float32) + rng.uniform(-5, 5, 4).astype(np.float32)
    elif kind == "neighbour":
        box = box + np.array([-1, -1, 1, 1], np.float32) * rng.uniform(1, 5)
    else:
        raise ValueError(f"unknown prompt kind {kind!r}; expected one of {PROMPT_KINDS}")
    height, width = shape
    box = np.clip(box, 0, [width - 1, height - 1, width - 1, height - 1]).astype(np.float32)
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    return box


def jitter_outline(mask: np.ndarray, rng: np.random.Generator, max_px: int = 2) -> np.ndarray:
    """``mask`` grown or shrunk by up to ``max_px`` pixels: a previous slice's *predicted* outline is
    never the truth, so a decoder that learns to follow the neighbour's mask must not learn to copy it."""
    radius = int(rng.integers(-max_px, max_px + 1))
    if radius == 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * abs(radius) + 1, 2 * abs(radius) + 1))
    operation = cv2.dilate if radius > 0 else cv2.erode
    moved = operation(mask.astype(np.uint8), kernel) > 0
    return moved if moved.any() else mask


def make_samples(
    items: Iterable[SliceItem],
    rng: np.random.Generator,
    kinds: Sequence[str] = PROMPT_KINDS,
    mask_prompts: bool = False,
    box_shrinks: Sequence[float] = (),
) -> list[Sample]:
    """Draw one sample per slice and kind (``neighbour``: one per existing neighbour with a tumour).

    With ``mask_prompts``, ``neighbour`` samples also carry the neighbour's outline (jittered by
    ``jitter_outline``) as a dense mask prompt, as ``propagate`` gives it with
    ``PropagationSettings.mask_prompt``. Measured (5-fold CV, CPU recipe): propagation fell from 0.788
    to 0.733 mean volume Dice, so the default recipe leaves it out.

    With ``box_shrinks`` (slice pixels, as ``DEFAULT_BOX_SHRINKS_PX``), ``tight`` and ``loose``
    samples also carry their box shrunk by each amount, so that the decoder is trained on the
    averaged logits ``SliceSegmenter.segment`` gives it; ``neighbour`` samples keep one box, as
    ``propagate`` does.
    """
    samples = []
    for item in items:
        frame = item.frame
        target = frame.mask_to_model(item.mask) >= 0.5
        valid = frame.mask_to_model(np.ones_like(item.mask)) >= 0.5
        shape = item.mask.shape
        area = int(item.mask.sum())
        prompts: list[tuple[str, np.ndarray | None, np.ndarray | None]] = []
        if area >= DEFAULT_MIN_AREA_PX:
            prompts += [
                (kind, prompt_box(item.mask, kind, rng, shape), None) for kind in kinds if kind != "neighbour"
            ]
        if "neighbour" in kinds:
            for neighbour in (item.above, item.below):
                if neighbour is not None and int(neighbour.sum()) >= DEFAULT_MIN_AREA_PX:
                    outline = frame.mask_to_model(jitter_outline(neighbour, rng)) if mask_prompts else None
                    prompts.append(("neighbour", prompt_box(neighbour, "neighbour", rng, shape), outline))
        for kind, box, outline in prompts:
            if box is None:
                continue
            shrunk = None
            if box_shrinks and kind != "neighbour":
                shrunk = frame.to_model(shrunk_boxes(box, box_shrinks)[1:])
            samples.append(Sample(item.key, frame.to_model(box), target, valid, kind, outline, shrunk))
    return samples


def batch_mask_prompts(batch: Sequence[Sample], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The batch's dense mask prompts as model logits ``[B, 1, 256, 256]`` and which samples have
    one (bool ``[B]``), or None when none has."""
    if not any(sample.mask_prompt is not None for sample in batch):
        return None
    zeros = np.zeros((256, 256), np.float32)
    masks = np.stack([zeros if s.mask_prompt is None else s.mask_prompt for s in batch])[:, None]
    has_mask = torch.tensor([s.mask_prompt is not None for s in batch], device=device)
    return mask_prompt_logits(torch.from_numpy(masks).to(device)), has_mask


def batch_boxes(batch: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """``[B, K, 4]`` boxes and ``[B]`` counts: each sample's box, then its ``shrunk`` boxes, then
    padding (copies of its box) up to the batch's largest K; ``decode_batch`` decodes only the first
    ``count`` of each row, so one-box samples in a batch with shrunk ones cost one decode."""
    counts = np.array([1 + (0 if s.shrunk is None else len(s.shrunk)) for s in batch])
    rows = []
    for sample, count in zip(batch, counts, strict=True):
        boxes = [sample.box] + ([] if sample.shrunk is None else list(sample.shrunk))
        rows.append(np.stack(boxes + [sample.box] * (int(counts.max()) - count)))
    return np.stack(rows).astype(np.float32), counts


def decode_batch(
    model: LiteMedSAM,
    embeddings: torch.Tensor,
    boxes: torch.Tensor,
    mask_prompts: tuple[torch.Tensor, torch.Tensor] | None = None,
    counts: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, 1, 256, 256]`` and IoU ``[B, 1]`` for B slices (with gradients), with the dense
    mask prompts of ``batch_mask_prompts`` if given.

    ``boxes`` is ``[B, 4]``, or ``[B, K, 4]`` with ``counts`` (``batch_boxes``): each slice's logits
    (and IoU) are then the mean over its first ``count`` boxes, as ``SliceSegmenter.segment`` averages
    a box and its shrunk boxes.
    """
    if boxes.dim() == 2:
        boxes = boxes[:, None]
    b, k = boxes.shape[:2]
    counts = torch.as_tensor(k if counts is None else counts, device=boxes.device).expand(b)
    used = torch.arange(k, device=boxes.device)[None] < counts[:, None]
    owner, flat = used.nonzero()[:, 0], boxes[used]
    extra = {}
    if mask_prompts is not None:
        extra = {"mask_logits": mask_prompts[0][owner], "has_mask": mask_prompts[1][owner]}
    logits, iou = model.decode_many(embeddings[owner], flat, **extra)
    if len(owner) == b:
        return logits, iou
    logits, iou = logits.float(), iou.float()  # under CUDA autocast some come back in bfloat16, some not
    scale = 1 / counts.to(logits.dtype)
    mean_logits = logits.new_zeros((b, *logits.shape[1:])).index_add(0, owner, logits * scale[owner, None, None, None])
    return mean_logits, iou.new_zeros((b, iou.shape[1])).index_add(0, owner, iou * scale[owner, None])


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy + soft Dice over the image part of the frame, and the hard IoU per sample.

    The Dice term has a smoothing of 1 so that an empty target (past the tumour's end) asks for an
    empty prediction rather than dividing by zero.
    """
    probs = torch.sigmoid(logits) * valid
    bce = functional.binary_cross_entropy_with_logits(logits, target, weight=valid, reduction="sum") / valid.sum()
    inter = (probs * target).sum(dim=(1, 2, 3))
    dice = 1 - (2 * inter + 1) / (probs.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    with torch.no_grad():
        hard = (logits > 0) & (valid > 0)
        inter_h = (hard & (target > 0)).sum(dim=(1, 2, 3)).float()
        union = (hard | (target > 0)).sum(dim=(1, 2, 3)).float()
        iou = torch.where(union > 0, inter_h / union.clamp(min=1), torch.ones_like(union))
    return bce + dice.mean(), iou


TRAINABLE_PREFIXES = {
    "decoder": ("prompt_encoder.", "mask_decoder."),
    "encoder": ("image_encoder.",),
    "neck": ("image_encoder.neck.",),
}
"""State-dict prefixes of what fine-tuning may change: always the decoder side, optionally the encoder
(all of it, on a GPU) or only its neck (``train_neck``, on a CPU)."""

NECK_INPUT_SHAPE = (320, 64, 64)
"""TinyViT's last stage output, the neck's input: what ``neck_inputs`` caches per slice."""


def trainable_prefixes(encoder: bool = False, neck: bool = False) -> tuple[str, ...]:
    """What learns, as state-dict prefixes: the decoder side, plus the whole encoder or only its neck;
    the one place that training and saving agree on it."""
    extra = TRAINABLE_PREFIXES["encoder"] if encoder else TRAINABLE_PREFIXES["neck"] if neck else ()
    return TRAINABLE_PREFIXES["decoder"] + extra


def trainable_state(
    model: LiteMedSAM, include_encoder: bool = False, include_neck: bool = False
) -> dict[str, torch.Tensor]:
    """The parameters fine-tuning changes (prompt encoder, mask decoder and, if asked, image encoder
    or only its neck)."""
    prefixes = trainable_prefixes(include_encoder, include_neck)
    state = model.state_dict()
    return {name: value.detach().cpu().clone() for name, value in state.items() if name.startswith(prefixes)}


def neck_inputs(model: LiteMedSAM, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(neck inputs [B, 320, 64, 64], embeddings [B, 256, 64, 64])`` of network inputs ``[B, 3, 256, 256]``.

    One encoder pass gives both: ``train_neck`` trains on the first, while the frozen encoder's
    embeddings serve everything else (the decoder-only recipe, the base model's figures).
    """
    captured: list[torch.Tensor] = []
    handle = model.image_encoder.neck.register_forward_pre_hook(
        lambda _module, args: captured.append(args[0].detach().float().contiguous())
    )
    try:
        with torch.inference_mode():
            embeddings = model.embed(images)
    finally:
        handle.remove()
    return captured[0], embeddings


def augment_batch(
    images: torch.Tensor,
    boxes: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    rng: np.random.Generator,
    mask_prompts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Left-right flips and gamma changes of a batch (only when the image encoder is trained).

    A flip mirrors the image part of the frame (the padding stays at the right, as at inference)
    and the box with it; gamma in [0.7, 1.4] mimics other scanners' contrast. Why these two only:
    limbs are imaged left and right, while up-down flips or rotations would show anatomy upside
    down that no annotator ever sees. Dense mask prompts (``batch_mask_prompts``) flip with their image.
    """
    images, boxes, target = images.clone(), boxes.clone(), target.clone()
    prompt_logits = None
    if mask_prompts is not None:  # flipped in place below, so the returned pair holds the flips
        prompt_logits = mask_prompts[0].clone()
        mask_prompts = (prompt_logits, mask_prompts[1])
    widths = valid[:, 0].amax(dim=1).sum(dim=1).long()  # the image part's width per sample
    for i in range(images.shape[0]):
        if rng.random() < 0.5:
            w = int(widths[i])
            images[i, :, :w] = images[i, :, :w].flip(-1)
            target[i, :, :, :w] = target[i, :, :, :w].flip(-1)
            if prompt_logits is not None:
                prompt_logits[i, :, :, :w] = prompt_logits[i, :, :, :w].flip(-1)
            x0 = boxes[i, ..., 0].clone()  # [4] or [K, 4] (batch_boxes)
            boxes[i, ..., 0] = w - boxes[i, ..., 2]
            boxes[i, ..., 2] = w - x0
        gamma = float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
        images[i] = images[i].clamp(min=0) ** gamma
    return images, boxes, target, mask_prompts


def train_litemedsam(
    model: LiteMedSAM,
    samples: Sequence[Sample] | Callable[[np.random.Generator], Sequence[Sample]],
    inputs: dict[str, torch.Tensor],
    *,
    train_encoder: bool = False,
    train_neck: bool = False,
    epochs: int = 4,
    batch_size: int = 16,
    lr: float = 5e-5,
    encoder_lr: float | None = None,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: Any = None,
) -> TrainingReport:
    """Fine-tune ``model`` in place (AdamW, cosine decay): the decoder side, and the encoder if asked.

    Decoder only (CPU-friendly): ``inputs`` maps each slice key to its cached embedding
    ``[1, 256, 64, 64]``, computed once by the frozen encoder. With ``train_encoder`` (a GPU job):
    ``inputs`` maps each slice key to its network input ``[256, 256]`` (``preprocess_slice``), the
    encoder runs on every batch (bfloat16 autocast on CUDA) and the batch is augmented
    (``augment_batch``), since the encoder can otherwise memorise 20 patients' slices. With
    ``train_neck`` (CPU-friendly): ``inputs`` maps each slice key to the frozen TinyViT stages' output
    ``[320, 64, 64]`` (``neck_inputs``) and only the encoder's neck (0.67 M parameters: two
    convolutions and two layer norms) learns with the decoder, from cached inputs instead of the
    encoder's 0.7-1 s per slice (a step of 8: 1.7 s on two cores, 1.0 s for the decoder alone).

    Args:
        model: a trainable LiteMedSAM (NOT the cached instance from ``load_litemedsam``: copy it).
        samples: from ``make_samples``, or a callable drawing fresh ones (new box jitter) per epoch.
        inputs: see above.
        encoder_lr: the image encoder's learning rate (default ``lr / 4``: it moves more slowly).
        progress: optional callable ``(step, total, loss)`` for a progress bar.
    """
    if train_encoder and train_neck:
        raise ValueError("train_encoder trains the neck too: ask for one of train_encoder and train_neck")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    draw = samples if callable(samples) else (lambda _rng: samples)
    prefixes = trainable_prefixes(train_encoder, train_neck)
    model.requires_grad_(False)
    groups: dict[str, list[torch.nn.Parameter]] = {"decoder": [], "encoder": []}
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(True)
            groups["encoder" if name.startswith("image_encoder.") else "decoder"].append(param)
    model.prompt_encoder.train()
    model.mask_decoder.train()
    model.image_encoder.train(train_encoder)
    model.image_encoder.neck.train(train_encoder or train_neck)
    param_groups = [{"params": groups["decoder"], "lr": lr}]
    if train_encoder or train_neck:
        param_groups.append({"params": groups["encoder"], "lr": encoder_lr if encoder_lr is not None else lr / 4})
    optimiser = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    first = list(draw(rng))
    steps_per_epoch = max(1, int(np.ceil(len(first) / batch_size)))
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total)
    device = model.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    report = TrainingReport(samples=len(first), epochs=epochs, steps=total)
    step = 0
    for epoch in range(epochs):
        drawn = first if epoch == 0 else list(draw(rng))
        order = rng.permutation(len(drawn))[: steps_per_epoch * batch_size]
        for start in range(0, len(order), batch_size):
            if step >= total:
                break
            batch = [drawn[i] for i in order[start : start + batch_size]]
            box_array, counts = batch_boxes(batch)
            boxes = torch.from_numpy(box_array).to(device)
            target = torch.from_numpy(np.stack([s.target for s in batch])[:, None].astype(np.float32)).to(device)
            valid = torch.from_numpy(np.stack([s.valid for s in batch])[:, None].astype(np.float32)).to(device)
            mask_prompts = batch_mask_prompts(batch, device)
            with autocast:
                if train_encoder:
                    images = torch.stack([inputs[s.slice_key].reshape(256, 256) for s in batch])
                    images = images.to(device, torch.float32)
                    images, boxes, target, mask_prompts = augment_batch(
                        images, boxes, target, valid, rng, mask_prompts
                    )
                    emb = model.image_encoder(images[:, None].expand(-1, 3, -1, -1))
                elif train_neck:
                    features = torch.cat([inputs[s.slice_key].reshape(1, *NECK_INPUT_SHAPE) for s in batch])
                    emb = model.image_encoder.neck(features.to(device, torch.float32))
                else:
                    emb = torch.cat([inputs[s.slice_key].reshape(1, 256, 64, 64) for s in batch])
                    emb = emb.to(device, torch.float32)
                logits, iou_pred = decode_batch(model, emb, boxes, mask_prompts, counts)
            logits, iou_pred = logits.float(), iou_pred.float()
            loss, iou = segmentation_loss(logits, target, valid)
            loss = loss + functional.mse_loss(iou_pred[:, 0], iou.to(iou_pred.dtype))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            step += 1
            report.losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, total, report.losses[-1])
    model.eval().requires_grad_(False)
    return report


def save_finetuned(
    model: LiteMedSAM,
    path: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    include_encoder: bool = False,
    include_neck: bool = False,
) -> Path:
    """Write the fine-tuned weights to ``path`` atomically (temp file, rename).

    The file holds the prompt encoder and mask decoder (and, with ``include_encoder``, the image
    encoder, or with ``include_neck`` its neck: either way the embedding cache is keyed anew) plus
    the base weights' SHA-256, so that
    ``load_litemedsam(finetuned_path=...)`` refuses it over any other base.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "base_sha256": model.weights_sha256,
        "state": trainable_state(model, include_encoder, include_neck),
        "metadata": metadata or {},
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
