"""Zero-shot scores from embeddings: P(positive) of (negative, positive) prompt pairs.

For one pair, colipri's ``Model.classify`` takes the softmax of the two cosine
similarities divided by the checkpoint's temperature; P(positive) is therefore
``sigmoid((s_pos - s_neg) / T)``. Here all pairs are scored with one matrix product,
for the pooled embedding or for every patch of the dense grid.
"""

from __future__ import annotations

import numpy as np


def pair_logits(image_embeddings, negatives, positives, temperature: float):
    """Positive-minus-negative logits.

    Args:
        image_embeddings: (embed_dim,) pooled or (embed_dim, gx, gy, gz) dense, L2-normalised.
        negatives: (num_pairs, embed_dim) L2-normalised negative prompt embeddings.
        positives: (num_pairs, embed_dim) matching positive prompt embeddings.
        temperature: the checkpoint's ``softmax_temperature``.

    Returns:
        (num_pairs,) or (num_pairs, gx, gy, gz) float32 tensor.
    """
    if negatives.shape != positives.shape:
        raise ValueError(f"Negative and positive prompts differ in shape: {tuple(negatives.shape)} vs {tuple(positives.shape)}.")
    if image_embeddings.shape[0] != negatives.shape[1]:
        message = f"Image embedding size {image_embeddings.shape[0]} != text embedding size {negatives.shape[1]}."
        raise ValueError(message)
    difference = (positives - negatives).float()
    flat = image_embeddings.float().reshape(image_embeddings.shape[0], -1)
    logits = (difference @ flat) / float(temperature)
    return logits.reshape(negatives.shape[0], *image_embeddings.shape[1:])


def pair_probabilities(image_embedding, negatives, positives, temperature: float) -> np.ndarray:
    """(num_pairs,) P(positive) for a pooled (embed_dim,) image embedding."""
    import torch

    two_way = torch.stack([negatives @ image_embedding.float(), positives @ image_embedding.float()], dim=-1)
    return (two_way / float(temperature)).softmax(dim=-1)[:, 1].numpy().astype(np.float64)
