"""Encoders on real weights and tiny data: BERT vectors, dataset adapters, the split, the metrics."""

from __future__ import annotations

import numpy as np

from encoders.data import EVENT_CODE, load_generic
from encoders.split import LeaveOneOut
from encoders.text import TextEncoder


def test_bert_vectors_are_real_and_cached(tmp_path):
    enc = TextEncoder(cache_dir=tmp_path)
    texts = ["A space opera with starships", "Space opera: starships at war", "A recipe for lemon cake"]
    v = enc.encode(texts, progress=False)
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2  # real semantics, not noise
    again = enc.encode(texts, progress=False)
    assert enc.stats["encoded"] == 0 and enc.stats["cached"] == 3
    np.testing.assert_allclose(again, v)


def test_generic_adapter_and_leave_one_out(fixture_files):
    events, items = fixture_files
    d = load_generic(events, items)
    assert d.n_items == 50 and d.n_users == 60
    assert set(np.unique(d.etypes)) <= set(EVENT_CODE.values())
    assert d.item_texts[1].startswith("A ")
    split = LeaveOneOut(d)
    test, valid = split.cases("test"), split.cases("valid")
    assert len(test) == len(valid) == 60
    for s, case in zip(split.train_sequences()[:5], test[:5], strict=True):
        # training holds every event but the last two, in time order
        assert len(s.items) == len(case.history.items) - 1
        assert np.all(np.diff(s.ts) >= 0)
    mask = split.train_mask()
    assert mask.sum() == len(d.items) - 2 * 60


def test_eval_cli_prints_one_json_object_with_protocol_seeds_and_cold_items(fixture_files):
    """`lsti eval --json` is a contract: stdout is exactly one JSON object, progress goes to stderr."""
    import json
    import os
    import subprocess
    import sys

    from streams.config import REPO

    events, items = fixture_files
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", "eval", "--events", str(events), "--items", str(items), "--model",
         "fused", "--epochs", "1", "--dim", "16", "--seeds", "2", "--cold-items", "0.1", "--aux-weight", "0.5",
         "--json"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600,
        check=True)
    res = json.loads(out.stdout)
    assert res["model"] == "fused" and res["seeds"] == [0, 1] and len(res["runs"]) == 2
    assert res["protocol"]["ranking"].startswith("full ranking")
    for key in ("ndcg@10", "ndcg@10_std", "hr@10", "ndcg@20", "hr@20", "users"):
        assert key in res
    assert res["cold_items"]["hidden_items"] > 0 and res["cold"]["users"] + res["warm"]["users"] == res["users"]
    assert res["runs"][0]["config"]["aux_weight"] == 0.5


def test_ctrl_c_ends_training_like_a_plateau_and_keeps_the_best_epoch():
    """A long `--converge` run stopped with Ctrl-C still reports: the best epoch so far, stop reason said."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from encoders.split import Sequence
    from encoders.train import TrainConfig, fit

    seqs = [Sequence(u, np.arange(1, 6), np.ones(5, np.int64), np.arange(5.0)) for u in range(8)]
    split = SimpleNamespace(train_sequences=lambda: seqs)
    model = torch.nn.Linear(2, 1)
    calls = {"n": 0}
    valid = iter([0.1, 0.3, 0.2])

    def batch_loss(batch):
        calls["n"] += 1
        if calls["n"] > 6:  # during the fourth epoch (two batches an epoch)
            raise KeyboardInterrupt
        return model(torch.ones(1, 2)).sum() ** 2

    def evaluate():
        return {"ndcg@10": next(valid), "hr@10": 0.0}

    _, info = fit(model, batch_loss, evaluate, split, 5, TrainConfig(epochs=50, batch_size=4, lr=1e-3,
                                                                      max_minutes=None), "t", progress=False)
    assert info["stop_reason"] == "interrupted" and info["epochs_run"] == 3 and info["best_epoch"] == 2


def test_converge_anneals_from_the_best_weights_after_the_plateau():
    """The one convergence rule: constant rate to a plateau, then back to the best epoch's weights and a
    linear anneal to 0 over `decay_epochs`; the best epoch of either phase is kept."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from encoders.split import Sequence
    from encoders.train import TrainConfig, fit

    seqs = [Sequence(u, np.arange(1, 6), np.ones(5, np.int64), np.arange(5.0)) for u in range(8)]
    split = SimpleNamespace(train_sequences=lambda: seqs)
    model = torch.nn.Linear(2, 1)
    opt_lrs, weights_at_decay = [], []
    valid = iter([0.1, 0.3, 0.2, 0.2, 0.25, 0.35, 0.3])  # best 0.3 at epoch 2, plateau after 4, anneal 5-7
    weights = {}

    def batch_loss(batch):
        return (model(torch.ones(1, 2)).sum() - 1.0) ** 2

    def evaluate():
        v = next(valid)
        if v == 0.3 and "best" not in weights:
            weights["best"] = model.weight.detach().clone()
        return {"ndcg@10": v, "hr@10": 0.0}

    orig_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        opt_lrs.append(self.param_groups[0]["lr"])
        return orig_step(self, *a, **k)

    torch.optim.AdamW.step = step
    try:
        cfg = TrainConfig.converge(batch_size=4, lr=1e-2, max_minutes=None, patience=2, decay_epochs=3, warmup=0)
        orig_load = model.load_state_dict

        def load(state, *a, **k):
            weights_at_decay.append(state["weight"].clone())
            return orig_load(state, *a, **k)

        model.load_state_dict = load
        _, info = fit(model, batch_loss, evaluate, split, 5, cfg, "t", progress=False)
    finally:
        torch.optim.AdamW.step = orig_step
    assert info["stop_reason"] == "plateau, then anneal" and info["epochs_run"] == 7 and info["best_epoch"] == 6
    assert info["plateau"] == {"epoch": 4, "best_valid_ndcg@10": 0.3}
    assert torch.equal(weights_at_decay[0], weights["best"])  # the anneal starts from the best epoch's weights
    assert opt_lrs[:8] == [1e-2] * 8  # constant: 2 batches an epoch, epochs 1-4
    decay = opt_lrs[8:]
    assert len(decay) == 6 and decay[0] == 1e-2 and decay[-1] > 0
    assert all(a > b for a, b in zip(decay[:-1], decay[1:], strict=True))
