"""Fast unit tests of the ranking models and metrics on tiny synthetic data (no BERT, no Kafka)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures import WALK_ITEMS, walk_data

from encoders.data import build_interactions
from encoders.evaluate import run_model
from encoders.itemknn import ItemKNN, ItemKNNConfig
from encoders.metrics import summarize, target_ranks
from encoders.model import LSTIConfig, LSTIModel
from encoders.sasrec import SASRec, SASRecConfig, left_pad
from encoders.split import EvalCase, LeaveOneOut, Sequence
from encoders.train import TrainConfig

N_ITEMS = WALK_ITEMS
_data = walk_data


def _text(n_items: int = N_ITEMS, dim: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(n_items + 1, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[0] = 0
    return v


def test_sasrec_trains_a_step_and_is_causal():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=N_ITEMS, dim=16, max_len=8, dropout=0.0))
    items = torch.randint(1, N_ITEMS + 1, (4, 9))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model.loss(items)
    before.backward()
    opt.step()
    assert torch.isfinite(before) and model.loss(items).item() < before.item()

    model.eval()
    seq = torch.randint(1, N_ITEMS + 1, (1, 8))
    changed = seq.clone()
    changed[0, 5:] = (changed[0, 5:] % N_ITEMS) + 1  # alter only the future of position 4
    h, h2 = model.encode(seq), model.encode(changed)
    torch.testing.assert_close(h[0, :5], h2[0, :5])
    assert not torch.allclose(h[0, 5:], h2[0, 5:])


def test_sasrec_left_pads_so_the_newest_item_is_last():
    seqs = [Sequence(0, np.array([3, 4, 5]), np.ones(3, np.int64), np.arange(3)),
            Sequence(1, np.array([7]), np.ones(1, np.int64), np.arange(1))]
    assert left_pad(seqs, max_len=8).tolist() == [[3, 4, 5], [0, 0, 7]]
    assert left_pad(seqs, max_len=2).tolist() == [[4, 5], [0, 7]]


def test_itemknn_scores_co_occurring_items():
    split = LeaveOneOut(_data())
    knn = ItemKNN(ItemKNNConfig(neighbors=5, shrink=0.0), N_ITEMS).fit(split)
    assert knn.sim.shape == (N_ITEMS + 1, N_ITEMS + 1)
    sim = knn.sim.toarray()
    assert np.all(np.diag(sim) == 0) and np.all(np.isfinite(sim)) and sim.max() > 0
    assert np.all((sim > 0).sum(1) <= 5)
    cases = split.cases("test")
    scores = knn.scores(cases)
    assert scores.shape == (len(cases), N_ITEMS + 1)
    # neighbours in the walk co-occur most: the target is scored above an average item
    ranks = target_ranks(scores.clone(), cases)
    assert np.mean(ranks) < (N_ITEMS - 9) / 2


def test_run_model_for_baselines_shares_the_split():
    split = LeaveOneOut(_data())
    tcfg = TrainConfig(epochs=1, batch_size=4, device="cpu")
    for name in ("pop", "itemknn", "sasrec"):
        out = run_model(name, split, 0, tcfg, {"dim": 8, "max_len": 6}, progress=False)
        assert out["test"]["users"] == out["valid"]["users"] == 12
        assert 0.0 <= out["test"]["ndcg@10"] <= 1.0


def test_repeat_targets_are_reported_apart_from_novel_ones():
    """Users 0-3 end on an item they already had (a repeat), the others on a new one."""
    rows = []
    for u in range(8):
        walk = [1, 2, 3, 4, 5, 6] if u >= 4 else [1, 2, 3, 4, 5, 2]
        rows += [(f"u{u}", f"i{(i + u) % N_ITEMS}", "view", 1_000_000 + 60 * j) for j, i in enumerate(walk)]
    split = LeaveOneOut(build_interactions(rows, {f"i{i}": f"item {i}" for i in range(N_ITEMS)}, name="tiny"))
    out = run_model("pop", split, 0, progress=False)
    assert out["test_repeat"]["users"] == 4 and out["test_novel"]["users"] == 4
    # the repeat target is the only unmasked history item: pop ranks it among the few items with counts
    assert out["test_repeat"]["hr@10"] == 1.0
    assert "test_repeat" not in run_model("pop", LeaveOneOut(_data()), 0, progress=False)


def test_reports_of_other_seeds_pool_like_one_multi_seed_run():
    from encoders.evaluate import aggregate, pool_reports, seed_runs_report

    split = LeaveOneOut(_data())
    tcfg = TrainConfig(epochs=1, batch_size=4, device="cpu")
    runs = [run_model("sasrec", split, s, tcfg, {"dim": 8, "max_len": 6}, progress=False) for s in (0, 1)]
    reports = [{"dataset": "tiny", "model": "sasrec", "n_items": N_ITEMS, "users": 12, "seeds": [s],
                **seed_runs_report([r])} for s, r in enumerate(runs)]
    pooled = pool_reports(reports)
    assert pooled["seeds"] == [0, 1] and pooled["ndcg@10"] == aggregate(runs)["ndcg@10"]
    assert pooled["valid"] == aggregate(runs)["valid"]
    with pytest.raises(ValueError, match="seed appears twice"):
        pool_reports([reports[0], reports[0]])
    other = {**reports[1], "runs": [{**runs[1], "config": {**runs[1]["config"], "dim": 16}}]}
    with pytest.raises(ValueError, match="not poolable"):
        pool_reports([reports[0], other])


@pytest.mark.parametrize("mode", ["fused", "short", "long"])
def test_lsti_trains_through_run_model(mode):
    split = LeaveOneOut(_data())
    tcfg = TrainConfig(epochs=1, batch_size=4, device="cpu")
    out = run_model(mode, split, 0, tcfg, {"dim": 8, "type_dim": 4, "text_dim": 8}, progress=False,
                    text_vectors=_text())
    assert 0.0 <= out["valid"]["ndcg@10"] <= 1.0 and out["epochs"] == 1


def test_cold_start_split_hides_items_from_every_model_and_reports_them_apart():
    from encoders.split import hold_out_items
    from encoders.train import train_lsti

    data = _data()
    hidden = hold_out_items(data, 0.2, seed=0)
    assert len(hidden) == 4
    split = LeaveOneOut(data, hidden)
    assert not any(np.isin(s.items, hidden).any() for s in split.train_sequences())
    assert not np.isin(data.items[split.train_mask()], hidden).any()
    tcfg = TrainConfig(epochs=1, batch_size=4, device="cpu")
    pop = run_model("pop", split, 0, tcfg, progress=False)
    n_cold = int(np.isin([c.target for c in split.cases("test")], hidden).sum())
    assert pop["test_cold"]["users"] == n_cold and pop["test_warm"]["users"] == 12 - n_cold
    cfg = LSTIConfig(n_items=data.n_items, text_dim=8, dim=8, type_dim=4, aux_weight=0.5, id_dropout=0.3)
    model, _ = train_lsti(split, _text(), cfg, tcfg, progress=False)
    emb = model.id_emb.weight.detach()
    # hidden items never got a gradient (out of the data and of the softmax): ranked by their text alone
    assert torch.all(emb[torch.from_numpy(hidden)] == 0) and emb.abs().sum() > 0


@pytest.mark.parametrize("gate", ["dim", "user"])
def test_gate_is_a_convex_mix_of_short_and_long(gate):
    torch.manual_seed(0)
    cfg = LSTIConfig(n_items=N_ITEMS, text_dim=8, dim=8, type_dim=4, gate=gate)
    model = LSTIModel(cfg, torch.from_numpy(_text())).eval()
    items = torch.randint(1, N_ITEMS + 1, (3, 7))
    etypes = torch.ones_like(items)
    ts = torch.cumsum(torch.randint(0, 1000, (3, 7)), dim=1)
    with torch.no_grad():
        u, g, item_vecs = model.user_states(items, etypes, ts)
        s = model.short_states(item_vecs, items, etypes, ts)
        long = model.long_states(items, etypes)
    assert torch.all(g > 0) and torch.all(g < 1)
    assert g.shape[-1] == (8 if gate == "dim" else 1)
    torch.testing.assert_close(u, g * s + (1 - g) * long)


def _cases(targets: list[int], n_hist: int = 3) -> list[EvalCase]:
    """Histories of items far from the targets, so masking never touches a target."""
    hist = np.arange(N_ITEMS - n_hist + 1, N_ITEMS + 1)
    return [EvalCase(Sequence(0, hist, np.ones(n_hist, np.int64), np.arange(n_hist)), t, 1) for t in targets]


def test_perfect_scorer_gets_ndcg_one():
    cases = _cases([1, 2, 3, 4])
    scores = torch.zeros(len(cases), N_ITEMS + 1)
    scores[torch.arange(len(cases)), torch.tensor([1, 2, 3, 4])] = 1.0
    m = summarize(target_ranks(scores, cases))
    assert m["ndcg@10"] == pytest.approx(1.0) and m["hr@10"] == pytest.approx(1.0)


def test_constant_scorer_gets_chance_level():
    cases = _cases(list(range(1, 11)))
    ranks = target_ranks(torch.zeros(len(cases), N_ITEMS + 1), cases)
    candidates = N_ITEMS - 3  # all items minus the masked history (the target is one of them)
    assert np.all(ranks == (candidates - 1) // 2)  # expected rank under random tie-breaking
    assert summarize(ranks)["hr@10"] == pytest.approx(float((candidates - 1) // 2 < 10))
