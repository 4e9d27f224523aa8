"""The trained model, stepped one event at a time for a whole micro-batch of users, in numpy.

Same weights and formulas as `encoders.model.LSTIModel` (see its docstring), so a state built
online event by event equals the state the offline LSTM computes over the same sequence. numpy
keeps the per-batch overhead of a stream worker low (no autograd, no torch dispatch per call).
"""

from __future__ import annotations

import numpy as np
import torch

from encoders.model import LSTIConfig, LSTIModel, count_feature, gap_feature


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1.0)


class OnlineModel:
    """Batched LSTM step + gate + fusion; item vectors for the index and for new items' text."""

    def __init__(self, model: LSTIModel):
        model = model.cpu().eval()
        self.cfg: LSTIConfig = model.cfg
        self.dim = model.cfg.dim
        p = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
        with torch.no_grad():
            self.item_vecs = model.item_vectors().numpy().astype(np.float32)
        self.type_emb = p["type_emb.weight"]
        self.w_ih, self.w_hh = p["lstm.weight_ih_l0"].T.copy(), p["lstm.weight_hh_l0"].T.copy()
        self.b = p["lstm.bias_ih_l0"] + p["lstm.bias_hh_l0"]
        self.w_s, self.b_s = p["short_out.weight"].T.copy(), p["short_out.bias"]
        self.w_g, self.b_g = p["gate.weight"].T.copy(), p["gate.bias"]
        self.w_tp, self.b_tp = p["text_proj.weight"].T.copy(), p["text_proj.bias"]
        self.long_default = p["long_default"]
        self.mode = model.cfg.mode

    def input_gates(self, items: np.ndarray, etypes: np.ndarray, gaps: np.ndarray, first: np.ndarray) -> np.ndarray:
        """x_t W_ih + b for many events at once ([E, 4*dim]): the part of the step that needs no state."""
        x = np.concatenate(
            [self.item_vecs[items], self.type_emb[etypes], gap_feature(gaps)[:, None],
             first.astype(np.float32)[:, None]], axis=1)
        return x @ self.w_ih + self.b

    def recur(self, zx: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The recurrent part of the step, given the events' input gates."""
        z = zx + h @ self.w_hh
        d = self.dim
        i, f, o = _sigmoid(z[:, :d]), _sigmoid(z[:, d : 2 * d]), _sigmoid(z[:, 3 * d :])
        g = np.tanh(z[:, 2 * d : 3 * d])
        c = f * c + i * g
        h = o * np.tanh(c)
        return h.astype(np.float32), c.astype(np.float32)

    def step(self, h: np.ndarray, c: np.ndarray, items: np.ndarray, etypes: np.ndarray,
             gaps: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One LSTM step for B users at once: [B, dim] states in, [B, dim] states out."""
        return self.recur(self.input_gates(items, etypes, gaps, first), h, c)

    def user_vectors(self, h: np.ndarray, long: np.ndarray, gaps: np.ndarray,
                     counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(user vectors [B, dim], mean gate per user [B]); gate 1 = short-term decided."""
        s = h @ self.w_s + self.b_s
        if self.mode == "short":
            return s.astype(np.float32), np.ones(len(s), np.float32)
        if self.mode == "long":
            return long.astype(np.float32), np.zeros(len(s), np.float32)
        feats = np.concatenate([s, long, gap_feature(gaps)[:, None], count_feature(counts)[:, None]], axis=1)
        g = _sigmoid(feats @ self.w_g + self.b_g)
        return (g * s + (1 - g) * long).astype(np.float32), g.mean(axis=1).astype(np.float32)

    def text_item_vectors(self, text_vectors: np.ndarray) -> np.ndarray:
        """Vectors for items unseen in training, from their BERT text vectors alone (cold start)."""
        return (text_vectors @ self.w_tp + self.b_tp).astype(np.float32)
