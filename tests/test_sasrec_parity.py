"""SASRec parity with its reference (pmixer/SASRec.pytorch): fixed-width padding, the post-LN block, the
reference training loop options (last windows, shuffled batches, no clipping, no warmup) and the CLI recipe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from encoders.sasrec import REFERENCE_MODEL, REFERENCE_TRAIN, SASRec, SASRecConfig, left_pad
from encoders.split import Sequence
from encoders.train import TrainConfig, length_batches, make_batches, random_windows, shuffled_batches

N_ITEMS = 30


def _seq(user: int, items) -> Sequence:
    items = np.asarray(items, np.int64)
    return Sequence(user, items, np.ones(len(items), np.int64), np.arange(len(items)))


def _model(**kw) -> SASRec:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=N_ITEMS, dim=16, max_len=12, dropout=0.0, **kw))
    with torch.no_grad():  # non-trivial biases and norms, so that pad keys and LN affine terms matter
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_left_pad_fixed_width_keeps_the_default_and_pads_every_batch_alike():
    seqs = [_seq(0, [3, 4, 5]), _seq(1, [7])]
    assert left_pad(seqs, max_len=8).tolist() == [[3, 4, 5], [0, 0, 7]]  # default unchanged
    assert left_pad(seqs, max_len=8, width=5).tolist() == [[0, 0, 3, 4, 5], [0, 0, 0, 0, 7]]
    assert left_pad(seqs, max_len=2, width=2).tolist() == [[4, 5], [0, 7]]
    assert left_pad([_seq(0, range(1, 21))], max_len=6, width=6).tolist() == [[15, 16, 17, 18, 19, 20]]


@pytest.mark.parametrize("norm", ["original", "post"])
def test_scores_of_a_user_do_not_depend_on_batch_mates_with_fixed_padding(norm):
    rng = np.random.default_rng(0)
    short = _seq(0, rng.integers(1, N_ITEMS + 1, 4))
    long = _seq(1, rng.integers(1, N_ITEMS + 1, 40))  # longer than max_len: the batch is at full width
    fixed = _model(norm=norm, pad="fixed")
    alone, together = fixed.scores([short], "cpu")[0], fixed.scores([short, long], "cpu")[0]
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)
    # the old variable width: scored alone, the short user sees no pad key; next to a long user, 8 of them
    batch = _model(norm=norm, pad="batch")
    alone, together = batch.scores([short], "cpu")[0], batch.scores([short, long], "cpu")[0]
    assert (alone - together).abs().max() > 1e-3


def _reference_encode(model: SASRec, items: torch.Tensor) -> torch.Tensor:
    """The reference's log2feats with norm_first=False, written out by hand for one attention head."""
    d, length = model.cfg.dim, items.shape[1]
    x = model.item_emb.weight[items] * math.sqrt(d)
    pos = torch.arange(1, length + 1).expand_as(items) * (items != 0)
    x = x + model.pos_emb.weight[pos]
    blocked = ~torch.tril(torch.ones(length, length, dtype=torch.bool))
    for ln_a, attn, ln_f, ffn in zip(model.attn_norms, model.attns, model.ffn_norms, model.ffns, strict=True):
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        q, k, v = x @ w_q.T + b_q, x @ w_k.T + b_k, x @ w_v.T + b_v
        logits = (q @ k.transpose(1, 2) / math.sqrt(d)).masked_fill(blocked, float("-inf"))
        mha = torch.softmax(logits, -1) @ v @ attn.out_proj.weight.T + attn.out_proj.bias
        x = F.layer_norm(x + mha, (d,), ln_a.weight, ln_a.bias, 1e-8)
        h = torch.relu(x @ ffn.fc1.weight.T + ffn.fc1.bias) @ ffn.fc2.weight.T + ffn.fc2.bias
        x = F.layer_norm(x + h, (d,), ln_f.weight, ln_f.bias, 1e-8)
    last = model.last_norm
    return F.layer_norm(x, (d,), last.weight, last.bias, 1e-8)


def test_post_ln_block_has_the_shape_and_values_of_the_reference_formula():
    model = _model(norm="post", pad="fixed")
    items = left_pad([_seq(0, [5, 6, 7]), _seq(1, range(1, 13)), _seq(2, [9])], max_len=12, width=12)
    with torch.no_grad():
        out = model.encode(items)
        expected = _reference_encode(model, items)
    assert out.shape == (3, 12, 16)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert out[0, 0].abs().sum() > 0  # no `* keep`: pad positions carry a state, as in the reference
    # the original block differs (query-only LN, pads zeroed before the last norm)
    original = _model(norm="original", pad="fixed")
    original.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(original.encode(items), out, atol=1e-3)


def test_old_configs_load_as_before_and_bad_values_are_refused():
    cfg = SASRecConfig(n_items=5)
    assert (cfg.norm, cfg.pad) == ("original", "batch")
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("norm", "pad")}  # a config saved before
    assert SASRecConfig(**old) == cfg
    with pytest.raises(ValueError):
        SASRecConfig(n_items=5, norm="pre")
    with pytest.raises(ValueError):
        TrainConfig(windows="first")


def test_post_ln_fixed_width_trains_a_step():
    model = _model(norm="post", pad="fixed").train()
    seqs = [_seq(0, [1, 2, 3, 4]), _seq(1, range(1, 25))]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = model.batch_loss(seqs, "cpu")
    before.backward()
    opt.step()
    assert torch.isfinite(before) and model.batch_loss(seqs, "cpu").item() < before.item()


def test_last_windows_and_shuffled_batches():
    seqs = [_seq(u, range(1, n + 1)) for u, n in enumerate([3, 10, 25, 40, 7])]
    rng = np.random.default_rng(0)
    last = random_windows(seqs, 8, rng, last=True)
    assert [w.items.tolist() for w in last[:2]] == [[1, 2, 3], list(range(1, 11))[-9:]]
    assert last[3].items.tolist() == list(range(32, 41))  # always the last max_len+1 events
    state = rng.bit_generator.state
    assert random_windows(seqs, 8, rng, last=True)[3].items.tolist() == list(range(32, 41))
    assert rng.bit_generator.state == state  # no random number drawn
    batches = shuffled_batches(seqs, 2, np.random.default_rng(1))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert sorted(s.user for b in batches for s in b) == [0, 1, 2, 3, 4]
    assert make_batches(seqs, TrainConfig(batch_size=2, batches="shuffled"), np.random.default_rng(1)) == batches
    bucketed = make_batches(seqs, TrainConfig(batch_size=2), np.random.default_rng(1))
    assert bucketed == length_batches(seqs, 2, np.random.default_rng(1))


def test_recipe_reference_flag_and_overrides():
    from streams.batch.train_options import train_configs
    from streams.cli.main import build_parser

    def parse(*extra):
        return build_parser().parse_args(["eval", "--dataset", "ml-1m", "--model", "sasrec", *extra])

    tcfg, mcfg = train_configs(parse("--recipe", "reference", "--converge"))
    assert (tcfg.windows, tcfg.batches, tcfg.clip, tcfg.warmup, tcfg.batch_size) == ("last", "shuffled", None, 0.0, 128)
    assert tcfg.epochs == 1000 and tcfg.patience == 20 and tcfg.schedule == "constant"  # --converge's rule kept
    assert mcfg == REFERENCE_MODEL and SASRecConfig(n_items=5, **mcfg).norm == "post"
    tcfg, mcfg = train_configs(parse("--recipe", "reference", "--clip", "5", "--pad", "batch", "--batch-size", "64"))
    assert (tcfg.clip, mcfg["pad"], tcfg.batch_size, tcfg.windows) == (5.0, "batch", 64, "last")
    tcfg, mcfg = train_configs(parse())  # no recipe: the reference's, SASRec's default since session 8
    assert (tcfg.windows, tcfg.batches, tcfg.clip, tcfg.warmup, tcfg.batch_size) == ("last", "shuffled", None, 0.0, 128)
    assert mcfg == REFERENCE_MODEL
    tcfg, mcfg = train_configs(parse("--recipe", "lsti"))  # the shared loop's own recipe
    assert (tcfg.windows, tcfg.batches, tcfg.clip, tcfg.warmup) == ("random", "bucketed", 5.0, 0.05) and mcfg == {}
    tcfg, _ = train_configs(parse("--recipe", "lsti", "--clip", "0", "--windows", "last", "--batches", "shuffled",
                                  "--warmup", "0"))
    assert (tcfg.clip, tcfg.windows, tcfg.batches, tcfg.warmup) == (None, "last", "shuffled", 0.0)
    assert set(REFERENCE_TRAIN) <= set(TrainConfig().to_dict())
    with pytest.raises(SystemExit):
        train_configs(build_parser().parse_args(["eval", "--dataset", "ml-1m", "--model", "fused", "--recipe",
                                                 "reference"]))
