"""Training losses. Each returns a scalar tensor; `cover_loss` combines them with named terms.

Letters: B batch, D embedding dims, K classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair_masks(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, D), (B,) -> cosine distance (B, B) in [0, 2], positive mask (same label, not self), negative mask."""
    assert embeddings.ndim == 2 and labels.ndim == 1 and len(labels) == len(embeddings)
    unit = F.normalize(embeddings, dim=1)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return 1.0 - unit @ unit.T, same & ~eye, ~same


def batch_hard_triplet(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-hard triplet loss on cosine distance.

    embeddings (B, D) (normalised here), labels (B,) int. For each anchor: the farthest
    positive and the nearest negative in the batch; loss = mean(relu(d_pos - d_neg + margin)).
    Anchors with no positive or no negative in the batch are ignored.
    """
    distance, positive, negative = _pair_masks(embeddings, labels)
    valid = positive.any(1) & negative.any(1)
    if not valid.any():
        return embeddings.sum() * 0.0
    hardest_positive = torch.where(positive, distance, torch.full_like(distance, -1.0)).max(1).values
    hardest_negative = torch.where(negative, distance, torch.full_like(distance, 3.0)).min(1).values
    return F.relu(hardest_positive - hardest_negative + margin)[valid].mean()


def batch_all_triplet(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-all triplet loss on cosine distance: mean over the triplets (a, p, n) that violate
    the margin. Gives useful gradients from the first step, where batch-hard mining on a
    barely trained network sees only a few, noisy hardest pairs."""
    distance, positive, negative = _pair_masks(embeddings, labels)
    valid = positive.unsqueeze(2) & negative.unsqueeze(1)  # (a, p, n)
    losses = F.relu(distance.unsqueeze(2) - distance.unsqueeze(1) + margin)[valid]
    active = losses > 1e-8
    return losses[active].mean() if active.any() else embeddings.sum() * 0.0


TRIPLET_MINING = {"hard": batch_hard_triplet, "all": batch_all_triplet}


def cover_loss(
    embeddings: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: float,
    mining: str,
    triplet_weight: float,
    ce_weight: float,
    label_smoothing: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Triplet (batch-hard or batch-all mining) on the embeddings + cross-entropy on the classifier.

    embeddings (B, D), logits (B, K), labels (B,). A term with weight 0 is not computed.
    Returns (total, {"triplet": .., "ce": ..}).
    """
    total = embeddings.new_zeros(())
    terms: dict[str, float] = {}
    if triplet_weight > 0:
        triplet = TRIPLET_MINING[mining](embeddings, labels, margin)
        total = total + triplet_weight * triplet
        terms["triplet"] = float(triplet.detach())
    if ce_weight > 0:
        ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        total = total + ce_weight * ce
        terms["ce"] = float(ce.detach())
    return total, terms
