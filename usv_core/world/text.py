"""Caption encoder: prompts in the world's vocabulary -> conditioning (1, L, 4096) of the shape
Wan's DiT expects from its text encoder. A learned table of word vectors plus one vector per
position (so that "a red circle and a blue square" binds red to circle), trained jointly with the
DiT. The empty prompt gives padding only: the unconditional input for CFG."""

from __future__ import annotations

import json
import logging

import torch
import torch.nn as nn

from .dit import TEXT_DIM
from .vocab import WORDS, words_of

MAX_TOKENS = 16
PAD = "<pad>"
log = logging.getLogger("usv.world")


class CaptionEncoder(nn.Module):
    def __init__(self, vocab: tuple[str, ...] = (PAD,) + WORDS, max_tokens: int = MAX_TOKENS, dim: int = TEXT_DIM):
        super().__init__()
        self.vocab = tuple(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_tokens = max_tokens
        self.token_embedding = nn.Embedding(len(self.vocab), dim)
        self.position_embedding = nn.Embedding(max_tokens, dim)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.position_embedding.weight, std=0.5)

    def tokenize(self, prompt: str, warn: bool = True) -> list[int]:
        """Known words in order, padded to max_tokens; unknown words are dropped with one warning
        per prompt, and words past max_tokens are cut."""
        words = words_of(prompt)
        unknown = [w for w in words if w not in self.index]
        if unknown and warn:
            log.warning("USV World prompt: ignoring words outside the world's vocabulary: %s", ", ".join(sorted(set(unknown))))
        ids = [self.index[w] for w in words if w in self.index][: self.max_tokens]
        return ids + [self.index[PAD]] * (self.max_tokens - len(ids))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> (B, L, 4096)."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(pos)[None]

    def encode(self, prompts: list[str] | str, device=None, warn: bool = True) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        device = device or self.token_embedding.weight.device
        ids = torch.tensor([self.tokenize(p, warn=warn) for p in prompts], device=device)
        return self(ids)

    def metadata(self) -> dict[str, str]:
        """What travels in the safetensors header beside the two tables."""
        return {"format": "usv-world-text-1", "vocab": json.dumps(list(self.vocab)), "max_tokens": str(self.max_tokens)}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "CaptionEncoder":
        vocab = tuple(json.loads(metadata["vocab"]))
        enc = cls(vocab, int(metadata["max_tokens"]), tensors["token_embedding.weight"].shape[1])
        enc.load_state_dict({k: v.float() for k, v in tensors.items()})
        return enc.eval()
