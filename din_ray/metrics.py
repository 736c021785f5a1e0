"""CTR metrics: AUC, GAUC (the paper's Eq. 10), LogLoss and RelaImpr (Eq. 11).

All functions take flat numpy arrays and are order-independent, so predictions gathered from many
workers in any order give exactly the single-process values. Ties are scored as half a correct
pair (average ranks), matching `sklearn.metrics.roc_auc_score`.
"""

from __future__ import annotations

import numpy as np


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of `scores`, tied values sharing the mean of their ranks. (N,) -> (N,)"""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Start index of each run of equal scores in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U). NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(scores)[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Impression-weighted mean of per-user AUC over users with both a click and a non-click.

    GAUC = sum_u n_u * AUC_u / sum_u n_u  (paper Eq. 10), n_u = impressions of user u.
    Vectorised: one global sort by (user, score) gives every user's average ranks at once.
    """
    labels = np.asarray(labels).astype(np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    groups = np.asarray(groups).ravel()
    if not len(labels) == len(scores) == len(groups):
        raise ValueError(f"lengths differ: labels {len(labels)}, scores {len(scores)}, "
                         f"groups {len(groups)}")
    if len(labels) == 0:
        return float("nan")
    _, g = np.unique(groups, return_inverse=True)
    order = np.lexsort((scores, g))
    g_s, s_s, y_s = g[order], scores[order], labels[order]
    # Runs of equal (user, score) share their average within-user rank.
    new_run = np.r_[True, (g_s[1:] != g_s[:-1]) | (s_s[1:] != s_s[:-1])]
    run_id = np.cumsum(new_run) - 1
    pos_in_sorted = np.arange(len(g_s))
    user_start = np.r_[0, np.flatnonzero(g_s[1:] != g_s[:-1]) + 1]
    start_of_user = np.repeat(user_start, np.diff(np.r_[user_start, len(g_s)]))
    rank = pos_in_sorted - start_of_user + 1.0
    run_mean = np.bincount(run_id, weights=rank) / np.bincount(run_id)
    rank = run_mean[run_id]
    n_groups = g_s.max() + 1
    n = np.bincount(g_s, minlength=n_groups).astype(np.float64)
    n_pos = np.bincount(g_s, weights=y_s, minlength=n_groups)
    n_neg = n - n_pos
    pos_rank_sum = np.bincount(g_s, weights=rank * y_s, minlength=n_groups)
    valid = (n_pos > 0) & (n_neg > 0)
    if not valid.any():
        return float("nan")
    per_user = (pos_rank_sum[valid] - n_pos[valid] * (n_pos[valid] + 1) / 2.0) / (
        n_pos[valid] * n_neg[valid])
    return float((n[valid] * per_user).sum() / n[valid].sum())


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (paper Eq. 2)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


def rela_impr(model_auc: float, base_auc: float) -> float:
    """Relative improvement over a base model in percent (paper Eq. 11)."""
    return ((model_auc - 0.5) / (base_auc - 0.5) - 1.0) * 100.0


def evaluate_predictions(labels: np.ndarray, probs: np.ndarray, users: np.ndarray) -> dict:
    """The metrics din-ray reports for one split: gauc, auc, logloss, and the row count."""
    return {
        "gauc": gauc(labels, probs, users),
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        "rows": int(len(labels)),
    }
