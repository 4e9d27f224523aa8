"""The trained model, stepped one event at a time for a whole micro-batch of users, in numpy.

Same weights and formulas as `encoders.model.LSTIModel` (see its docstring), so a state built
online event by event equals the state the offline LSTM computes over the same sequence. numpy and
one compiled loop for the recurrence (`encoders/lstm_kernel.py`) keep the per-batch overhead of a stream
worker low (no autograd, no torch dispatch per call, no numpy call per event).
"""

from __future__ import annotations

import numpy as np
import torch

from encoders.lstm_kernel import lstm_events
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
        self.b = (p["lstm.bias_ih_l0"] + p["lstm.bias_hh_l0"]).astype(np.float32)
        self.w_s, self.b_s = p["short_out.weight"].T.copy(), p["short_out.bias"]
        self.w_g, self.b_g = p["gate.weight"].T.copy(), p["gate.bias"]
        self.w_tp, self.b_tp = p["text_proj.weight"].T.copy(), p["text_proj.bias"]
        self.long_default = p["long_default"]
        self.mode = model.cfg.mode

    def features(self, items: np.ndarray, etypes: np.ndarray, gaps: np.ndarray, first: np.ndarray) -> np.ndarray:
        """The LSTM input of many events at once ([E, features] float32): item vector, event type, gap, first."""
        return np.concatenate(
            [self.item_vecs[items], self.type_emb[etypes], gap_feature(gaps)[:, None],
             np.asarray(first, np.float32)[:, None]], axis=1, dtype=np.float32)

    def step_events(self, h: np.ndarray, c: np.ndarray, rows: np.ndarray, items: np.ndarray, etypes: np.ndarray,
                    gaps: np.ndarray, first: np.ndarray) -> np.ndarray:
        """Step E events, in order, into their users' rows (`rows`) of h and c ([U, dim] float32, updated in
        place; several events of one user follow each other); returns each event's new h ([E, dim])."""
        x = self.features(items, etypes, gaps, first)
        out = np.empty((len(x), self.dim), np.float32)
        if len(x):
            lstm_events(x, np.ascontiguousarray(rows, np.int64), h, c, self.w_ih, self.w_hh, self.b, out)
        return out

    def step(self, h: np.ndarray, c: np.ndarray, items: np.ndarray, etypes: np.ndarray,
             gaps: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One LSTM step for B users at once: [B, dim] states in, [B, dim] states out (inputs untouched)."""
        h = np.array(h, np.float32, order="C")
        c = np.array(c, np.float32, order="C")
        self.step_events(h, c, np.arange(len(h)), items, etypes, gaps, first)
        return h, c

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
