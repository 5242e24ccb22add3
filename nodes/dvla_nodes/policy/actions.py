"""Discretised action tokens (as OpenVLA): each action dimension in [-1, 1] is cut into ``bins``
equal intervals; token k stands for the interval's centre."""

from __future__ import annotations

import numpy as np


def actions_to_tokens(actions: np.ndarray, bins: int) -> np.ndarray:
    """int64 tokens of the same shape as ``actions`` (values clipped to [-1, 1])."""
    a = np.clip(np.asarray(actions, np.float64), -1.0, 1.0)
    return np.minimum(((a + 1.0) * 0.5 * bins).astype(np.int64), bins - 1)


def tokens_to_actions(tokens: np.ndarray, bins: int) -> np.ndarray:
    """float32 bin centres for ``tokens``."""
    return (-1.0 + (2.0 * np.asarray(tokens, np.float64) + 1.0) / bins).astype(np.float32)
