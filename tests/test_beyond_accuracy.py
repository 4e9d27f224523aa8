"""Beyond-accuracy metrics of the top-10 lists: hand-computable cases for each metric, the lists being the
ones the accuracy metrics rank in, the multi-seed aggregate and pooling, and `lsti eval --json` end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from encoders.evaluate import aggregate, pool_reports, run_model, seed_runs_report
from encoders.metrics import (
    beyond_accuracy,
    catalogue_coverage,
    intra_list_diversity,
    popularity_bias,
    ranks_and_top_k,
    target_ranks,
    top_k,
)
from encoders.split import EvalCase, Sequence

LN2 = math.log(2.0)


def _case(target: int, hist: list[int]) -> EvalCase:
    n = len(hist)
    return EvalCase(Sequence(0, np.array(hist, np.int64), np.ones(n, np.int64), np.arange(n)), target, 1)


def test_top_k_is_best_first_breaks_ties_by_lower_id_and_leaves_masked_slots_empty():
    scores = torch.tensor([[-torch.inf, 0.5, 0.9, 0.5, 0.1, 0.5],
                           [-torch.inf, -torch.inf, 2.0, -torch.inf, -torch.inf, 1.0]])
    assert top_k(scores, 3).tolist() == [[2, 1, 3], [2, 5, 0]]
    assert top_k(scores, 8).tolist() == [[2, 1, 3, 5, 4, 0, 0, 0], [2, 5, 0, 0, 0, 0, 0, 0]]
    assert top_k(torch.zeros(0, 6), 3).shape == (0, 3)


def test_lists_are_cut_from_the_scores_the_ranks_use():
    """History items masked (except the target), padding item 0 never listed, input scores untouched."""
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0]])
    before = scores.clone()
    ranks, lists = ranks_and_top_k(scores, [_case(3, [1, 3, 5])], k=3)
    assert lists.tolist() == [[2, 3, 4]]  # 1 and 5 masked, 3 is the target, 0 is padding
    assert ranks.tolist() == [1] and torch.equal(scores, before)
    # random continuous scores: the target is in the top-k list exactly when its rank is below k
    rng = np.random.default_rng(0)
    cases = [_case(int(rng.integers(1, 40)), list(rng.integers(1, 40, 5))) for _ in range(200)]
    s = torch.from_numpy(rng.normal(size=(200, 40)).astype(np.float32))
    ranks, lists = ranks_and_top_k(s, cases, k=10)
    np.testing.assert_array_equal(ranks, target_ranks(s, cases))
    hit = np.array([c.target in row for c, row in zip(cases, lists, strict=True)])
    np.testing.assert_array_equal(hit, ranks < 10)
    for c, row in zip(cases, lists, strict=True):
        assert not (set(row.tolist()) & (set(c.history.items.tolist()) - {c.target})) and 0 not in row


def test_catalogue_coverage():
    lists = np.array([[1, 2, 0], [2, 3, 0], [1, 3, 2]])
    assert catalogue_coverage(lists, 6) == (pytest.approx(3 / 6), 3)
    assert catalogue_coverage(np.zeros((2, 3), np.int64), 4) == (0.0, 0)


def test_intra_list_diversity():
    s = 1 / math.sqrt(2)
    vecs = np.array([[0, 0], [1, 0], [0, 2], [s, s], [-3, 0]], np.float32)  # normalised inside: lengths don't count
    div, n = intra_list_diversity(np.array([[1, 2, 0]]), vecs)
    assert (div, n) == (pytest.approx(1.0), 1)  # orthogonal: cos 0
    div, _ = intra_list_diversity(np.array([[1, 4, 0]]), vecs)
    assert div == pytest.approx(2.0)  # opposite: cos -1
    div, _ = intra_list_diversity(np.array([[1, 2, 3]]), vecs)
    assert div == pytest.approx((1 + 2 * (1 - s)) / 3)  # pairs (1,2) (1,3) (2,3)
    # the mean over lists; a list of one item has no pair and is left out
    div, n = intra_list_diversity(np.array([[1, 2, 0], [1, 4, 0], [3, 0, 0]]), vecs, chunk=1)
    assert (div, n) == (pytest.approx(1.5), 2)
    assert intra_list_diversity(np.array([[1, 0, 0]]), vecs) == (None, 0)


def test_popularity_bias():
    pop = np.array([0, 0, 1, 3, 7])  # log1p: ln2 * [0, 0, 1, 2, 3]
    rec, tgt, ratio = popularity_bias(np.array([[3, 4], [2, 0]]), np.array([2, 4]), pop)
    assert rec == pytest.approx(1.75 * LN2)  # per list (2 + 3) / 2 and 1, then the mean
    assert tgt == pytest.approx(2 * LN2) and ratio == pytest.approx(0.875)
    assert popularity_bias(np.array([[2]]), np.array([1]), pop)[2] is None  # targets of popularity 0


def test_beyond_accuracy_object_and_a_missing_vector_reason():
    lists, targets, pop = np.array([[1, 2], [1, 3]]), np.array([2, 3]), np.array([0, 3, 1, 1, 0])
    vecs = np.eye(5, dtype=np.float32)
    ba = beyond_accuracy(lists, targets, pop, 4, vecs)
    assert ba["k"] == 2 and ba["users"] == 2 and ba["catalogue_items"] == 4
    assert ba["coverage@2"] == pytest.approx(0.75) and ba["recommended_items"] == 3
    assert ba["diversity@2"] == pytest.approx(1.0) and ba["diversity_reason"] is None
    assert ba["popularity@2"] == pytest.approx((math.log(4) + math.log(2)) / 2)
    assert ba["popularity_target"] == pytest.approx(math.log(2))
    assert ba["popularity_ratio@2"] == pytest.approx(ba["popularity@2"] / math.log(2))
    none = beyond_accuracy(lists, targets, pop, 4, None, "no BERT here")
    assert none["diversity@2"] is None and none["diversity_reason"] == "no BERT here"
    wrong = beyond_accuracy(lists, targets, pop, 4, vecs[:3])
    assert wrong["diversity@2"] is None and "rows" in wrong["diversity_reason"]


def _split():
    from encoders.data import build_interactions
    from encoders.split import LeaveOneOut

    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{(int(s) + j) % 20}", "view", 1_000_000 + 60 * j)
            for u, s in enumerate(rng.integers(0, 20, 12)) for j in range(10)]
    return LeaveOneOut(build_interactions(rows, {f"i{i}": f"item {i}" for i in range(20)}, name="tiny"))


def test_run_model_reports_beyond_accuracy_and_seeds_aggregate_and_pool():
    split = _split()
    vecs = np.random.default_rng(1).normal(size=(21, 8)).astype(np.float32)
    out = run_model("pop", split, 0, progress=False, text_vectors=vecs)
    ba = out["beyond_accuracy"]
    assert ba["users"] == out["test"]["users"] == 12 and ba["catalogue_items"] == 20
    # pop gives every user the same list minus their own history: few distinct items
    assert 10 / 20 <= ba["coverage@10"] <= 1.0 and 0.0 <= ba["diversity@10"] <= 2.0
    assert ba["popularity@10"] > 0 and ba["popularity_ratio@10"] > 0

    other = {**out, "beyond_accuracy": {**ba, "coverage@10": ba["coverage@10"] - 0.1, "diversity@10": None,
                                        "diversity_reason": "no vectors"}}
    agg = aggregate([out, other])["beyond_accuracy"]
    assert agg["coverage@10"] == pytest.approx(ba["coverage@10"] - 0.05)
    assert agg["coverage@10_std"] == pytest.approx(0.05)
    assert agg["diversity@10"] is None and agg["diversity_reason"] == "no vectors"
    assert agg["users"] == 12 and agg["k"] == 10 and agg["popularity_target_std"] == 0.0
    reports = [{"dataset": "tiny", "model": "pop", "n_items": 20, "users": 12, "seeds": [s], **seed_runs_report([r])}
               for s, r in enumerate([out, other])]
    assert reports[0]["beyond_accuracy"]["diversity@10"] == ba["diversity@10"]
    assert pool_reports(reports)["beyond_accuracy"] == agg
    # reports written before beyond_accuracy still pool, without it
    old = [{**r, "runs": [{k: v for k, v in r["runs"][0].items() if k != "beyond_accuracy"}]} for r in reports]
    assert "beyond_accuracy" not in pool_reports(old)


def test_eval_cli_reports_beyond_accuracy_and_eval_pool_passes_it(fixture_files, tmp_path):
    from streams.config import REPO

    events, items = fixture_files
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True, cwd=REPO,
                             env=env, timeout=600, check=True)
        return json.loads(out.stdout)

    for model in ("pop", "itemknn"):
        res = cli("eval", "--events", str(events), "--items", str(items), "--model", model, "--json", "-q")
        for key in ("ndcg@10", "hr@10", "ndcg@20", "hr@20", "users", "valid", "runs", "protocol"):
            assert key in res
        ba = res["beyond_accuracy"]
        assert ba == aggregate(res["runs"])["beyond_accuracy"] and "beyond_accuracy" in res["protocol"]
        assert ba["k"] == 10 and ba["users"] == res["users"] == 60 and ba["catalogue_items"] == res["n_items"] == 50
        assert 10 / 50 <= ba["coverage@10"] <= 1.0 and ba["coverage@10_std"] == 0.0
        assert 0 < ba["recommended_items"] <= 50
        assert ba["diversity_reason"] is None and 0.0 < ba["diversity@10"] <= 2.0  # real BERT vectors of the texts
        assert ba["diversity_lists"] == 60
        assert ba["popularity@10"] > 0 and ba["popularity_target"] > 0
        assert ba["popularity_ratio@10"] == pytest.approx(ba["popularity@10"] / ba["popularity_target"])
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(res))
    b.write_text(json.dumps({**res, "seeds": [1]}))
    pooled = cli("eval-pool", str(a), str(b))
    assert pooled["beyond_accuracy"]["coverage@10"] == pytest.approx(ba["coverage@10"])
    assert pooled["beyond_accuracy"]["diversity@10"] == pytest.approx(ba["diversity@10"])
