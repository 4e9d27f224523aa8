"""Train (or reuse) a model and write a versioned artifact: weights, item index, long-term vectors.

Long-term vectors are pooled over each user's training events only (the cutoff before the
validation and test targets), the same events the model was fitted on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from encoders.batching import pad_batch
from encoders.data import Interactions, load_dataset
from encoders.evaluate import text_vectors_for
from encoders.model import LSTIConfig, LSTIModel
from encoders.split import LeaveOneOut, Sequence
from encoders.train import TrainConfig, evaluate_lsti, pick_device, train_lsti
from index import ItemIndex
from streams.artifacts import current_version, default_artifacts_dir, set_current, write_artifact

log = logging.getLogger("lsti.build")


@torch.no_grad()
def long_term_vectors(model: LSTIModel, seqs: list[Sequence], batch: int = 256) -> np.ndarray:
    out = np.zeros((len(seqs), model.cfg.dim), np.float32)
    device = next(model.parameters()).device
    for i in range(0, len(seqs), batch):
        items, etypes, _ts, lengths = pad_batch(seqs[i : i + batch], str(device))
        out[i : i + batch] = model.long_term_vectors(items, etypes, lengths).cpu().numpy()
    return out


class ValidSubset:
    """The split as training sees it, with model selection (early stopping) on a fixed random subset of
    the validation users: each epoch's evaluation costs n / all of a full pass (the demo's short recipe).
    Training events are the same; the test evaluation afterwards uses the full split."""

    def __init__(self, split: LeaveOneOut, n_users: int, seed: int = 0):
        self.split = split
        self.n_users = n_users
        self.seed = seed

    def __getattr__(self, name: str):
        return getattr(self.split, name)

    def cases(self, stage: str, target_etype: int | None = None):
        cases = self.split.cases(stage, target_etype)
        if stage != "valid" or len(cases) <= self.n_users:
            return cases
        keep = np.sort(np.random.default_rng(self.seed).choice(len(cases), self.n_users, replace=False))
        return [cases[i] for i in keep]


def item_index_for(model: LSTIModel, factory: str | None = None) -> ItemIndex:
    """The item index; the factory string defaults by catalogue size (index/defaults.py, measured)."""
    from index.defaults import recommended_factory

    with torch.no_grad():
        vecs = model.item_vectors().cpu().numpy()
    factory = factory or recommended_factory(len(vecs) - 1)
    return ItemIndex.build(vecs[1:], np.arange(1, len(vecs), dtype=np.int64), factory=factory)


def build(
    dataset: str | None = "ml-1m",
    data_dir: Path | None = None,
    events: Path | None = None,
    items: Path | None = None,
    mode: str = "fused",
    train_cfg: TrainConfig | None = None,
    model_cfg: dict | None = None,
    root: Path | None = None,
    version: str | None = None,
    progress: bool = True,
    data: Interactions | None = None,
    valid_users: int | None = None,
    recipe: str | None = None,
) -> Path:
    """Train on the leave-one-out training part, evaluate on test, write and activate an artifact.

    `valid_users`: select the best epoch on a random subset of this many validation users (cheaper
    epochs); the test figures are always over every test user. `recipe`: a name recorded in the manifest."""
    root = root or default_artifacts_dir()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = data or load_dataset(dataset, data_dir, events, items)
    split = LeaveOneOut(data)
    log.info("dataset %s: %d users, %d items, %d events", data.name, data.n_users, data.n_items, len(data.items))
    tv = text_vectors_for(data, progress)
    cfg = LSTIConfig(n_items=data.n_items, mode=mode, **(model_cfg or {}))
    tcfg = train_cfg or TrainConfig()
    train_split = ValidSubset(split, valid_users, tcfg.seed) if valid_users else split
    model, info = train_lsti(train_split, tv, cfg, tcfg, progress=progress)
    device = pick_device(tcfg.device)
    test = evaluate_lsti(model, split.cases("test"), device)
    log.info("test (leave-one-out, full ranking): ndcg@10 %.4f hr@10 %.4f", test["ndcg@10"], test["hr@10"])
    model = model.cpu()
    train_seqs = split.train_sequences()
    longs = long_term_vectors(model, train_seqs)
    users = [data.user_ids[s.user] for s in train_seqs]
    version = version or f"{data.name}-{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    meta = {
        "dataset": data.name, "mode": mode, "train": tcfg.to_dict(), "train_info": {
            k: v for k, v in info.items() if k != "history"},
        "test_metrics": test, "cutoff": "per-user leave-one-out training part",
        "cutoff_ts": int(data.ts.max()) if len(data.ts) else 0, "build_seconds": time.perf_counter() - t0,
        "test_protocol": "leave-one-out by time, full ranking over all items, history masked",
    }
    if valid_users:
        meta["selection_valid_users"] = min(valid_users, len(split.eval_users))
    if recipe:
        meta["recipe"] = recipe
    popularity = np.bincount(np.asarray(data.items, np.int64), minlength=len(data.item_ids))[: len(data.item_ids)]
    path = write_artifact(root, version, model, data.item_ids, item_index_for(model), users, longs, meta,
                          popularity=popularity)
    set_current(root, version)
    log.info("artifact %s written and made current", path)
    return path


def find_artifact(root: Path | None = None, dataset: str | None = None) -> Path | None:
    """The CURRENT artifact (optionally only if it was built from `dataset`)."""
    import json

    root = root or default_artifacts_dir()
    version = current_version(root) if root.exists() else None
    if not version or not (root / version / "manifest.json").exists():
        return None
    if dataset and json.loads((root / version / "manifest.json").read_text()).get("dataset") != dataset:
        return None
    return root / version
