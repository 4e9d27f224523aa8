"""Full-ranking metrics: rank the target against ALL items, history masked, ties split evenly; and the
beyond-accuracy metrics of the top-k lists cut from the same masked scores (coverage, intra-list
diversity, popularity bias)."""

from __future__ import annotations

import numpy as np
import torch

from encoders.split import EvalCase

KS = (10, 20)
TOP_K = 10  # length of the lists the beyond-accuracy metrics read


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
    return ranks_and_top_k(scores, cases, None)[0]


def ranks_and_top_k(scores: torch.Tensor, cases: list[EvalCase],
                    k: int | None = TOP_K) -> tuple[np.ndarray, np.ndarray | None]:
    """Target ranks (as `target_ranks`) and, when k is given, each user's top-k list [B, k] cut from the
    same masked scores, so the lists and the accuracy metrics share the candidate set and the masking."""
    scores = mask_history(torch.nan_to_num(scores.float(), nan=-torch.inf), cases)
    targets = torch.tensor([c.target for c in cases], device=scores.device)
    tscore = scores.gather(1, targets.unsqueeze(1))
    higher = (scores > tscore).sum(1)
    ties = (scores == tscore).sum(1) - 1
    ranks = (higher + ties // 2).cpu().numpy()
    return ranks, (top_k(scores, k) if k is not None else None)


def top_k(scores: torch.Tensor, k: int = TOP_K) -> np.ndarray:
    """[B, k] item ids of the k highest scores per row, best first; ties broken by the lower item id (so
    the lists are deterministic); slots whose score is -inf (masked or padding) are 0 = no item.

    One topk for the k-th value, then the items above it plus the lowest-id tied ones: linear in the
    catalogue, no full sort."""
    n_rows, n = scores.shape
    kk = min(k, n)
    out = np.zeros((n_rows, k), dtype=np.int64)
    if n_rows == 0 or kk == 0:
        return out
    thr = scores.topk(kk, dim=1).values[:, -1:]
    above = scores > thr
    tie = scores == thr
    need = kk - above.sum(1, keepdim=True)
    chosen = above | (tie & (tie.cumsum(1) <= need))
    idx = chosen.nonzero()[:, 1].view(n_rows, kk)  # row-major: ascending item id within a row
    vals = scores.gather(1, idx)
    order = vals.sort(dim=1, descending=True, stable=True).indices
    idx, vals = idx.gather(1, order), vals.gather(1, order)
    idx[vals == -torch.inf] = 0
    out[:, :kk] = idx.cpu().numpy()
    return out


def catalogue_coverage(lists: np.ndarray, n_items: int) -> tuple[float, int]:
    """Share of the catalogue's items 1..n_items found in at least one list (0 = empty slot), and their number."""
    n = int(np.count_nonzero(np.bincount(lists[lists > 0].ravel(), minlength=n_items + 1)[1:]))
    return (n / n_items if n_items else 0.0), n


def intra_list_diversity(lists: np.ndarray, vectors: np.ndarray, chunk: int = 4096) -> tuple[float | None, int]:
    """Mean over lists of the mean pairwise cosine distance (1 - cos) between the lists' item vectors,
    and the number of lists with at least two items (the others have no pair and are left out).

    Vectors are L2-normalised here (a zero vector has cosine 0 with everything); [U, k, k] Gram
    matrices in chunks of users."""
    vecs = torch.nn.functional.normalize(torch.as_tensor(vectors, dtype=torch.float32), dim=1)
    k = lists.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool), diagonal=1)
    total, n_lists = 0.0, 0
    for i in range(0, len(lists), chunk):
        ids = torch.as_tensor(lists[i : i + chunk], dtype=torch.long)
        valid = ids > 0
        v = vecs[ids]  # [U, k, d]
        dist = 1.0 - v @ v.transpose(1, 2)
        pairs = valid.unsqueeze(2) & valid.unsqueeze(1) & upper
        n_pairs = pairs.sum((1, 2))
        has = n_pairs > 0
        per_list = (dist * pairs).sum((1, 2))[has] / n_pairs[has]
        total += float(per_list.double().sum())
        n_lists += int(has.sum())
    return (total / n_lists if n_lists else None), n_lists


def popularity_bias(lists: np.ndarray, targets: np.ndarray,
                    popularity: np.ndarray) -> tuple[float | None, float | None, float | None]:
    """Mean log(1 + training popularity) of the recommended items (per list, then over lists with an
    item), the same over the test targets, and their ratio (None where undefined)."""
    logp = np.log1p(np.asarray(popularity, dtype=np.float64))
    valid = lists > 0
    n = valid.sum(1)
    per_list = np.where(valid, logp[lists], 0.0).sum(1)[n > 0] / n[n > 0]
    rec = float(per_list.mean()) if len(per_list) else None
    tgt = float(logp[np.asarray(targets, dtype=np.int64)].mean()) if len(targets) else None
    ratio = rec / tgt if rec is not None and tgt else None
    return rec, tgt, ratio


def beyond_accuracy(lists: np.ndarray, targets: np.ndarray, popularity: np.ndarray, n_items: int,
                    vectors: np.ndarray | None, reason: str | None = None) -> dict:
    """The `beyond_accuracy` object of a run: coverage, intra-list diversity, popularity bias of top-k lists."""
    k = lists.shape[1]
    cov, n_rec = catalogue_coverage(lists, n_items)
    div, div_lists = None, 0
    if vectors is not None and len(vectors) != n_items + 1:
        vectors, reason = None, f"text vectors have {len(vectors)} rows, the catalogue {n_items} items + padding"
    if vectors is not None:
        div, div_lists = intra_list_diversity(lists, vectors)
        if div is None:
            reason = "no list has two items"
    elif reason is None:
        reason = "no text vectors"
    rec, tgt, ratio = popularity_bias(lists, targets, popularity)
    return {"k": k, "users": int(len(lists)), f"coverage@{k}": cov, "recommended_items": n_rec,
            "catalogue_items": int(n_items), f"diversity@{k}": div, "diversity_lists": div_lists,
            "diversity_reason": None if div is not None else reason, f"popularity@{k}": rec,
            "popularity_target": tgt, f"popularity_ratio@{k}": ratio}


def summarize(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    out: dict[str, float] = {"users": int(len(ranks))}
    for k in ks:
        hit = ranks < k
        out[f"ndcg@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0))) if len(ranks) else 0.0
        out[f"hr@{k}"] = float(np.mean(hit)) if len(ranks) else 0.0
    return out
