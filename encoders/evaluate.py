"""The evaluation harness: every model trained and ranked on the same leave-one-out split.

Protocol: per user, events sorted by time; last event = test target, the one before = validation
target, the rest = training. Every item is ranked (no sampled negatives); items of the user's
history other than the target are masked. Model selection uses validation targets only.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from encoders.data import EVENT_CODE, Interactions
from encoders.gru4rec import GRU4Rec, GRU4RecConfig
from encoders.itemknn import ItemKNN, ItemKNNConfig
from encoders.metrics import TOP_K, beyond_accuracy, ranks_and_top_k, summarize
from encoders.model import MODES, LSTIConfig, LSTIModel
from encoders.sasrec import SASRec, SASRecConfig
from encoders.split import EvalCase, LeaveOneOut, Sequence
from encoders.train import TrainConfig, evaluate_lsti, fit, lsti_scores, pick_device, train_lsti

MODELS = ("pop", "itemknn", "short", "long", "fused", "sasrec", "gru4rec")

PROTOCOL = {
    "split": "leave-one-out by time (last event = test, second last = validation, rest = training)",
    "ranking": "full ranking over all items, no sampled negatives",
    "history": "items in the user's history masked, except the target",
    "ties": "expected rank under random tie-breaking",
    "selection": "validation targets only",
    "beyond_accuracy": "test users' top-10 lists cut from the same masked scores as the ranks (ties by lower item "
                       "id): catalogue coverage, intra-list diversity (1 - cosine of BERT item text vectors), "
                       "mean log(1 + training popularity) of recommended items vs test targets",
}


def popularity_scores(split: LeaveOneOut) -> np.ndarray:
    d = split.data
    return np.bincount(d.items[split.train_mask()], minlength=d.n_items + 1).astype(np.float32)


def static_ranks(scores_for: Callable[[list[EvalCase]], torch.Tensor], cases: list[EvalCase],
                 batch: int = 512) -> np.ndarray:
    return static_ranks_top_k(scores_for, cases, batch, None)[0]


def static_ranks_top_k(scores_for: Callable[[list[EvalCase]], torch.Tensor], cases: list[EvalCase],
                       batch: int = 512, k: int | None = TOP_K) -> tuple[np.ndarray, np.ndarray | None]:
    """Target ranks and (k given) the top-k lists, in the order of `cases`, from one scoring pass."""
    parts = [ranks_and_top_k(scores_for(cases[i : i + batch]), cases[i : i + batch], k)
             for i in range(0, len(cases), batch)]
    ranks = np.concatenate([r for r, _ in parts]) if parts else np.zeros(0)
    if k is None:
        return ranks, None
    return ranks, (np.concatenate([t for _, t in parts]) if parts else np.zeros((0, k), np.int64))


def lsti_ranks_top_k(model: LSTIModel, cases: list[EvalCase], device: str,
                     k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """As `train.lsti_ranks`, plus the top-k lists, in the order of `cases`, from the same scores."""
    ranks = np.zeros(len(cases), dtype=np.int64)
    lists = np.zeros((len(cases), k), dtype=np.int64)
    pos = {id(c): i for i, c in enumerate(cases)}
    for chunk, scores, _ in lsti_scores(model, cases, device):
        rows = [pos[id(c)] for c in chunk]
        ranks[rows], lists[rows] = ranks_and_top_k(scores, chunk, k)
    return ranks, lists


def evaluate_static(scores_for: Callable[[list[EvalCase]], torch.Tensor], cases: list[EvalCase],
                    batch: int = 512) -> dict:
    return summarize(static_ranks(scores_for, cases, batch))


def sasrec_ranks(model: SASRec, cases: list[EvalCase], device: str, batch: int = 256) -> np.ndarray:
    """Same masking and ranking as every other model: SASRec scores from each user's last max_len items."""
    return sasrec_ranks_top_k(model, cases, device, batch, None)[0]


def sasrec_ranks_top_k(model: SASRec, cases: list[EvalCase], device: str, batch: int = 256,
                       k: int | None = TOP_K) -> tuple[np.ndarray, np.ndarray | None]:
    model.eval()
    return static_ranks_top_k(lambda c: model.scores([x.history for x in c], device), cases, batch, k)


def evaluate_sasrec(model: SASRec, cases: list[EvalCase], device: str, batch: int = 256) -> dict:
    return summarize(sasrec_ranks(model, cases, device, batch))


def test_report(split: LeaveOneOut, cases: list[EvalCase], ranks: np.ndarray) -> dict:
    """Test metrics over all cases, plus the subsets a dataset has: next-buy (targets that are buys, when
    there are other event types); repeat and novel (targets already in the user's history or not, when
    some are: the masking rule leaves a repeat target as the only unmasked history item, so a model
    that favours the user's own items finds it easily; `novel` is free of that); and, in the
    cold-start experiment, cold and warm targets."""
    out = {"test": summarize(ranks)}
    etypes = np.array([c.target_etype for c in cases])
    buy = EVENT_CODE["buy"]
    if len(set(split.data.etypes.tolist())) > 1 and (etypes == buy).any():
        out["test_next_buy"] = summarize(ranks[etypes == buy])
    repeat = np.array([c.target in c.history.items for c in cases], dtype=bool)
    if repeat.any():
        out["test_repeat"] = summarize(ranks[repeat])
        out["test_novel"] = summarize(ranks[~repeat])
    if len(split.hidden_items):
        cold = np.isin([c.target for c in cases], split.hidden_items)
        out["test_cold"] = summarize(ranks[cold])
        out["test_warm"] = summarize(ranks[~cold])
    return out


SEQUENCE_MODELS = {"sasrec": (SASRecConfig, SASRec), "gru4rec": (GRU4RecConfig, GRU4Rec)}


def train_sequence(name: str, split: LeaveOneOut, model_cfg: SASRecConfig | GRU4RecConfig, cfg: TrainConfig,
                   progress: bool = True) -> tuple[SASRec | GRU4Rec, dict]:
    """A sequence baseline (`SEQUENCE_MODELS`) through the same loop as LSTI: same windows, optimiser,
    schedule, early stopping; scored and ranked by the SASRec functions (they only call `scores`)."""
    cfg = cfg.resolved(name)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    model = SEQUENCE_MODELS[name][1](model_cfg)
    model.hidden_items = torch.from_numpy(split.hidden_items)
    model = model.to(device)
    valid = split.cases("valid")

    def batch_loss(batch: list[Sequence]) -> torch.Tensor:
        return model.batch_loss(batch, device)

    model, info = fit(model, batch_loss, lambda: evaluate_sasrec(model, valid, device), split, model_cfg.max_len,
                      cfg, name, progress)
    info.update(device=device, lr=cfg.lr)
    return model, info


def text_vectors_for(data: Interactions, progress: bool = True) -> np.ndarray:
    """BERT vectors of all item texts, row 0 = padding."""
    from encoders.text import TextEncoder

    vecs = TextEncoder().encode(data.item_texts[1:], progress=progress)
    return np.vstack([np.zeros((1, vecs.shape[1]), np.float32), vecs])


_DIVERSITY_VECTORS: dict[bytes, np.ndarray] = {}  # item texts' sha1 -> text_vectors_for, for the runs of a process


def diversity_vectors(data: Interactions, text_vectors: np.ndarray | None,
                      progress: bool = True) -> tuple[np.ndarray | None, str | None]:
    """The item text vectors intra-list diversity reads, or None and why: the vectors the run was given
    (those the text models train on), else `text_vectors_for` (its on-disk cache makes a repeat cheap;
    kept in memory for the other seeds and models of the process)."""
    if text_vectors is not None:
        return text_vectors, None
    import hashlib

    key = hashlib.sha1("\0".join(data.item_texts).encode("utf-8")).digest()
    if key not in _DIVERSITY_VECTORS:
        try:
            vecs = text_vectors_for(data, progress)
        except Exception as e:  # no BERT weights, no transformers, an unreadable cache: report, don't fail the eval
            return None, f"BERT text vectors unavailable ({type(e).__name__}: {e})"
        _DIVERSITY_VECTORS.clear()
        _DIVERSITY_VECTORS[key] = vecs
    return _DIVERSITY_VECTORS[key], None


def beyond_accuracy_report(split: LeaveOneOut, cases: list[EvalCase], lists: np.ndarray,
                           text_vectors: np.ndarray | None, progress: bool = True) -> dict:
    """Coverage, intra-list diversity and popularity bias of the test users' top-k lists."""
    vecs, reason = diversity_vectors(split.data, text_vectors, progress)
    targets = np.array([c.target for c in cases], dtype=np.int64)
    return beyond_accuracy(lists, targets, popularity_scores(split), split.data.n_items, vecs, reason)


def _known(cls: type, cfg: dict | None) -> dict:
    """The keys of `cfg` that the config dataclass `cls` has: one --dim flag serves every model."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in (cfg or {}).items() if k in names}


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
        ranks, lists = static_ranks_top_k(fn, test)
        return {**test_report(split, test, ranks), "valid": evaluate_static(fn, valid),
                "train_seconds": time.perf_counter() - start,
                "beyond_accuracy": beyond_accuracy_report(split, test, lists, text_vectors, progress)}
    if name == "itemknn":
        knn = ItemKNN(ItemKNNConfig(**_known(ItemKNNConfig, model_cfg)), split.data.n_items).fit(split)
        ranks, lists = static_ranks_top_k(knn.scores, test)
        return {**test_report(split, test, ranks),
                "valid": evaluate_static(knn.scores, valid),
                "train_seconds": time.perf_counter() - start, "config": knn.cfg.to_dict(),
                "beyond_accuracy": beyond_accuracy_report(split, test, lists, text_vectors, progress)}
    if name in SEQUENCE_MODELS:
        config_cls = SEQUENCE_MODELS[name][0]
        scfg = config_cls(n_items=split.data.n_items, **_known(config_cls, model_cfg))
        tcfg = copy.copy(train_cfg or TrainConfig())
        tcfg.seed = seed
        smodel, info = train_sequence(name, split, scfg, tcfg, progress)
        device = pick_device(tcfg.device)
        ranks, lists = sasrec_ranks_top_k(smodel, test, device)
        return {**test_report(split, test, ranks),
                "valid": evaluate_sasrec(smodel, valid, device),
                "train_seconds": info["train_seconds"], "epochs": info["epochs_run"],
                "best_epoch": info["best_epoch"], "stop_reason": info.get("stop_reason"),
                "plateau": info.get("plateau"), "lr": info["lr"],
                "valid_curve": [round(h["valid"]["ndcg@10"], 4) for h in info["history"]],
                "config": scfg.to_dict(), "train": tcfg.to_dict(),
                "beyond_accuracy": beyond_accuracy_report(split, test, lists, text_vectors, progress)}
    if name in MODES:
        if model is None:
            if text_vectors is None:
                text_vectors = text_vectors_for(split.data, progress)
            cfg = LSTIConfig(n_items=split.data.n_items, mode=name, **_known(LSTIConfig, model_cfg))
            tcfg = copy.copy(train_cfg or TrainConfig())
            tcfg.seed = seed
            model, info = train_lsti(split, text_vectors, cfg, tcfg, progress=progress)
        else:
            tcfg = None
            info = {"train_seconds": 0.0, "epochs_run": 0, "best_epoch": 0, "note": "pre-trained artifact"}
        device = pick_device(train_cfg.device if train_cfg else None)
        model = model.to(device)
        ranks, lists = lsti_ranks_top_k(model, test, device)
        return {**test_report(split, test, ranks),
                "valid": evaluate_lsti(model, valid, device),
                "train_seconds": info["train_seconds"], "epochs": info["epochs_run"],
                "best_epoch": info["best_epoch"], "stop_reason": info.get("stop_reason"),
                "plateau": info.get("plateau"), "lr": info.get("lr"),
                "valid_curve": [round(h["valid"]["ndcg@10"], 4) for h in info.get("history", [])],
                "config": model.cfg.to_dict(),
                **({"train": tcfg.to_dict()} if tcfg else {}),
                "beyond_accuracy": beyond_accuracy_report(split, test, lists, text_vectors, progress)}
    raise ValueError(f"unknown model {name!r}")


def _mean_std(runs: list[dict], part: str) -> dict:
    keys = [k for k in runs[0][part] if k != "users"]
    out = {}
    for k in keys:
        vals = np.array([r[part][k] for r in runs])
        out[k] = float(vals.mean())
        out[f"{k}_std"] = float(vals.std())
    out["users"] = runs[0][part]["users"]
    return out


_BEYOND_FIXED = ("k", "users", "catalogue_items")  # the same in every run of a report: passed through


def _beyond_mean_std(runs: list[dict]) -> dict:
    """Mean and `_std` of each number of the runs' `beyond_accuracy`; a metric null in some run is null
    (with the reasons of the runs in `diversity_reason`)."""
    parts = [r["beyond_accuracy"] for r in runs]
    out: dict = {}
    for key, first in parts[0].items():
        vals = [p.get(key) for p in parts]
        if key in _BEYOND_FIXED:
            out[key] = first
        elif key == "diversity_reason":
            reasons = sorted({v for v in vals if v})
            out[key] = "; ".join(reasons) if reasons else None
        elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
            arr = np.array(vals, dtype=np.float64)
            out[key] = float(arr.mean())
            out[f"{key}_std"] = float(arr.std())
        else:
            out[key] = None
            out[f"{key}_std"] = None
    return out


def aggregate(runs: list[dict]) -> dict:
    """Mean and (population) standard deviation over seeds of each test metric (top level), and of the
    test subsets (`next_buy`, `repeat`, `novel`, `cold`, `warm`), validation metrics and `beyond_accuracy`
    (runs that have it: older reports do not) under their own keys."""
    out = _mean_std(runs, "test")
    for part in ("test_next_buy", "test_repeat", "test_novel", "test_cold", "test_warm", "valid"):
        if part in runs[0]:
            out[part.removeprefix("test_")] = _mean_std(runs, part)
    if all("beyond_accuracy" in r for r in runs):
        out["beyond_accuracy"] = _beyond_mean_std(runs)
    return out


def seed_runs_report(runs: list[dict]) -> dict:
    """The seed-dependent part of an `lsti eval --json` report: aggregates, train times and the runs."""
    return {**aggregate(runs), "train_seconds": [run["train_seconds"] for run in runs], "runs": runs}


def pool_reports(reports: list[dict]) -> dict:
    """One report from several `lsti eval --json` outputs of the same dataset, model and configuration
    run with different seeds (e.g. `--first-seed 1` in a second process): runs concatenated, mean and
    spread recomputed over all of them, exactly as one `--seeds N` run would report."""
    if not reports:
        raise ValueError("nothing to pool")
    first = reports[0]

    def same(r: dict) -> tuple:
        return r["dataset"], r["model"], r["n_items"], r["users"], r.get("cold_items"), r["runs"][0].get("config")

    def training(r: dict) -> dict | None:  # older reports did not record it
        t = r["runs"][0].get("train")
        return {k: v for k, v in t.items() if k != "seed"} if t else None

    for r in reports[1:]:
        if same(r) != same(first):
            raise ValueError("reports differ in dataset, model, data or model configuration: not poolable")
        if training(r) and training(first) and training(r) != training(first):
            raise ValueError("reports differ in training configuration: not poolable")
    seeds = [s for r in reports for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed appears twice: {seeds}")
    runs = [run for r in reports for run in r["runs"]]
    out = {k: v for k, v in first.items() if k in ("dataset", "model", "protocol", "users", "n_items", "n_events",
                                                   "cold_items")}
    return {**out, "seeds": seeds, **seed_runs_report(runs), **({"data": first["data"]} if "data" in first else {})}
