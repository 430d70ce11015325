"""Retrieval metrics of the cover-song field, as pure numpy functions (no torch).

Convention (Da-TACOS, SHS100K): every item queries all *other* items; an item is relevant
to a query when it belongs to the same group. Letters: Q queries, C candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def average_precision(relevant_sorted: np.ndarray) -> float:
    """AP of one ranking. relevant_sorted: (C,) bool, candidates in ranked order. 0 if none relevant."""
    assert relevant_sorted.ndim == 1
    rel = relevant_sorted.astype(bool)
    if not rel.any():
        return 0.0
    hits = np.cumsum(rel)
    ranks = np.arange(1, len(rel) + 1)
    return float((hits[rel] / ranks[rel]).mean())


def rank_of_first_relevant(relevant_sorted: np.ndarray) -> int:
    """1-based rank of the first relevant candidate; len+1 if there is none."""
    assert relevant_sorted.ndim == 1
    hits = np.flatnonzero(relevant_sorted)
    return int(hits[0]) + 1 if len(hits) else len(relevant_sorted) + 1


@dataclass(frozen=True)
class RetrievalScores:
    map: float  # mean average precision
    mr1: float  # mean rank of the first relevant item
    top1: float  # fraction of queries whose first result is relevant
    hr10: float  # fraction with a relevant item in the first 10
    n_queries: int

    def as_dict(self) -> dict[str, float]:
        return {"mAP": self.map, "MR1": self.mr1, "top1": self.top1, "HR10": self.hr10, "queries": self.n_queries}


def evaluate_similarity(
    similarity: np.ndarray, query_groups: np.ndarray, candidate_groups: np.ndarray, exclude_self: bool
) -> RetrievalScores:
    """Scores for a (Q, C) similarity matrix (higher = more similar).

    With exclude_self, query i and candidate i are the same item and that pair is dropped.
    Queries with no relevant candidate are skipped (they have no defined AP).
    """
    assert similarity.ndim == 2 and similarity.shape == (len(query_groups), len(candidate_groups))
    aps, first_ranks = [], []
    for i in range(len(query_groups)):
        keep = np.ones(len(candidate_groups), dtype=bool)
        if exclude_self:
            keep[i] = False
        order = np.argsort(-similarity[i][keep], kind="stable")
        relevant = (candidate_groups[keep] == query_groups[i])[order]
        if not relevant.any():
            continue
        aps.append(average_precision(relevant))
        first_ranks.append(rank_of_first_relevant(relevant))
    ranks = np.asarray(first_ranks)
    if len(ranks) == 0:
        return RetrievalScores(0.0, float("nan"), 0.0, 0.0, 0)
    return RetrievalScores(float(np.mean(aps)), float(ranks.mean()), float((ranks == 1).mean()), float((ranks <= 10).mean()), len(ranks))
