"""The online LSTM step as one compiled loop over a micro-batch's events, in arrival order (numba).

Why: a batch holds several events of a heavy user, and they must be stepped in order. Stepped with
numpy in rounds (round r = every user's r-th event), each round costs some twenty numpy calls whatever
its size, and one hot partition's batch of 500 can hold hundreds of one user's events: the rounds cost
more than the model's arithmetic. Compiled, an event costs only its own multiply-adds
((features + dim) x 4 dim) and its gates' activations.

Activations: tanh is Eigen's float32 rational approximation (`fast_tanh`: max abs error 3.5e-7 against the
exact tanh over [-20, 20]), and sigmoid(x) = (tanh(x / 2) + 1) / 2 as in `encoders/online.py`: pure
arithmetic, so the loops over a gate vector vectorise; calls to libm's expf/tanhf cost 8 of the 11
us/event this kernel took with them.

Each event's new (h, c) is computed from its own inputs and its user's previous state alone, in one
fixed order of summation: the same bits however the events were batched (no fused multiply-add
contraction, no reassociation: numba's default, `fastmath` off).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_CLAMP = np.float32(7.90531110763549805)
_A1, _A3, _A5, _A7 = (np.float32(4.89352455891786e-03), np.float32(6.37261928875436e-04),
                      np.float32(1.48572235717979e-05), np.float32(5.12229709037114e-08))
_A9, _A11, _A13 = np.float32(-8.60467152213735e-11), np.float32(2.00018790482477e-13), np.float32(-2.76076847742355e-16)
_B0, _B2, _B4, _B6 = (np.float32(4.89352518554385e-03), np.float32(2.26843463243900e-03),
                      np.float32(1.18534705686654e-04), np.float32(1.19825839466702e-06))


@njit(cache=True, inline="always")
def fast_tanh(x):  # pragma: no cover (compiled)
    """tanh of a float32, Eigen's rational approximation (odd degree 13 over even degree 6, clamped)."""
    x = min(max(x, -_CLAMP), _CLAMP)
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return x * p / q


# Typed up front: compiled (or read from the on-disk cache) at import, not at the first batch.
@njit("void(float32[:, ::1], int64[::1], float32[:, ::1], float32[:, ::1], float32[:, ::1], float32[:, ::1], "
      "float32[::1], float32[:, ::1])", cache=True, nogil=True)
def lstm_events(x, rows, h, c, w_ih, w_hh, b, h_out):  # pragma: no cover (compiled; tests call it through numba)
    """Step event e (features x[e], float32) into user row rows[e] of h and c [U, dim] (float32, updated in
    place) with PyTorch's LSTM cell: z = b + x W_ih + h W_hh, gates i, f, g, o; h_out[e] = the new h."""
    n, f = x.shape
    d = h.shape[1]
    d4 = 4 * d
    half = np.float32(0.5)
    z = np.empty(d4, np.float32)
    a = np.empty(d4, np.float32)
    t = np.empty(d, np.float32)
    for e in range(n):
        r = rows[e]
        for j in range(d4):
            z[j] = b[j]
        for k in range(f):
            xk = x[e, k]
            for j in range(d4):
                z[j] += xk * w_ih[k, j]
        for k in range(d):
            hk = h[r, k]
            for j in range(d4):
                z[j] += hk * w_hh[k, j]
        for j in range(2 * d):  # i, f: sigmoid
            a[j] = half * fast_tanh(half * z[j]) + half
        for j in range(2 * d, 3 * d):  # g: tanh
            a[j] = fast_tanh(z[j])
        for j in range(3 * d, d4):  # o: sigmoid
            a[j] = half * fast_tanh(half * z[j]) + half
        for j in range(d):
            c[r, j] = a[d + j] * c[r, j] + a[j] * a[2 * d + j]
        for j in range(d):
            t[j] = fast_tanh(c[r, j])
        for j in range(d):
            hh = a[3 * d + j] * t[j]
            h[r, j] = hh
            h_out[e, j] = hh
