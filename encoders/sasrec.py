"""SASRec (Kang & McAuley, ICDM 2018), the self-attention baseline, in the style of pmixer/SASRec.pytorch.

As in the reference: item embeddings scaled by sqrt(d), learned absolute positional embeddings, embedding
dropout, `n_blocks` blocks of causal multi-head attention and a point-wise feed-forward net, a final layer
norm, and logits = output . item embedding (weight tying). Sequences are LEFT-padded as in the reference,
so the newest event always sits at the last position and its positional embedding means "most recent".

Two block structures (`SASRecConfig.norm`):
- "original" (the default, so that old configs mean what they meant): the first reference's design, where
  only the attention QUERY is layer-normed: `q = LN_a(x); x = q + MHA(q, x, x); x = LN_f(x);
  x = (x + FFN(x)) * keep`, pads zeroed after every block. It is neither standard pre-LN nor post-LN.
- "post": the current reference with `norm_first=False` (post-LN): `x = LN_a(x + MHA(x, x, x));
  x = LN_f(x + FFN(x))`, no timeline `* keep` multiplies, so pad positions carry a learned state as there.
Both end with `last_norm`.

Two paddings (`SASRecConfig.pad`): "batch" (the default) pads to the longest sequence of the batch, so a
user's scores depend on its batch-mates (pad keys are attended to: there is no key-padding mask); "fixed"
pads every sequence to the full width like the reference (max_len+1 in training, max_len in scoring), so
the number of pad keys a user sees is the same in training and scoring and never depends on the batch.

`REFERENCE_MODEL` and `REFERENCE_TRAIN` are the reference recipe (`lsti eval --model sasrec --recipe
reference`): post-LN, fixed width, hidden 50, the last window of each user, plain shuffled batches of 128,
no gradient clipping, no warmup. `lsti eval --model sasrec` uses them unless `--recipe lsti` (they beat the
shared loop's recipe on validation on ml-1m and amazon-mi, BENCHMARKS.md section 1).

One deliberate difference, asked by the protocol: the loss is full-softmax cross-entropy over all
items (not BCE with one sampled negative), on the same split and the same training loop as LSTI,
so the comparison measures the sequence encoder and not the loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from encoders.split import Sequence

NORMS = ("original", "post")
PADS = ("batch", "fixed")


@dataclass
class SASRecConfig:
    n_items: int
    dim: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    max_len: int = 200
    dropout: float = 0.2
    norm: str = "original"  # original (query-only LN, pads zeroed) | post (reference norm_first=False)
    pad: str = "batch"  # batch (longest in the batch) | fixed (always max_len+1 / max_len, as the reference)

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"SASRecConfig.norm must be one of {NORMS}, not {self.norm!r}")
        if self.pad not in PADS:
            raise ValueError(f"SASRecConfig.pad must be one of {PADS}, not {self.pad!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# pmixer/SASRec.pytorch (norm_first=False, hidden 50, 2 blocks, 1 head, maxlen 200, dropout 0.2, Adam 1e-3
# betas (0.9, 0.98), batch 128): the model part (SASRecConfig fields) and the training part (TrainConfig fields).
REFERENCE_MODEL = {"norm": "post", "pad": "fixed", "dim": 50, "n_blocks": 2, "n_heads": 1, "max_len": 200,
                   "dropout": 0.2}
REFERENCE_TRAIN = {"windows": "last", "batches": "shuffled", "clip": None, "warmup": 0.0, "batch_size": 128,
                   "lr": 1e-3}


def next_item_loss(model: nn.Module, items: Tensor) -> Tensor:
    """Full-softmax cross-entropy of the next item at every real position of left-padded windows [B, L]
    (padding and `model.hidden_items` never a class), for any model with `encode` and `item_vectors`."""
    inp, target = items[:, :-1], items[:, 1:]
    valid = (inp > 0) & (target > 0)
    h = model.encode(inp)[valid]
    logits = h @ model.item_vectors().T
    logits[:, 0] = -1e9
    if len(model.hidden_items):
        logits[:, model.hidden_items] = -1e9
    return nn.functional.cross_entropy(logits, target[valid])


def left_pad(seqs: list[Sequence], max_len: int, device: str = "cpu", width: int | None = None) -> Tensor:
    """[B, width] item codes, each sequence's last `max_len` items aligned to the right (0 = padding).

    `width` None: the longest sequence of the batch (at most max_len), so the padding depends on the batch;
    `width` given: exactly that many columns for every batch (the reference's fixed width)."""
    if width is None:
        width = max(1, min(max_len, max((len(s.items) for s in seqs), default=1)))
    keep = min(width, max_len)
    out = np.zeros((len(seqs), width), np.int64)
    for r, s in enumerate(seqs):
        tail = s.items[-keep:] if keep > 0 else s.items[:0]
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
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=items.device), diagonal=1)
        blocks = zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns, strict=True)
        if self.cfg.norm == "post":  # the reference's norm_first=False: LN after each residual, no `* keep`
            x = self.emb_drop(x)
            for norm, attn, ffn_norm, ffn in blocks:
                x = norm(x + attn(x, x, x, attn_mask=causal, need_weights=False)[0])
                x = ffn_norm(x + ffn(x))
            return self.last_norm(x)
        x = self.emb_drop(x) * keep
        for norm, attn, ffn_norm, ffn in blocks:
            q = norm(x)
            out, _ = attn(q, x, x, attn_mask=causal, need_weights=False)
            x = q + out
            x = ffn_norm(x)
            x = (x + ffn(x)) * keep
        return self.last_norm(x)

    def loss(self, items: Tensor) -> Tensor:
        return next_item_loss(self, items)

    def batch_loss(self, seqs: list[Sequence], device: str) -> Tensor:
        width = self.cfg.max_len + 1
        return self.loss(left_pad(seqs, width, device, width if self.cfg.pad == "fixed" else None))

    @torch.no_grad()
    def scores(self, histories: list[Sequence], device: str) -> Tensor:
        """[B, n_items+1] next-item scores from each history's last `max_len` items (with pad "fixed", the
        scores of a user do not depend on the other users of the batch)."""
        width = self.cfg.max_len if self.cfg.pad == "fixed" else None
        h = self.encode(left_pad(histories, self.cfg.max_len, device, width))[:, -1]
        return h @ self.item_vectors().T
