"""Model definitions and loading: what a worker process keeps resident.

Only LiteMedSAM so far (box/point-prompted 2-D segmentation); see ``litemedsam``.
"""

from workers.models.litemedsam import (
    DEFAULT_IMAGE_SIZE,
    LITEMEDSAM_SHA256,
    DecoderEnsemble,
    LiteMedSAM,
    ModelFrame,
    WeightsError,
    build_litemedsam,
    litemedsam_weights_path,
    load_litemedsam,
    pick_device,
    preprocess_slice,
)

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "LITEMEDSAM_SHA256",
    "DecoderEnsemble",
    "LiteMedSAM",
    "ModelFrame",
    "WeightsError",
    "build_litemedsam",
    "litemedsam_weights_path",
    "load_litemedsam",
    "pick_device",
    "preprocess_slice",
]
