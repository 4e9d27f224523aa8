"""Long-term user vectors on the wire and at rest: raw float32 bytes, one place encodes and decodes."""

from __future__ import annotations

import numpy as np


def encode_vector(vec: np.ndarray) -> bytes:
    """Long-term vectors travel and rest as raw float32 bytes."""
    return np.asarray(vec, np.float32).tobytes()


def decode_vectors(values: list[bytes | None], dim: int, default: np.ndarray) -> np.ndarray:
    out = np.tile(np.asarray(default, np.float32), (len(values), 1))
    for r, v in enumerate(values):
        if v is not None and len(v) == 4 * dim:
            out[r] = np.frombuffer(v, np.float32)
    return out
