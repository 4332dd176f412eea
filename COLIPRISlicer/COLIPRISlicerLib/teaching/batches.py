"""The training phantoms as tensors on the training device, cut into (augmented) batches.

On a GPU the whole training set lives on the device once (float16 images, bit-packed masks:
about 13 MB a phantom on the 2.5 mm grid), so a batch costs no host-to-device copy and its
augmentation runs where the model does. Shapes: ``N`` phantoms, ``B`` a batch, ``F`` planted
findings, ``(X, Y, Z)`` the model grid, ``(gx, gy, gz)`` the patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from COLIPRISlicerLib.teaching.augmentation import Augmentation, augment_batch

#: Bit weights of :func:`numpy.packbits`' default (big-endian) order.
_BITS = (128, 64, 32, 16, 8, 4, 2, 1)


@dataclass
class TrainingTensors:
    """Every training phantom's arrays, stacked on one device.

    Attributes:
        images: (N, 1, X, Y, Z) float16 model inputs.
        packed_masks: (N, F, X, Y, ceil(Z / 8)) uint8 model-grid masks, bits packed along Z.
        labels: (N, 18) float32 CT-RATE labels.
        fractions: (N, F, gx, gy, gz) float32 share of each patch inside each finding's mask.
    """

    images: torch.Tensor
    packed_masks: torch.Tensor
    labels: torch.Tensor
    fractions: torch.Tensor

    @classmethod
    def from_samples(cls, samples: list, device: torch.device | str = "cpu") -> TrainingTensors:
        """Stack :class:`.dataset.PhantomSample` arrays onto ``device``."""
        return cls(torch.stack([sample.image for sample in samples]).to(device, torch.float16),
                   torch.from_numpy(np.stack([sample.model_masks for sample in samples])).to(device),
                   torch.from_numpy(np.stack([sample.labels for sample in samples])).to(device),
                   torch.from_numpy(np.stack([sample.patch_fractions for sample in samples]).astype(np.float32))
                   .to(device))

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: list[int], patch_size: tuple[int, int, int], augmentation: Augmentation | None,
              generator: torch.Generator, noise_generator: torch.Generator | None = None):
        """(B, 1, X, Y, Z) float32 images, (B, 18) labels and (B, F, gx*gy*gz) patch fractions of
        the phantoms at ``indices``, shifted and noised by :func:`.augmentation.augment_batch`
        unless ``augmentation`` is None. ``generator`` (CPU) draws the shifts, ``noise_generator``
        (on this device; default ``generator``) the noise."""
        index = torch.as_tensor(indices, device=self.device)
        images, labels = self.images[index].float(), self.labels[index]
        if augmentation is None:
            return images, labels, self.fractions[index].flatten(2)
        masks = unpack_bits(self.packed_masks[index], images.shape[-1])
        images, fractions = augment_batch(images, masks, patch_size, augmentation, generator, noise_generator)
        return images, labels, fractions


def unpack_bits(packed: torch.Tensor, depth: int) -> torch.Tensor:
    """Torch form of :func:`.augmentation.unpack_masks` on any device: (..., ceil(depth / 8))
    uint8 -> (..., depth) bool."""
    bits = torch.tensor(_BITS, dtype=torch.uint8, device=packed.device)
    return (packed.unsqueeze(-1) & bits).ne(0).flatten(-2)[..., :depth]
