"""Full-ranking metrics: rank the target against ALL items, history masked, ties split evenly."""

from __future__ import annotations

import numpy as np
import torch

from encoders.split import EvalCase

KS = (10, 20)


def mask_history(scores: torch.Tensor, cases: list[EvalCase]) -> torch.Tensor:
    """-inf on padding item 0 and on every history item except the target."""
    scores[:, 0] = -torch.inf
    for r, case in enumerate(cases):
        hist = torch.from_numpy(np.unique(case.history.items)).to(scores.device)
        hist = hist[hist != case.target]
        scores[r, hist] = -torch.inf
    return scores


def target_ranks(scores: torch.Tensor, cases: list[EvalCase]) -> np.ndarray:
    """0-based rank of each target: items scored strictly higher plus half the tied ones.

    Half the ties is the expected rank under random tie-breaking, so a constant scorer gets chance
    level and no model gains from ties.
    """
    scores = mask_history(torch.nan_to_num(scores.float(), nan=-torch.inf), cases)
    targets = torch.tensor([c.target for c in cases], device=scores.device)
    tscore = scores.gather(1, targets.unsqueeze(1))
    higher = (scores > tscore).sum(1)
    ties = (scores == tscore).sum(1) - 1
    return (higher + ties // 2).cpu().numpy()


def summarize(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    out: dict[str, float] = {"users": int(len(ranks))}
    for k in ks:
        hit = ranks < k
        out[f"ndcg@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0))) if len(ranks) else 0.0
        out[f"hr@{k}"] = float(np.mean(hit)) if len(ranks) else 0.0
    return out
