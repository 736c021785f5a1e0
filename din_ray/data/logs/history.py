"""Histories in one bucket of the log pipeline: which behaviours come strictly before each
impression.

Impressions and behaviours of the bucket's users are ordered by one int64 key per row that
sorts like (user, time) (`sort_keys`); binary searches on the sorted behaviours then give every
impression the end of its history (`side="left"`: a behaviour at the impression's own timestamp
is NOT before it) and the start of its user's behaviours. `History.slots` turns that into the
(B, L) positions of the most recent `max_history` behaviours, oldest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from din_ray.data.common import history_slots


def sort_keys(imp_user: np.ndarray, imp_ts: np.ndarray, beh_user: np.ndarray,
              beh_ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One int64 key per row ordered like (user, ts): (user - min) * ts_span + (ts - min) when
    that fits in 62 bits, else (user rank, ts rank) over the bucket's distinct values.
    -> impression keys (N,), behaviour keys (M,), key of each impression user's first instant
    (N,)."""
    users = np.concatenate([imp_user, beh_user])
    stamps = np.concatenate([imp_ts, beh_ts])
    u0, t0 = users.min(), stamps.min()
    u_span = int(users.max()) - int(u0) + 1
    t_span = int(stamps.max()) - int(t0) + 1
    if u_span * t_span < 2 ** 62:
        u = users - u0
        t = stamps - t0
    else:
        _, u = np.unique(users, return_inverse=True)
        _, t = np.unique(stamps, return_inverse=True)
        t_span = int(t.max()) + 1
    u, t = u.astype(np.int64), t.astype(np.int64)
    key = u * np.int64(t_span) + t  # (N + M,)
    n = len(imp_user)
    return key[:n], key[n:], u[:n] * np.int64(t_span)


@dataclass
class History:
    """Behaviours of a bucket sorted by (user, time), and for every impression the slice of
    them strictly before it: behaviours [end - length, end), length <= max_history."""

    end: np.ndarray  # (N,) int64 position after the impression's last earlier behaviour
    length: np.ndarray  # (N,) int64 history length
    order: np.ndarray  # (M,) int64 behaviour rows in (user, time, staging) order
    imp_order: np.ndarray  # (N,) int64 impression rows in (user, time) order

    @classmethod
    def build(cls, imp_user: np.ndarray, imp_ts: np.ndarray, beh_user: np.ndarray,
              beh_ts: np.ndarray, max_history: int) -> History:
        imp_key, beh_key, user_first = sort_keys(imp_user, imp_ts, beh_user, beh_ts)
        order = np.argsort(beh_key, kind="stable")
        beh_key = beh_key[order]
        imp_order = np.argsort(imp_key, kind="stable")
        # Sorted needles keep the binary searches cache-friendly; results go back by scatter.
        # side="left": a behaviour with the impression's own timestamp is NOT before it.
        end = np.empty(len(imp_key), np.int64)
        end[imp_order] = np.searchsorted(beh_key, imp_key[imp_order], side="left")
        user_start = np.empty(len(imp_key), np.int64)
        user_start[imp_order] = np.searchsorted(beh_key, user_first[imp_order], side="left")
        return cls(end, np.minimum(end - user_start, max_history), order, imp_order)

    def slots(self, idx: np.ndarray, max_history: int) -> tuple[np.ndarray, np.ndarray]:
        """Where the histories of impressions `idx` (B,) come from: source positions in the
        sorted behaviours (B, L) and the mask of real slots (B, L), oldest first."""
        return history_slots(self.end[idx], self.length[idx], max_history)
