"""One image forward pass -> pooled embedding, dense patch embeddings and backbone features."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from COLIPRISlicerLib.geometry import PatchGrid

if TYPE_CHECKING:
    from COLIPRISlicerLib.model.loading import LoadedModel
    from COLIPRISlicerLib.types import TypeBackboneFeatures, TypeModelInput, TypePatchEmbeddings, TypePooledEmbedding

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageEncoding:
    """Everything later steps need from one volume; all tensors float32 on the CPU.

    Attributes:
        pooled: (embed_dim,) L2-normalised attention-pooled embedding (colipri's
            ``encode_image(pool=True, project=True, normalize=True)``).
        dense: (embed_dim, gx, gy, gz) L2-normalised per-patch embeddings in the joint
            space (the pool's value/out projections applied per patch).
        features: (backbone_dim, gx, gy, gz) backbone output before projection
            (the segmentation head's input).
        image: (1, X, Y, Z) the preprocessed model input (the segmentation head's skip).
        grid: where the patches lie in RAS.
        cropped_mm: anatomy cut away by the model's field of view, per axis.
        key: the cache key this encoding is stored under.
    """

    pooled: TypePooledEmbedding
    dense: TypePatchEmbeddings
    features: TypeBackboneFeatures
    image: TypeModelInput
    grid: PatchGrid
    cropped_mm: tuple[float, float, float]
    key: str
    encode_seconds: float = 0.0


def run_image_encoder(loaded: LoadedModel, tensor, *, precision: str):
    """Backbone once, then the pooled and the dense heads.

    Args:
        loaded: a ``LoadedModel``.
        tensor: (1, X, Y, Z) float32 model input.
        precision: ``bf16`` runs the image encoder under autocast; ``fp32`` does not.

    Returns:
        ``(pooled (D,), dense (D, gx, gy, gz), features (C, gx, gy, gz), seconds)``.
    """
    pooled, dense, features, seconds = run_image_encoder_batch(loaded, [tensor], precision=precision)
    return pooled[0], dense[0], features[0], seconds


def run_image_encoder_batch(loaded: LoadedModel, tensors, *, precision: str):
    """One forward pass over several model inputs of one shape (see :func:`run_image_encoder`).

    Args:
        loaded: a ``LoadedModel``.
        tensors: sequence of (1, X, Y, Z) float32 model inputs, all the same shape.
        precision: ``bf16`` runs the image encoder under autocast; ``fp32`` does not.

    Returns:
        ``(pooled (B, D), dense (B, D, gx, gy, gz), features (B, C, gx, gy, gz), seconds)``, on the CPU.
    """
    import torch
    import torch.nn.functional as F
    from einops import rearrange

    encoder = loaded.model.image_encoder
    device = next(encoder.parameters()).device
    batch = torch.stack([tensor.to(device) for tensor in tensors])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        features = encoder.encode(batch)
        projected = encoder.projector(features)
        pooled = encoder.pooler(rearrange(projected, "b c x y z -> b (x y z) c"))
        dense = loaded.dense_pooler(projected)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: time the work, not its launch
    seconds = time.perf_counter() - start
    pooled = F.normalize(pooled.float(), dim=1).cpu()
    dense = F.normalize(dense.float(), dim=1).cpu()
    logger.debug("Image forward pass of %d input(s) %.2f s on %s (%s).", len(tensors), seconds, device, precision)
    return pooled, dense, features.float().cpu(), seconds
