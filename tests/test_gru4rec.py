"""Fast unit tests of the GRU4Rec baseline (full-softmax CE) on tiny synthetic data, and its registration."""

from __future__ import annotations

import numpy as np
import torch
from fixtures import WALK_ITEMS, walk_data

from encoders.evaluate import MODELS, run_model
from encoders.gru4rec import GRU4Rec, GRU4RecConfig
from encoders.split import LeaveOneOut, Sequence
from encoders.train import DEFAULT_LR, TrainConfig

N_ITEMS = WALK_ITEMS
_data = walk_data


def _seq(user: int, items: list[int]) -> Sequence:
    n = len(items)
    return Sequence(user, np.array(items, np.int64), np.ones(n, np.int64), np.arange(n))


def test_scores_shape_and_padding_item_never_scored():
    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, dim=8, max_len=6)).eval()
    s = model.scores([_seq(0, [1, 2, 3]), _seq(1, [5])], "cpu")
    assert s.shape == (2, N_ITEMS + 1)
    assert torch.isneginf(s[:, 0]).all() and torch.isfinite(s[:, 1:]).all()
    assert model.item_emb.weight[0].abs().sum() == 0  # pads are zero vectors


def test_scores_read_only_the_last_max_len_items():
    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, dim=8, max_len=3)).eval()
    a = model.scores([_seq(0, [9, 8, 1, 2, 3])], "cpu")
    b = model.scores([_seq(0, [1, 2, 3])], "cpu")
    assert torch.allclose(a, b)


def test_loss_decreases_on_a_tiny_set():
    torch.manual_seed(0)
    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, dim=16, max_len=8, dropout=0.0))
    seqs = [_seq(u, [(u + j) % N_ITEMS + 1 for j in range(6)]) for u in range(8)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model.batch_loss(seqs, "cpu")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]


def test_hidden_items_are_left_out_of_the_loss():
    model = GRU4Rec(GRU4RecConfig(n_items=N_ITEMS, dim=8, max_len=6, dropout=0.0))
    items = torch.tensor([[0, 1, 2, 3]])
    base = model.loss(items)
    model.hidden_items = torch.tensor([7, 8])
    assert model.loss(items) < base  # fewer competitors in the softmax


def test_registered_like_sasrec():
    from streams.batch.train_options import train_configs
    from streams.cli.main import build_parser

    assert "gru4rec" in MODELS and DEFAULT_LR["gru4rec"] == 1e-3
    args = build_parser().parse_args(["eval", "--dataset", "ml-1m", "--model", "gru4rec", "--dim", "32"])
    assert args.model == "gru4rec"
    tcfg, mcfg = train_configs(args)
    assert mcfg == {"dim": 32} and tcfg.resolved("gru4rec").lr == 1e-3


def test_trains_through_run_model():
    split = LeaveOneOut(_data())
    tcfg = TrainConfig(epochs=1, batch_size=4, device="cpu")
    out = run_model("gru4rec", split, 0, tcfg, {"dim": 8, "max_len": 6, "norm": "post"}, progress=False)
    assert out["test"]["users"] == out["valid"]["users"] == 12
    assert 0.0 <= out["test"]["ndcg@10"] <= 1.0 and out["epochs"] == 1 and out["lr"] == 1e-3
    assert out["config"] == GRU4RecConfig(n_items=N_ITEMS, dim=8, max_len=6).to_dict()


def test_gru4rec_scores_do_not_depend_on_batch_mates():
    """Packed: a short history scored alone or beside a long one gives the same scores (pads never read)."""
    import torch

    from encoders.gru4rec import GRU4Rec, GRU4RecConfig

    torch.manual_seed(0)
    model = GRU4Rec(GRU4RecConfig(n_items=30, dim=8, max_len=20, dropout=0.0)).eval()
    short, long = _seq(0, [3, 5, 7]), _seq(1, list(range(1, 25)))
    alone = model.scores([short], "cpu")
    beside = model.scores([short, long], "cpu")
    torch.testing.assert_close(alone[0], beside[0])
