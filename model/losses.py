"""Training losses. Each returns a scalar tensor; `cover_loss` combines them with named terms.

Labels >= 0 are cover groups. A negative label marks an out-of-catalog crop (model/negatives.py);
each has its own, so it is every group's negative in the triplet terms and never an anchor
(it has no positive), and the classifier never sees it.

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


def outside_similarity_hinge(
    embeddings: torch.Tensor, labels: torch.Tensor, ceiling: float, bank: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over out-of-catalog rows (label < 0) of relu(max cosine to any cover - ceiling).

    The covers are the batch's cover rows plus `bank` (M, D), unit vectors of earlier
    batches' covers (no gradient): a bank of a few thousand stands in for a catalog, so the
    maximum is the one the live threshold is set on. This term pushes that maximum down, in
    absolute terms; the triplet terms only order it below each group's own positives.
    0 without out-of-catalog rows or covers.
    """
    outside, cover = labels < 0, labels >= 0
    unit = F.normalize(embeddings, dim=1)
    covers = unit[cover] if bank is None else torch.cat([unit[cover], bank])
    if not outside.any() or not len(covers):
        return embeddings.sum() * 0.0
    best = (unit[outside] @ covers.T).max(1).values
    return F.relu(best - ceiling).mean()


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
    outside_weight: float = 0.0,
    outside_ceiling: float = 0.0,
    outside_bank: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Triplet (batch-hard or batch-all mining) on the embeddings + cross-entropy on the classifier
    (cover rows only) + the out-of-catalog hinge (against the batch's covers and `outside_bank`).

    embeddings (B, D), logits (B, K), labels (B,). A term with weight 0 is not computed.
    Returns (total, {"triplet": .., "ce": .., "outside": ..}).
    """
    total = embeddings.new_zeros(())
    terms: dict[str, float] = {}
    if triplet_weight > 0:
        triplet = TRIPLET_MINING[mining](embeddings, labels, margin)
        total = total + triplet_weight * triplet
        terms["triplet"] = float(triplet.detach())
    if ce_weight > 0:
        cover = labels >= 0
        ce = F.cross_entropy(logits[cover], labels[cover], label_smoothing=label_smoothing)
        total = total + ce_weight * ce
        terms["ce"] = float(ce.detach())
    if outside_weight > 0 and bool((labels < 0).any()):
        outside = outside_similarity_hinge(embeddings, labels, outside_ceiling, outside_bank)
        total = total + outside_weight * outside
        terms["outside"] = float(outside.detach())
    return total, terms
