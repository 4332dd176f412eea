"""Losses of the teaching model, each the training form of what the engine computes at inference.

- :func:`pooled_pair_loss`: per (negative, positive) catalogue prompt pair, binary cross entropy
  on ``(s_pos - s_neg) / T`` of the pooled embedding (the zero-shot likelihood, exactly as
  :mod:`.zero_shot` scores it).
- :func:`dense_pair_loss`: the same logit per patch of the dense grid against "this patch
  holds the finding" (mask fraction >= ``DENSE_MIN_FRACTION``), balanced per finding: the heatmaps.
- :func:`focus_loss`: the attention pool's heads look at every present finding.
- :func:`snippet_loss`: RadFinder's loss on the engine's zero-shot depth profile (top-k mean
  of snippet-patch cosine similarities per level, softmax over levels with the checkpoint
  temperature) against a one-hot target at the snippet's level blurred by 24 mm.
- :func:`report_loss`: symmetric InfoNCE between pooled images and their reports (CLIP).

Shapes: ``B`` phantoms, ``N = gx*gy*gz`` patches, ``D`` joint embedding size, ``P`` prompt pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

#: A patch is positive for a finding when at least this share of it lies in the finding's mask:
#: with 8^3 patches (fractions are multiples of 1/512) one model-grid voxel of the mask, so a
#: 6 mm nodule or a calcified plaque counts too.
DENSE_MIN_FRACTION = 1e-3
#: RadFinder's target blur (mm) and the engine's top-k for depth profiles.
SNIPPET_SIGMA_MM = 24.0
SNIPPET_TOP_K = 5


def encode_pooled_and_dense(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One backbone pass, differentiable: (B, D) pooled and (B, N, D) per-patch embeddings,
    normalised, and the pool's (B, H, N) attention weights per head.

    The pooled embedding is colipri's ``AttentionPool1D`` (query = mean token); the dense
    path is the pool's value and output projections applied to every token, which is what
    colipri's ``pooler.to_dense()`` builds as 1x1x1 convolutions for inference.
    """
    encoder = model.image_encoder
    tokens = rearrange(encoder.projector(encoder.backbone(images)), "b c x y z -> b (x y z) c")
    attention = encoder.pooler.attn
    pooled, weights = attention(tokens.mean(dim=1, keepdim=True), tokens, tokens, need_weights=True,
                                average_attn_weights=False)
    size = attention.in_proj_weight.shape[1]
    values = F.linear(tokens, attention.in_proj_weight[2 * size:], attention.in_proj_bias[2 * size:])
    dense = F.linear(values, attention.out_proj.weight, attention.out_proj.bias)
    return F.normalize(pooled[:, 0], dim=-1), F.normalize(dense, dim=-1), weights[:, :, 0]


def focus_loss(weights: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Mean over (phantom, present finding) of -log of the best pool head's attention mass on
    that finding's patches: every finding, however small, gets a head that looks at it.

    Args:
        weights: (B, H, N) attention weights of the pool's heads.
        fractions: (B, F, N) share of each patch inside each finding's mask.
    """
    positive = (fractions >= DENSE_MIN_FRACTION).to(weights.dtype)
    present = positive.any(dim=-1)
    if not present.any():
        return weights.sum() * 0.0
    mass = torch.einsum("bhn,bfn->bfh", weights, positive).amax(dim=-1)
    return -(mass[present] + 1e-6).log().mean()


def pooled_pair_loss(pooled: torch.Tensor, directions: torch.Tensor, targets: torch.Tensor, temperature: float):
    """BCE of (B, P) logits ``pooled @ (t_pos - t_neg) / T`` against (B, P) 0/1 targets."""
    return F.binary_cross_entropy_with_logits(pooled @ directions.T / temperature, targets)


def dense_pair_loss(dense: torch.Tensor, directions: torch.Tensor, fractions: torch.Tensor, temperature: float):
    """Per-patch BCE, balanced: the mean over each finding's positive patches and the mean over
    its negative patches (pooled over the batch), averaged over the means that exist, so a
    nodule's two patches weigh as much as an effusion's forty.

    Args:
        dense: (B, N, D) normalised patch embeddings.
        directions: (P, D) ``t_pos - t_neg`` of one pair per planted finding.
        fractions: (B, P, N) share of each patch inside each finding's mask.
    """
    logits = torch.einsum("bnd,pd->bpn", dense, directions) / temperature
    positive = (fractions >= DENSE_MIN_FRACTION).to(logits.dtype)
    terms = F.binary_cross_entropy_with_logits(logits, positive, reduction="none")
    positives, negatives = positive.sum(dim=(0, 2)), (1 - positive).sum(dim=(0, 2))
    on_positive = (terms * positive).sum(dim=(0, 2)) / positives.clamp(min=1)
    on_negative = (terms * (1 - positive)).sum(dim=(0, 2)) / negatives.clamp(min=1)
    return (on_positive.sum() + on_negative.sum()) / ((positives > 0).sum() + (negatives > 0).sum()).clamp(min=1)


def snippet_loss(dense: torch.Tensor, inside: torch.Tensor, grid_shape: tuple[int, int, int], snippets: torch.Tensor,
                 owner: torch.Tensor, levels: torch.Tensor, level_mm: float, temperature: float) -> torch.Tensor:
    """Cross entropy of the zero-shot depth profile against RadFinder's blurred target.

    Args:
        dense: (B, N, D) normalised patch embeddings, N = gx*gy*gz with S along the last axis.
        inside: (B, N) bool patches inside the body (the others count as similarity -1).
        grid_shape: (gx, gy, gz).
        snippets: (S, D) normalised snippet embeddings.
        owner: (S,) index of the phantom each snippet belongs to.
        levels: (S,) continuous depth-level index of each snippet's true position.
    """
    gx, gy, gz = grid_shape
    similarity = torch.einsum("snd,sd->sn", dense[owner], snippets).masked_fill(~inside[owner], -1.0)
    per_level = rearrange(similarity, "s (x y z) -> s z (x y)", x=gx, y=gy, z=gz)
    logits = per_level.topk(min(SNIPPET_TOP_K, gx * gy), dim=-1).values.mean(dim=-1) / temperature
    offsets = (torch.arange(gz, dtype=torch.float32, device=levels.device)[None] - levels[:, None]) / (
        SNIPPET_SIGMA_MM / level_mm)
    target = torch.softmax(-0.5 * offsets**2, dim=-1)
    return -(target * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def report_loss(pooled: torch.Tensor, reports: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between (B, D) images and their (B, D) reports."""
    similarity = pooled @ reports.T / temperature
    target = torch.arange(len(pooled), device=similarity.device)
    return (F.cross_entropy(similarity, target) + F.cross_entropy(similarity.T, target)) / 2


class PromptBank:
    """Token ids of every catalogue prompt pair, the finding (CT-RATE index) of each pair, and
    the pairs of the planted findings with their row in ``PhantomSample.patch_fractions``."""

    def __init__(self, tokenizer, planted: tuple[str, ...]):
        from COLIPRISlicerLib.findings.catalogue import load_catalogue
        from COLIPRISlicerLib.teaching.phantom import CT_RATE_FINDINGS

        catalogue = list(load_catalogue())
        pairs = [(CT_RATE_FINDINGS.index(f.name), f.name, pair) for f in catalogue for pair in f.prompts]
        texts = [text for *_, pair in pairs for text in pair]
        encoded = tokenizer(texts, padding="longest", return_tensors="pt")
        self.ids, self.mask = encoded["input_ids"], encoded["attention_mask"]
        self.finding_of_pair = torch.tensor([index for index, *_ in pairs])
        rows = [planted.index(name) if name in planted else -1 for _, name, _ in pairs]
        self.dense_pairs = [pair for pair, row in enumerate(rows) if row >= 0]
        self.dense_rows = [row for row in rows if row >= 0]

    def directions(self, model) -> torch.Tensor:
        """(P, D) ``t_pos - t_neg`` for every pair (through the text encoder, differentiable)."""
        device = _device_of(model)
        text = model.encode_text(self.ids.to(device), self.mask.to(device))
        return text[1::2] - text[0::2]


def encode_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """(len(texts), D) normalised embeddings, padded to the longest text."""
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=512, return_tensors="pt")
    device = _device_of(model)
    return model.encode_text(encoded["input_ids"].to(device), encoded["attention_mask"].to(device))


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def inside_body(images: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, N) bool: patches whose mean intensity is above air (rescaled HU -950)."""
    means = F.avg_pool3d(images, patch_size)
    return rearrange(means > -0.95, "b 1 x y z -> b (x y z)")


def snippet_batch(samples, indices: list[int]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Texts, owners (position in the batch) and level targets of the batch's snippets."""
    texts, owner, levels = [], [], []
    for position, index in enumerate(indices):
        sample = samples[index]
        inside = (sample.snippet_levels > -0.5) & (sample.snippet_levels < sample.patch_fractions.shape[-1] - 0.5)
        for text, level in zip(np.asarray(sample.snippets, dtype=object)[inside], sample.snippet_levels[inside]):
            texts.append(str(text))
            owner.append(position)
            levels.append(float(level))
    return texts, torch.tensor(owner, dtype=torch.long), torch.tensor(levels, dtype=torch.float32)


def image_terms(pooled, dense, weights, directions, labels, fractions, temperature: float) -> dict:
    """Image-phase losses with free per-finding (18, D) ``directions`` (CT-RATE order).

    Args:
        labels: (B, 18) CT-RATE labels. fractions: (B, 10, N) planted-finding patch fractions.
    """
    from COLIPRISlicerLib.teaching.dataset import PLANTED_LABEL_INDICES

    planted = list(PLANTED_LABEL_INDICES)
    return {"pooled": pooled_pair_loss(pooled, directions, labels, temperature),
            "dense": dense_pair_loss(dense, directions[planted], fractions, temperature),
            "focus": focus_loss(weights, fractions)}


@dataclass
class ImageEmbeddingCache:
    """Frozen image-side outputs of every training phantom: (N, D) pooled, (N, P, D) dense, (N, P) in body."""

    pooled: torch.Tensor
    dense: torch.Tensor
    inside: torch.Tensor


def cache_image_embeddings(model, images: torch.Tensor, patch_size, batch_size: int = 8,
                           autocast: bool = False) -> ImageEmbeddingCache:
    """Frozen image-side outputs of (N, 1, X, Y, Z) ``images`` (on the model's device), in batches;
    ``autocast``: bf16 autocast on CUDA."""
    pooled, dense, inside = [], [], []
    with torch.no_grad(), torch.autocast(images.device.type, torch.bfloat16, enabled=autocast):
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].float()
            p, d, _ = encode_pooled_and_dense(model, batch)
            pooled.append(p.float())
            dense.append(d.half())
            inside.append(inside_body(batch, patch_size))
    return ImageEmbeddingCache(torch.cat(pooled), torch.cat(dense), torch.cat(inside))


def text_terms(model, tokenizer, bank: PromptBank, samples, indices: list[int], cache: ImageEmbeddingCache,
               tensors, directions: torch.Tensor, temperature: float) -> dict:
    """Text-phase losses on cached image embeddings of the phantoms at ``indices``; ``tensors``
    (:class:`.batches.TrainingTensors`) holds their labels and patch fractions."""
    index = torch.as_tensor(indices, device=cache.pooled.device)
    pooled, dense, inside = cache.pooled[index], cache.dense[index].float(), cache.inside[index]
    labels, fractions = tensors.labels[index], tensors.fractions[index]
    text = bank.directions(model).float()
    target = directions[bank.finding_of_pair.to(directions.device)]
    terms = {"pooled": pooled_pair_loss(pooled, text, labels[:, bank.finding_of_pair.to(labels.device)], temperature),
             "dense": dense_pair_loss(dense, text[bank.dense_pairs], fractions[:, bank.dense_rows].flatten(2),
                                      temperature),
             "align": F.mse_loss(text, target)}
    texts, owner, levels = snippet_batch(samples, indices)
    if texts:
        terms["snippet"] = snippet_loss(dense, inside, tuple(fractions.shape[2:]),
                                        encode_texts(model, tokenizer, texts).float(), owner.to(dense.device),
                                        levels.to(dense.device), samples[indices[0]].level_mm, temperature)
    reports = encode_texts(model, tokenizer, [samples[i].report for i in indices]).float()
    terms["report"] = report_loss(pooled, reports, temperature)
    return terms
