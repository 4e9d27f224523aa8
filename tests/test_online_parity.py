"""The state stepped online one event at a time equals the offline LSTM over the same sequence."""

import numpy as np
import torch

from encoders.model import LSTIConfig, LSTIModel
from encoders.online import OnlineModel


def _model(mode: str, gate: str = "dim", long_ids: bool = False) -> LSTIModel:
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(31, 384), dim=-1)
    text[0] = 0
    model = LSTIModel(LSTIConfig(n_items=30, dim=16, mode=mode, gate=gate, long_ids=long_ids), text)
    with torch.no_grad():  # non-trivial id embeddings and gate, as after training
        for table in (model.id_emb, getattr(model, "long_id", None)):
            if table is not None:
                table.weight.normal_(0, 0.3)
                table.weight[0] = 0
    return model.eval()


def _online_user_vector(online: OnlineModel, items, etypes, ts, long):
    h = np.zeros((1, online.dim), np.float32)
    c = np.zeros_like(h)
    last = None
    for n, (i, e, t) in enumerate(zip(items, etypes, ts, strict=True)):
        gap = np.array([0.0 if last is None else t - last])
        h, c = online.step(h, c, np.array([i]), np.array([e]), gap, np.array([last is None]))
        last = t
        u, g = online.user_vectors(h, long[None], gap, np.array([n + 1]))
    return u[0], g[0]


def test_online_equals_offline_for_every_mode():
    rng = np.random.default_rng(1)
    items = rng.integers(1, 31, 25)
    etypes = rng.integers(1, 6, 25)
    ts = np.cumsum(rng.integers(0, 5000, 25)) + 1_000_000_000
    for mode, gate, long_ids in (("fused", "dim", False), ("fused", "user", False), ("short", "dim", False),
                                 ("long", "dim", False), ("fused", "user", True), ("long", "dim", True)):
        model = _model(mode, gate, long_ids)
        online = OnlineModel(model)
        it, et, tt = (torch.tensor(a)[None] for a in (items, etypes, ts))
        u_off, g_off = model.final_states(it, et, tt, torch.tensor([25]))
        long = model.long_term_vectors(it, et, torch.tensor([25]))[0].numpy()
        u_on, g_on = _online_user_vector(online, items, etypes, ts, long)
        np.testing.assert_allclose(u_on, u_off[0].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g_on, g_off[0].mean().item(), rtol=1e-4, atol=1e-5)


def test_cold_items_ranked_from_text_alone():
    model = _model("fused")
    online = OnlineModel(model)
    with torch.no_grad():
        model.id_emb.weight[5] = 0
    vec = online.text_item_vectors(model.text[5:6].numpy())
    np.testing.assert_allclose(vec[0], model.item_vectors()[5].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_long_ids_pool_the_second_id_table_and_the_nightly_pooling_and_extension_keep_it():
    from streams.batch.nightly import LongTermPooling, extend_model

    model = _model("fused", "user", long_ids=True)
    rng = np.random.default_rng(2)
    items = torch.tensor(rng.integers(1, 31, (3, 12)))
    etypes = torch.tensor(rng.integers(1, 6, (3, 12)))
    lengths = torch.tensor([12, 12, 12])
    want = model.long_term_vectors(items, etypes, lengths)
    with torch.no_grad():  # the id part matters: without it the pooled vectors differ
        saved = model.long_id.weight.clone()
        model.long_id.weight.zero_()
        text_only = model.long_term_vectors(items, etypes, lengths)
        model.long_id.weight.copy_(saved)
    assert (want - text_only).abs().max() > 1e-2
    pooled = LongTermPooling(model, [""] + [f"i{k:02d}" for k in range(1, 31)]).long_term_vectors(items, etypes,
                                                                                                  lengths)
    torch.testing.assert_close(pooled, want, rtol=1e-5, atol=1e-6)
    text = torch.cat([model.text, torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)])
    bigger = extend_model(model, text)
    assert torch.equal(bigger.long_id.weight[:31], model.long_id.weight)
    assert torch.all(bigger.long_id.weight[31:] == 0)
    torch.testing.assert_close(bigger.long_term_vectors(items, etypes, lengths), want)
