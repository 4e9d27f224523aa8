"""The state stepped online one event at a time equals the offline LSTM over the same sequence."""

import numpy as np
import torch

from encoders.model import LSTIConfig, LSTIModel
from encoders.online import OnlineModel


def _model(mode: str, gate: str = "dim") -> LSTIModel:
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(31, 384), dim=-1)
    text[0] = 0
    model = LSTIModel(LSTIConfig(n_items=30, dim=16, mode=mode, gate=gate), text)
    with torch.no_grad():  # non-trivial id embeddings and gate, as after training
        model.id_emb.weight.normal_(0, 0.3)
        model.id_emb.weight[0] = 0
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
    for mode, gate in (("fused", "dim"), ("fused", "user"), ("short", "dim"), ("long", "dim")):
        model = _model(mode, gate)
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
