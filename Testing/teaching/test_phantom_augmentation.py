"""Image-phase augmentation: whole-voxel shifts move image and dense targets together, noise is bounded."""

from __future__ import annotations

import numpy as np
import torch

from COLIPRISlicerLib.teaching.augmentation import (
    AIR,
    Augmentation,
    augment_batch,
    pack_masks,
    shift_volume,
    unpack_masks,
)


def test_packing_round_trips_a_depth_that_is_not_a_multiple_of_eight():
    masks = np.random.default_rng(0).random((3, 5, 4, 13)) > 0.7
    assert np.array_equal(unpack_masks(pack_masks(masks), 13), masks)


def test_a_shift_moves_every_voxel_by_whole_voxels_and_fills_what_enters():
    volume = torch.arange(2 * 6 * 5 * 4, dtype=torch.float32).reshape(2, 6, 5, 4)
    moved = shift_volume(volume, (2, -1, 0), fill=-7.0)
    assert torch.equal(moved[:, 2:, :4, :], volume[:, :4, 1:, :])
    assert (moved[:, :2] == -7.0).all() and (moved[:, :, 4] == -7.0).all()
    assert (shift_volume(volume, (0, 5, 0), fill=0.5) == 0.5).all()
    assert torch.equal(shift_volume(volume, (0, 0, 0), fill=0.0), volume)


def test_dense_targets_follow_the_shifted_image():
    """A bright cube with its mask, shifted: the fractions are the patch means of the shifted cube."""
    image = torch.full((1, 1, 16, 16, 16), AIR)
    image[0, 0, 4:8, 4:8, 4:8] = 1.0
    masks = torch.zeros(1, 2, 16, 16, 16, dtype=torch.bool)
    masks[0, 1] = image[0, 0] > 0
    generator = torch.Generator().manual_seed(5)
    images, fractions = augment_batch(image, masks, (8, 8, 8), Augmentation(max_shift_voxels=3, max_noise=0.0),
                                      generator)
    shift = [int(np.argmax(images[0, 0].amax(dim=tuple(d for d in range(3) if d != axis)).numpy() > 0)) - 4
             for axis in range(3)]
    assert any(shift) and all(abs(step) <= 3 for step in shift)
    assert int((images > 0).sum()) == 64  # the cube never leaves the field here (4 + 3 + 4 <= 16)
    bright = (images[0, 0] > 0).float().reshape(2, 8, 2, 8, 2, 8).mean(dim=(1, 3, 5))
    assert fractions.shape == (1, 2, 8)
    torch.testing.assert_close(fractions[0, 1], bright.flatten())
    assert not fractions[0, 0].any()


def test_noise_is_bounded_reproducible_and_leaves_the_targets_alone(phantom_sample, tiny_loaded):
    images = phantom_sample.image[None].float()
    masks = torch.from_numpy(unpack_masks(phantom_sample.model_masks, images.shape[-1]))[None]
    augmentation = Augmentation(max_shift_voxels=0, max_noise=0.02)
    first = augment_batch(images, masks, tiny_loaded.patch_size, augmentation, torch.Generator().manual_seed(1))
    again = augment_batch(images, masks, tiny_loaded.patch_size, augmentation, torch.Generator().manual_seed(1))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    difference = (first[0] - images)[(images > -0.9) & (images < 0.9)]
    assert 0.0 < float(difference.std()) <= 0.02 * 1.05
    assert first[0].min() >= -1.0 and first[0].max() <= 1.0
    expected = torch.from_numpy(phantom_sample.patch_fractions.astype(np.float32)).flatten(1)
    torch.testing.assert_close(first[1][0], expected, atol=1e-3, rtol=0)


def test_no_augmentation_is_the_identity(phantom_sample, tiny_loaded):
    images = phantom_sample.image[None].float()
    masks = torch.from_numpy(unpack_masks(phantom_sample.model_masks, images.shape[-1]))[None]
    augmented, fractions = augment_batch(images, masks, tiny_loaded.patch_size, Augmentation(0, 0.0), torch.Generator())
    assert torch.equal(augmented, images)
    expected = torch.from_numpy(phantom_sample.patch_fractions.astype(np.float32)).flatten(1)
    torch.testing.assert_close(fractions[0], expected, atol=1e-3, rtol=0)


def test_training_batches_are_augmented_unless_the_config_says_none(phantom_sample, tiny_loaded):
    from COLIPRISlicerLib.teaching.batches import TrainingTensors

    tensors, size = TrainingTensors.from_samples([phantom_sample, phantom_sample]), tiny_loaded.patch_size
    plain = tensors.batch([0, 1], size, None, torch.Generator())
    assert torch.equal(plain[0], torch.stack([phantom_sample.image, phantom_sample.image]).float())
    still = tensors.batch([0, 1], size, Augmentation(0, 0.0), torch.Generator())
    assert torch.equal(still[0], plain[0]) and torch.equal(still[1], plain[1])
    torch.testing.assert_close(still[2], plain[2], atol=1e-3, rtol=0)
    moved = tensors.batch([0, 1], size, Augmentation(), torch.Generator().manual_seed(2))
    assert not torch.equal(moved[0][0], moved[0][1])  # each phantom of a batch gets its own view
    assert torch.equal(moved[1], plain[1])


def test_torch_bit_unpacking_equals_numpy_on_the_packed_training_masks(phantom_sample):
    from COLIPRISlicerLib.teaching.batches import unpack_bits

    depth = phantom_sample.image.shape[-1]
    expected = unpack_masks(phantom_sample.model_masks, depth)
    unpacked = unpack_bits(torch.from_numpy(phantom_sample.model_masks), depth)
    assert expected.any() and np.array_equal(unpacked.numpy(), expected)
