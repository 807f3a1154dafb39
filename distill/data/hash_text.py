"""A deterministic small text encoder for the demo model.

Each whitespace-separated, lower-cased word of a prompt maps to a fixed
vector of `dim` standard-normal numbers seeded by the word's CRC-32; a prompt
is the sequence of its word vectors, at most `max_len` of them. The same word
gets the same vector on every machine, no weights are stored, and prompts
that differ in one word (the digit, the direction) differ in one token.
"""

import zlib
from typing import List

import torch


class HashTextEncoder:
    def __init__(self, dim: int, max_len: int):
        self.dim = dim
        self.max_len = max_len

    def word(self, word: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
        return torch.randn(self.dim, generator=g)

    def __call__(self, prompt: str) -> torch.Tensor:
        """[n_words, dim], n_words <= max_len."""
        words = prompt.lower().split()[: self.max_len]
        return torch.stack([self.word(w) for w in words]) if words else torch.zeros(0, self.dim)

    def batch(self, prompts: List[str]) -> List[torch.Tensor]:
        return [self(p) for p in prompts]
