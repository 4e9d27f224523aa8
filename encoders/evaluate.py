"""The evaluation harness: every model trained and ranked on the same leave-one-out split.

Protocol: per user, events sorted by time; last event = test target, the one before = validation
target, the rest = training. Every item is ranked (no sampled negatives); items of the user's
history other than the target are masked. Model selection uses validation targets only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from encoders.data import Interactions
from encoders.metrics import summarize, target_ranks
from encoders.model import MODES, LSTIConfig, LSTIModel
from encoders.split import EvalCase, LeaveOneOut
from encoders.train import TrainConfig, evaluate_lsti, pick_device, train_lsti

PROTOCOL = {
    "split": "leave-one-out by time (last event = test, second last = validation, rest = training)",
    "ranking": "full ranking over all items, no sampled negatives",
    "history": "items in the user's history masked, except the target",
    "ties": "expected rank under random tie-breaking",
    "selection": "validation targets only",
}


def popularity_scores(split: LeaveOneOut) -> np.ndarray:
    d = split.data
    return np.bincount(d.items[split.train_mask()], minlength=d.n_items + 1).astype(np.float32)


def evaluate_static(scores_for: Callable[[list[EvalCase]], torch.Tensor], cases: list[EvalCase],
                    batch: int = 512) -> dict:
    ranks = [target_ranks(scores_for(cases[i : i + batch]), cases[i : i + batch]) for i in range(0, len(cases), batch)]
    return summarize(np.concatenate(ranks) if ranks else np.zeros(0))


def text_vectors_for(data: Interactions, progress: bool = True) -> np.ndarray:
    """BERT vectors of all item texts, row 0 = padding."""
    from encoders.text import TextEncoder

    vecs = TextEncoder().encode(data.item_texts[1:], progress=progress)
    return np.vstack([np.zeros((1, vecs.shape[1]), np.float32), vecs])


def run_model(name: str, split: LeaveOneOut, seed: int = 0, train_cfg: TrainConfig | None = None,
              model_cfg: dict | None = None, progress: bool = True, text_vectors: np.ndarray | None = None,
              model: LSTIModel | None = None) -> dict:
    """Fit `name` on the training part and return test (and validation) metrics for one seed."""
    test, valid = split.cases("test"), split.cases("valid")
    start = time.perf_counter()
    if name == "pop":
        pop = torch.from_numpy(popularity_scores(split))
        def fn(c):
            return pop.expand(len(c), -1).clone()
        return {"test": evaluate_static(fn, test), "valid": evaluate_static(fn, valid),
                "train_seconds": time.perf_counter() - start}
    if name in MODES:
        if model is None:
            if text_vectors is None:
                text_vectors = text_vectors_for(split.data, progress)
            cfg = LSTIConfig(n_items=split.data.n_items, mode=name, **(model_cfg or {}))
            tcfg = train_cfg or TrainConfig()
            tcfg.seed = seed
            model, info = train_lsti(split, text_vectors, cfg, tcfg, progress=progress)
        else:
            info = {"train_seconds": 0.0, "epochs_run": 0, "note": "pre-trained artifact"}
        device = pick_device(train_cfg.device if train_cfg else None)
        model = model.to(device)
        return {"test": evaluate_lsti(model, test, device), "valid": evaluate_lsti(model, valid, device),
                "train_seconds": info["train_seconds"], "epochs": info["epochs_run"]}
    raise ValueError(f"unknown model {name!r}")


def aggregate(runs: list[dict]) -> dict:
    """Mean and (population) standard deviation over seeds of each test metric."""
    keys = [k for k in runs[0]["test"] if k != "users"]
    out = {}
    for k in keys:
        vals = np.array([r["test"][k] for r in runs])
        out[k] = float(vals.mean())
        out[f"{k}_std"] = float(vals.std())
    out["users"] = runs[0]["test"]["users"]
    return out
