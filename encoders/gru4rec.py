"""GRU4Rec (Hidasi et al., ICLR 2016), the recurrent baseline, trained with full-softmax cross-entropy.

The recipe: item embedding -> dropout -> `n_layers` GRU layers -> dropout -> logits = output . item
embedding (weight tying), the cross-entropy loss over all items as in Hidasi & Karatzoglou (CIKM 2018,
"Recurrent neural networks with top-k gains") and the later "GRU4Rec with full softmax" comparisons
(e.g. Petrov & Macdonald 2022). Sequences are LEFT-padded with `encoders.sasrec.left_pad`, as SASRec's,
so the newest event always sits at the last position; `encode` packs the sequences so the GRU never reads
a pad, and a user's states do not depend on the batch's other histories.

Our choices, not the paper's: an item embedding layer instead of one-hot inputs, tied input/output
embeddings, no session-parallel mini-batches (users' windows go through the same training loop, windows,
optimiser, schedule and early stopping as LSTI and SASRec), the loss on every real position of a window
(next-item targets, like SASRec's) instead of the last one only, and the loop's AdamW at lr 1e-3 (`DEFAULT_LR`).
As for SASRec, the loss is full-softmax cross-entropy over all items so the comparison measures the
sequence encoder and not the loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from encoders.sasrec import left_pad, next_item_loss
from encoders.split import Sequence


@dataclass
class GRU4RecConfig:
    n_items: int
    dim: int = 64
    n_layers: int = 1
    dropout: float = 0.2  # on the embeddings and on the GRU output
    max_len: int = 200

    def to_dict(self) -> dict:
        return asdict(self)


class GRU4Rec(nn.Module):
    """A GRU over the item sequence; the last position's output scores the next item."""

    def __init__(self, cfg: GRU4RecConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.item_emb = nn.Embedding(cfg.n_items + 1, d, padding_idx=0)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(d, d, num_layers=cfg.n_layers, batch_first=True)
        self.out_drop = nn.Dropout(cfg.dropout)
        nn.init.xavier_normal_(self.item_emb.weight)
        # Items hidden from training (cold start) are left out of the softmax, as in LSTIModel and SASRec.
        self.register_buffer("hidden_items", torch.zeros(0, dtype=torch.long), persistent=False)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def item_vectors(self) -> Tensor:
        """[n_items+1, dim]: the tied output embeddings."""
        return self.item_emb.weight

    def encode(self, items: Tensor) -> Tensor:
        """Hidden state after every position of left-padded sequences [B, L] -> [B, L, dim] (zeros at pads).

        The GRU never reads the pads: each row is rotated so its items come first, packed by length, run,
        and rotated back. So a user's states do not depend on how many pads the batch's longest history
        put in front of them (a GRU reading zero pad embeddings would still move through its biases)."""
        b, length = items.shape
        n = (items > 0).sum(1)
        pos = torch.arange(length, device=items.device)
        idx = (pos[None, :] + (length - n)[:, None]) % length  # right-aligned -> left-aligned positions
        first = items.gather(1, idx)  # each row's items first, then its pads
        packed = nn.utils.rnn.pack_padded_sequence(self.emb_drop(self.item_emb(first)), n.clamp(min=1).cpu(),
                                                   batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=length)
        back = (pos[None, :] - (length - n)[:, None]) % length
        out = out.gather(1, back[:, :, None].expand(-1, -1, out.shape[2])) * (items > 0)[:, :, None]
        return self.out_drop(out)

    def loss(self, items: Tensor) -> Tensor:
        return next_item_loss(self, items)

    def batch_loss(self, seqs: list[Sequence], device: str) -> Tensor:
        return self.loss(left_pad(seqs, self.cfg.max_len + 1, device))

    @torch.no_grad()
    def scores(self, histories: list[Sequence], device: str) -> Tensor:
        """[B, n_items+1] next-item scores from each history's last `max_len` items; padding item 0 is -inf."""
        h = self.encode(left_pad(histories, self.cfg.max_len, device))[:, -1]
        s = h @ self.item_vectors().T
        s[:, 0] = -torch.inf
        return s
