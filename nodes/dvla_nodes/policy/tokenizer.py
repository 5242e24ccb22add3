"""Word-level tokenizer over the suite's vocabulary (no downloads): ids 0 = padding, 1 = unknown,
then the sorted vocabulary. Instructions are lower-cased, split on whitespace and padded or cut
to ``max_tokens``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from dvla_nodes.envs.tasks import max_instruction_words, vocabulary

PAD, UNK = 0, 1


class Tokenizer:
    def __init__(self, words: Iterable[str] | None = None, max_tokens: int | None = None) -> None:
        self.words: tuple[str, ...] = tuple(vocabulary() if words is None else words)
        self.max_tokens = max_tokens if max_tokens is not None else max_instruction_words() + 2
        self._index = {w: i + 2 for i, w in enumerate(self.words)}
        self._cache: dict[str, np.ndarray] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 2

    def encode(self, text: str) -> np.ndarray:
        """int64 (max_tokens,): the ids of ``text``'s words, padded with 0."""
        cached = self._cache.get(text)
        if cached is None:
            ids = [self._index.get(w, UNK) for w in text.lower().split()][: self.max_tokens]
            cached = np.zeros(self.max_tokens, np.int64)
            cached[: len(ids)] = ids
            cached.setflags(write=False)
            self._cache[text] = cached
        return cached

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """int64 (N, max_tokens)."""
        if not texts:
            return np.zeros((0, self.max_tokens), np.int64)
        return np.stack([self.encode(t) for t in texts])

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        out = []
        for raw in ids:
            i = int(raw)
            if i == PAD:
                continue
            out.append(self.words[i - 2] if i >= 2 else "<unk>")
        return " ".join(out)
