"""SASRec (Kang & McAuley, ICDM 2018), the self-attention baseline, in the style of pmixer/SASRec.pytorch.

Faithful to the reference: item embeddings scaled by sqrt(d), learned absolute positional embeddings,
embedding dropout, `n_blocks` pre-LN blocks (causal multi-head attention whose query is layer-normed,
then a point-wise feed-forward net), a final layer norm, and logits = output . item embedding (weight
tying). Sequences are LEFT-padded as in the reference, so the newest event always sits at the last
position and its positional embedding means "most recent".

One deliberate difference, asked by the protocol: the loss is full-softmax cross-entropy over all
items (not BCE with one sampled negative), on the same split and the same training windows as LSTI,
so the comparison measures the sequence encoder and not the loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from encoders.split import Sequence


@dataclass
class SASRecConfig:
    n_items: int
    dim: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    max_len: int = 200
    dropout: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


def left_pad(seqs: list[Sequence], max_len: int, device: str = "cpu") -> Tensor:
    """[B, width] item codes, each sequence's last `max_len` items aligned to the right (0 = padding)."""
    width = max(1, min(max_len, max((len(s.items) for s in seqs), default=1)))
    out = np.zeros((len(seqs), width), np.int64)
    for r, s in enumerate(seqs):
        tail = s.items[-width:]
        if len(tail):
            out[r, width - len(tail) :] = tail
    return torch.from_numpy(out).to(device)


class PointWiseFeedForward(nn.Module):
    """Two position-wise linear layers with ReLU (the reference's Conv1d(k=1) pair) and dropout."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(torch.relu(self.fc1(x)))))


class SASRec(nn.Module):
    """Causal self-attention over the item sequence; the last position's output scores the next item."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.item_emb = nn.Embedding(cfg.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len + 1, d, padding_idx=0)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-8) for _ in range(cfg.n_blocks))
        self.attns = nn.ModuleList(
            nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True) for _ in range(cfg.n_blocks)
        )
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-8) for _ in range(cfg.n_blocks))
        self.ffns = nn.ModuleList(PointWiseFeedForward(d, cfg.dropout) for _ in range(cfg.n_blocks))
        self.last_norm = nn.LayerNorm(d, eps=1e-8)
        for name, p in self.named_parameters():  # the reference's xavier init of every matrix
            if p.dim() > 1 and "norm" not in name:
                nn.init.xavier_normal_(p)
        # Items hidden from training (cold start) are left out of the softmax, as in LSTIModel.
        self.register_buffer("hidden_items", torch.zeros(0, dtype=torch.long), persistent=False)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            self.pos_emb.weight[0].zero_()

    def item_vectors(self) -> Tensor:
        """[n_items+1, dim]: the tied output embeddings."""
        return self.item_emb.weight

    def encode(self, items: Tensor) -> Tensor:
        """Hidden state after every position of left-padded sequences [B, L] -> [B, L, dim]."""
        length = items.shape[1]
        keep = (items > 0).unsqueeze(-1)
        x = self.item_emb(items) * self.cfg.dim**0.5
        # positions 1..L, right-aligned: the newest event is always position L (= max_len when full)
        pos = torch.arange(self.cfg.max_len - length + 1, self.cfg.max_len + 1, device=items.device)
        x = x + self.pos_emb(pos.expand_as(items) * (items > 0))
        x = self.emb_drop(x) * keep
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=items.device), diagonal=1)
        for norm, attn, ffn_norm, ffn in zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns, strict=True):
            q = norm(x)
            out, _ = attn(q, x, x, attn_mask=causal, need_weights=False)
            x = q + out
            x = ffn_norm(x)
            x = (x + ffn(x)) * keep
        return self.last_norm(x)

    def loss(self, items: Tensor) -> Tensor:
        """Full-softmax cross-entropy of the next item at every real position."""
        inp, target = items[:, :-1], items[:, 1:]
        valid = (inp > 0) & (target > 0)
        h = self.encode(inp)[valid]
        logits = h @ self.item_vectors().T
        logits[:, 0] = -1e9
        if len(self.hidden_items):
            logits[:, self.hidden_items] = -1e9
        return nn.functional.cross_entropy(logits, target[valid])

    def batch_loss(self, seqs: list[Sequence], device: str) -> Tensor:
        return self.loss(left_pad(seqs, self.cfg.max_len + 1, device))

    @torch.no_grad()
    def scores(self, histories: list[Sequence], device: str) -> Tensor:
        """[B, n_items+1] next-item scores from each history's last `max_len` items."""
        h = self.encode(left_pad(histories, self.cfg.max_len, device))[:, -1]
        return h @ self.item_vectors().T
