"""Fine-tuning LiteMedSAM's prompt encoder and mask decoder on our own annotations.

Why only those two: the image encoder (TinyViT, ~95 % of the compute) stays frozen, so its
embeddings can be computed once, cached on disk (``DiskEmbeddingCache``) and reused by every epoch,
every cross-validation fold and the live workers alike; training then fits on CPU. What is learnt
is how boxes drawn by *our* annotators relate to *our* tumours:

- ``tight``: the mask's box + 5 px (a careful annotator);
- ``loose``: the mask's box + 10 px, each side moved by up to ±5 px (a quick one);
- ``neighbour``: the box of the tumour on the adjacent slice (+ a small margin), with the target
  being this slice's tumour, *empty when the tumour has ended*. This is what propagation asks
  (``workers.segmentation.propagate``) and it teaches the decoder to answer "nothing here" past
  the tumour's end instead of outlining the nearest structure.

The weights are saved as a small checkpoint (prompt encoder + mask decoder state, ~16 MB) named by its
SHA-256; ``load_litemedsam(decoder_path=...)`` applies it over the pinned base weights.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from workers.models.litemedsam import LiteMedSAM, ModelFrame

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
    """

    slice_key: str
    box: np.ndarray
    target: np.ndarray
    valid: np.ndarray
    kind: str


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
    """What ``train_decoder`` did, for logs and the model registry."""

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


def make_samples(
    items: Iterable[SliceItem], rng: np.random.Generator, kinds: Sequence[str] = PROMPT_KINDS
) -> list[Sample]:
    """Draw one sample per slice and kind (``neighbour``: one per existing neighbour with a tumour)."""
    samples = []
    for item in items:
        frame = item.frame
        target = frame.mask_to_model(item.mask) >= 0.5
        valid = frame.mask_to_model(np.ones_like(item.mask)) >= 0.5
        shape = item.mask.shape
        area = int(item.mask.sum())
        prompts: list[tuple[str, np.ndarray | None]] = []
        if area >= DEFAULT_MIN_AREA_PX:
            prompts += [(kind, prompt_box(item.mask, kind, rng, shape)) for kind in kinds if kind != "neighbour"]
        if "neighbour" in kinds:
            for neighbour in (item.above, item.below):
                if neighbour is not None and int(neighbour.sum()) >= DEFAULT_MIN_AREA_PX:
                    prompts.append(("neighbour", prompt_box(neighbour, "neighbour", rng, shape)))
        for kind, box in prompts:
            if box is not None:
                samples.append(Sample(item.key, frame.to_model(box), target, valid, kind))
    return samples


def decode_batch(model: LiteMedSAM, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, 1, 256, 256]`` and IoU ``[B, 1]`` for B slices with one box each.

    ``segment_anything``'s ``MaskDecoder.predict_masks`` repeats ONE image embedding for every
    prompt; training needs B different slices per batch, so this is its body with the embedding
    taken as it is (adapted from segment_anything 1.0, Apache-2.0).
    """
    decoder = model.mask_decoder
    sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    src = embeddings + dense
    pos_src = model.prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_token_out = hs[:, 1, :]  # the single-mask output (multimask_output=False)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = decoder.output_hypernetworks_mlps[0](mask_token_out)[:, None]
    b, c, h, w = upscaled.shape
    masks = (hyper @ upscaled.view(b, c, h * w)).view(b, 1, h, w)
    iou = decoder.iou_prediction_head(iou_token_out)[:, :1]
    return masks, iou


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


def trainable_state(model: LiteMedSAM) -> dict[str, torch.Tensor]:
    """The prompt encoder's and mask decoder's parameters (what fine-tuning changes)."""
    return {
        name: value.detach().cpu().clone()
        for name, value in model.state_dict().items()
        if name.startswith(("prompt_encoder.", "mask_decoder."))
    }


def train_decoder(
    model: LiteMedSAM,
    samples: Sequence[Sample],
    embeddings: dict[str, torch.Tensor],
    *,
    epochs: int = 4,
    batch_size: int = 16,
    lr: float = 5e-5,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: Any = None,
) -> TrainingReport:
    """Fine-tune ``model``'s prompt encoder and mask decoder in place (AdamW, cosine decay).

    Args:
        model: a trainable LiteMedSAM (NOT the cached instance from ``load_litemedsam``: copy it).
        samples: from ``make_samples``.
        embeddings: slice key → float16/32 embedding ``[1, 256, 64, 64]`` for every sample's slice.
        progress: optional callable ``(step, total, loss)`` for a progress bar.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for n, p in model.named_parameters() if n.startswith(("prompt_encoder.", "mask_decoder."))]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.prompt_encoder.train()
    model.mask_decoder.train()
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, int(np.ceil(len(samples) / batch_size)))
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total)
    device = model.device
    report = TrainingReport(samples=len(samples), epochs=epochs, steps=total)
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(samples))
        for start in range(0, len(order), batch_size):
            batch = [samples[i] for i in order[start : start + batch_size]]
            emb = torch.cat([embeddings[s.slice_key].reshape(1, 256, 64, 64) for s in batch]).to(device, torch.float32)
            boxes = torch.from_numpy(np.stack([s.box for s in batch])).to(device)
            target = torch.from_numpy(np.stack([s.target for s in batch])[:, None].astype(np.float32)).to(device)
            valid = torch.from_numpy(np.stack([s.valid for s in batch])[:, None].astype(np.float32)).to(device)
            logits, iou_pred = decode_batch(model, emb, boxes)
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


def save_decoder(model: LiteMedSAM, path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
    """Write the fine-tuned prompt encoder + mask decoder to ``path`` atomically (temp file, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"base_sha256": model.weights_sha256, "state": trainable_state(model), "metadata": metadata or {}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
