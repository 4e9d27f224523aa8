"""The LSTI interest model: item tower, short-term LSTM, long-term attention pooling, SDM-style gate.

One module, one config dataclass. Everything scores by inner product against `item_vectors()`, so
the user vector lives in the item space and a FAISS inner-product index serves it unchanged.

Online stepping (`encoders.online`) reuses these exact weights and formulas one event at a time:
- step input x_t = [item_vec(i_t); type_emb(e_t); log-gap(t); first(t)]
- (h_t, c_t) = LSTMCell(x_t, h_{t-1}, c_{t-1});   s_t = W_s h_t + b_s
- long-term l = sum_j a_j v(i_j) with a = softmax_j(q . tanh(K text(i_j)) + w[e_j]) and the value
  v(i) = W_l text(i) + b_l, plus a learned id vector of its own, m(i), with `long_ids` (FISM-style: the
  long-term side then pools what the catalogue taught about each item, not only its text)
- g = sigmoid(W_g [s; l; log-gap; log-count] + b_g);   u = g * s + (1 - g) * l
  (g per dimension, or one scalar per user and event with `gate="user"`)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from encoders.data import EVENT_TYPES

MODES = ("fused", "short", "long")
GATES = ("dim", "user")


@dataclass
class LSTIConfig:
    n_items: int
    text_dim: int = 384
    dim: int = 128  # 128 beat 64 by ~20% valid NDCG@10 on ml-1m at the same epochs
    type_dim: int = 16
    max_len: int = 200
    dropout: float = 0.2
    mode: str = "fused"  # fused | short | long
    gate: str = "user"  # user: one scalar per user and event | dim: one per dimension (user: valid NDCG@10
    # 0.1965 vs 0.1921 on ml-1m, seed 0, both with gate_bias 3)
    gate_bias: float = 3.0  # initial gate bias: g = 0.95 at start, so the fused model starts as the LSTM and
    # takes from the long-term side only what helps (valid NDCG@10 0.1921 vs 0.1848 with 0, ml-1m seed 0)
    aux_weight: float = 0.0  # fused only: weight of the short-only and long-only losses added in training
    id_dropout: float = 0.0  # training only: share of items whose id embedding is hidden per batch, so the
    # model also learns to score an item from its text alone, on the same scale (cold start, DropoutNet-style)
    long_ids: bool = False  # long-term values W_l text(i) + b_l + m(i), with m a second, zero-initialised id
    # table: on sparse catalogues text alone left the long-term side weaker than item-KNN

    @property
    def n_types(self) -> int:
        return len(EVENT_TYPES) + 1

    def to_dict(self) -> dict:
        return asdict(self)


def gap_feature(gaps_seconds: np.ndarray | Tensor):
    """Time since the previous event, squashed: log1p(minutes) / 5."""
    if isinstance(gaps_seconds, Tensor):
        return torch.log1p(gaps_seconds.clamp(min=0).float() / 60.0) / 5.0
    return (np.log1p(np.maximum(gaps_seconds, 0).astype(np.float32) / 60.0) / 5.0).astype(np.float32)


def count_feature(n_events: np.ndarray | Tensor):
    """How many events the user has had, squashed: log1p(n) / 5."""
    if isinstance(n_events, Tensor):
        return torch.log1p(n_events.float()) / 5.0
    return (np.log1p(n_events.astype(np.float32)) / 5.0).astype(np.float32)


class LSTIModel(nn.Module):
    def __init__(self, cfg: LSTIConfig, text_vectors: Tensor):
        super().__init__()
        if cfg.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if cfg.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}")
        self.cfg = cfg
        d = cfg.dim
        self.register_buffer("text", text_vectors.float(), persistent=True)  # [n_items+1, text_dim]
        self.text_proj = nn.Linear(cfg.text_dim, d)
        # Zero-initialised id embeddings: an item never seen in training keeps a zero id part and is
        # ranked by its text alone (cold start).
        self.id_emb = nn.Embedding(cfg.n_items + 1, d, padding_idx=0)
        nn.init.zeros_(self.id_emb.weight)
        self.type_emb = nn.Embedding(cfg.n_types, cfg.type_dim, padding_idx=0)
        self.lstm = nn.LSTM(d + cfg.type_dim + 2, d, batch_first=True)
        self.short_out = nn.Linear(d, d)
        self.att_key = nn.Linear(cfg.text_dim, d)
        self.att_query = nn.Parameter(torch.randn(d) / d**0.5)
        self.att_type = nn.Embedding(cfg.n_types, 1)
        nn.init.zeros_(self.att_type.weight)
        self.long_out = nn.Linear(cfg.text_dim, d)
        self.long_default = nn.Parameter(torch.zeros(d))
        if cfg.long_ids:
            self.long_id = nn.Embedding(cfg.n_items + 1, d, padding_idx=0)
            nn.init.zeros_(self.long_id.weight)
        self.gate = nn.Linear(2 * d + 2, d if cfg.gate == "dim" else 1)
        nn.init.constant_(self.gate.bias, cfg.gate_bias)
        # Items hidden from training (the cold-start experiment): left out of the softmax, so training
        # never learns that they exist, as with an item added after training.
        self.register_buffer("hidden_items", torch.zeros(0, dtype=torch.long), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)

    # -- item tower -------------------------------------------------------------------------------
    def item_vectors(self) -> Tensor:
        """[n_items+1, dim]; row 0 (padding) is never recommended."""
        ids = self.id_emb.weight
        if self.training and self.cfg.id_dropout > 0:
            ids = ids * (torch.rand(ids.shape[0], 1, device=ids.device) >= self.cfg.id_dropout).to(ids.dtype)
        return self.text_proj(self.text) + ids

    # -- short-term -------------------------------------------------------------------------------
    def step_inputs(self, item_vecs: Tensor, items: Tensor, etypes: Tensor, gaps: Tensor, first: Tensor):
        return torch.cat(
            [
                self.drop(item_vecs[items]),
                self.type_emb(etypes),
                gap_feature(gaps).unsqueeze(-1),
                first.float().unsqueeze(-1),
            ],
            dim=-1,
        )

    def short_states(self, item_vecs: Tensor, items: Tensor, etypes: Tensor, ts: Tensor) -> Tensor:
        """s_t for every position of right-padded sequences [B, L] -> [B, L, dim]."""
        gaps = torch.zeros_like(ts)
        gaps[:, 1:] = ts[:, 1:] - ts[:, :-1]
        first = torch.zeros_like(items, dtype=torch.bool)
        first[:, 0] = True
        h, _ = self.lstm(self.step_inputs(item_vecs, items, etypes, gaps, first))
        return self.short_out(self.drop(h))

    # -- long-term --------------------------------------------------------------------------------
    def attention_logits(self, items: Tensor, etypes: Tensor) -> Tensor:
        keys = torch.tanh(self.att_key(self.text[items]))
        return keys @ self.att_query + self.att_type(etypes).squeeze(-1)

    def long_values(self, items: Tensor) -> Tensor:
        """v(i): what the long-term side pools for each item (any shape of ids -> that shape + [dim])."""
        values = self.long_out(self.text[items])
        if self.cfg.long_ids:
            values = values + self.drop(self.long_id(items))
        return values

    def long_states(self, items: Tensor, etypes: Tensor) -> Tensor:
        """Causal attention pooling: position t pools items 0..t. Prefix softmax = ratio of cumsums."""
        mask = (items > 0).float()
        z = self.attention_logits(items, etypes)
        z = z - (z * mask - 1e4 * (1 - mask)).max(dim=1, keepdim=True).values.detach()
        w = torch.exp(z.clamp(max=30.0)) * mask
        values = self.long_values(items)
        num = torch.cumsum(w.unsqueeze(-1) * values, dim=1)
        den = torch.cumsum(w, dim=1).unsqueeze(-1).clamp(min=1e-12)
        return num / den

    # -- fusion -----------------------------------------------------------------------------------
    def fuse(self, s: Tensor, long: Tensor, gap_f: Tensor, count_f: Tensor) -> tuple[Tensor, Tensor]:
        """Return (user vector, gate). Gate is 1 where the short-term side decides."""
        if self.cfg.mode == "short":
            return s, torch.ones_like(s)
        if self.cfg.mode == "long":
            return long, torch.zeros_like(long)
        g = torch.sigmoid(self.gate(torch.cat([s, long, gap_f.unsqueeze(-1), count_f.unsqueeze(-1)], -1)))
        return g * s + (1 - g) * long, g

    def branches(self, items: Tensor, etypes: Tensor, ts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(user vectors, gates, short-term, long-term) after every position [B, L, dim], and item vectors."""
        item_vecs = self.item_vectors()
        b, n = items.shape
        # a single-branch mode skips the other branch's compute (the LSTM is most of a `long` epoch)
        s = (self.short_states(item_vecs, items, etypes, ts) if self.cfg.mode != "long"
             else item_vecs.new_zeros(b, n, self.cfg.dim))
        long = (self.long_states(items, etypes) if self.cfg.mode != "short"
                else item_vecs.new_zeros(b, n, self.cfg.dim))
        gaps = torch.zeros_like(ts)
        gaps[:, 1:] = ts[:, 1:] - ts[:, :-1]
        counts = torch.arange(1, items.shape[1] + 1, device=items.device).expand_as(items)
        u, g = self.fuse(s, long, gap_feature(gaps), count_feature(counts))
        return u, g, s, long, item_vecs

    def user_states(self, items: Tensor, etypes: Tensor, ts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """User vectors after every position [B, L, dim], gates, and the item vectors used."""
        u, g, _, _, item_vecs = self.branches(items, etypes, ts)
        return u, g, item_vecs

    def score_users(self, users: Tensor, item_vecs: Tensor) -> Tensor:
        """Inner-product scores [B, n_items+1]: what the FAISS index computes online."""
        return users @ item_vecs.T

    def loss(self, items: Tensor, etypes: Tensor, ts: Tensor) -> Tensor:
        """Full-softmax cross-entropy of the next item at every real position (padding skipped, so no
        logits are computed for it: about half the cost on length-mixed batches).

        With `aux_weight` > 0 (fused), the short-only and long-only vectors are also trained to rank the
        next item on their own, so the gate mixes two vectors that each mean something in item space."""
        u, _, s, long, item_vecs = self.branches(items[:, :-1], etypes[:, :-1], ts[:, :-1])
        target = items[:, 1:]
        valid = (items[:, :-1] > 0) & (target > 0)
        aux = self.cfg.aux_weight > 0 and self.cfg.mode == "fused"
        rows = torch.cat([u[valid], s[valid], long[valid]]) if aux else u[valid]
        logits = self.score_users(rows, item_vecs)
        logits[:, 0] = -1e9
        if len(self.hidden_items):
            logits[:, self.hidden_items] = -1e9
        if not aux:
            return nn.functional.cross_entropy(logits, target[valid])
        n = int(valid.sum())
        per_row = nn.functional.cross_entropy(logits, target[valid].repeat(3), reduction="none")
        return per_row[:n].mean() + self.cfg.aux_weight * (per_row[n : 2 * n].mean() + per_row[2 * n :].mean())

    @torch.no_grad()
    def final_states(self, items: Tensor, etypes: Tensor, ts: Tensor, lengths: Tensor):
        """User vector, gate and long-term vector after each sequence's last real event."""
        u, g, _ = self.user_states(items, etypes, ts)
        idx = (lengths - 1).clamp(min=0)
        rows = torch.arange(items.shape[0], device=items.device)
        return u[rows, idx], g[rows, idx]

    @torch.no_grad()
    def long_term_vectors(self, items: Tensor, etypes: Tensor, lengths: Tensor) -> Tensor:
        """The nightly long-term vector: pooling over the whole (right-padded) history."""
        long = self.long_states(items, etypes)
        rows = torch.arange(items.shape[0], device=items.device)
        out = long[rows, (lengths - 1).clamp(min=0)]
        empty = lengths == 0
        if empty.any():
            out[empty] = self.long_default
        return out
