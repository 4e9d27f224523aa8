"""ItemKNN: the classic item-to-item co-occurrence baseline (Sarwar et al. 2001; Deshpande & Karypis 2004).

sim(i, j) = |U_i & U_j| / (sqrt(|U_i| |U_j|) + shrink), over the users of the training part only,
pruned to each item's `neighbors` most similar items. A user's score for item j sums sim(h, j) over
the items h of their history, optionally weighted by recency (decay^age, newest age 0), so the
baseline also sees the order that the sequence models exploit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from encoders.split import EvalCase, LeaveOneOut


@dataclass
class ItemKNNConfig:
    neighbors: int = 200
    shrink: float = 10.0
    decay: float = 0.4  # 1.0 = every history item counts the same; 0.4 best of 1.0..0.3 on ml-1m validation
    max_history: int | None = None  # only the last N history items (None = all)

    def to_dict(self) -> dict:
        return asdict(self)


class ItemKNN:
    """Dense [n_items+1]^2 similarity: fine for catalogues up to tens of thousands of items."""

    def __init__(self, cfg: ItemKNNConfig, n_items: int):
        self.cfg = cfg
        self.n_items = n_items
        self.sim = torch.zeros(n_items + 1, n_items + 1)

    def fit(self, split: LeaveOneOut) -> ItemKNN:
        """Co-occurrence of items within a user's training events (each user counted once per pair)."""
        n = self.n_items + 1
        x = torch.zeros(split.data.n_users, n)
        for s in split.train_sequences():
            x[s.user, torch.from_numpy(np.unique(s.items))] = 1.0
        co = x.T @ x
        count = co.diagonal().clone()
        sim = co / (torch.sqrt(count[:, None] * count[None, :]) + self.cfg.shrink).clamp(min=1e-12)
        sim.fill_diagonal_(0.0)
        sim[0] = 0.0
        sim[:, 0] = 0.0
        k = min(self.cfg.neighbors, n - 1)
        if k < n - 1:
            top = sim.topk(k, dim=1)
            sim = torch.zeros_like(sim).scatter_(1, top.indices, top.values)
        self.sim = sim
        return self

    def scores(self, cases: list[EvalCase]) -> torch.Tensor:
        """[B, n_items+1]: recency-weighted sum of the similarity rows of each user's history."""
        w = torch.zeros(len(cases), self.n_items + 1)
        for r, c in enumerate(cases):
            items = c.history.items
            if self.cfg.max_history:
                items = items[-self.cfg.max_history :]
            age = np.arange(len(items))[::-1].astype(np.float64)
            weights = torch.from_numpy(self.cfg.decay**age).float()
            w[r].index_add_(0, torch.from_numpy(np.ascontiguousarray(items)), weights)
        return w @ self.sim
