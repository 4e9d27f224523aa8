"""Right-padded tensors from variable-length sequences (padding item 0 sits after the real events)."""

from __future__ import annotations

import numpy as np
import torch

from encoders.split import Sequence


def pad_batch(seqs: list[Sequence], device: str = "cpu", max_len: int | None = None):
    """(items, etypes, ts, lengths) tensors; `max_len` keeps each sequence's last events."""
    if max_len is not None:
        seqs = [Sequence(s.user, s.items[-max_len:], s.etypes[-max_len:], s.ts[-max_len:]) for s in seqs]
    lengths = np.array([len(s.items) for s in seqs], dtype=np.int64)
    width = max(1, int(lengths.max()) if len(seqs) else 1)
    items = np.zeros((len(seqs), width), np.int64)
    etypes = np.zeros((len(seqs), width), np.int64)
    ts = np.zeros((len(seqs), width), np.int64)
    for r, s in enumerate(seqs):
        n = len(s.items)
        items[r, :n] = s.items
        etypes[r, :n] = s.etypes
        ts[r, :n] = s.ts
        if n:
            ts[r, n:] = s.ts[-1]  # keep gaps after the end at zero
    to = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return to(items), to(etypes), to(ts), to(lengths)
