"""Mask specifications for the kernel suite, with an exact count of the allowed (q, k) pairs.

Conventions (the same as transformers' Gemma 2 masks):
  causal   : k <= q
  sliding  : k <= q and q - k < window              (a query sees itself and window-1 keys before it)
  docs     : k <= q and doc(q) == doc(k)            (document-packed sequence, one id per document)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


def random_doc_lengths(total: int, lo: int, hi: int, seed: int) -> list[int]:
    """Document lengths uniform in [lo, hi] filling exactly ``total`` tokens (last one truncated)."""
    rng = random.Random(seed)
    out, used = [], 0
    while used < total:
        n = min(rng.randint(lo, hi), total - used)
        out.append(n)
        used += n
    return out


@dataclass
class MaskSpec:
    kind: str  # "causal" | "sliding" | "docs"
    seq: int
    window: int | None = None
    doc_lengths: list[int] | None = None

    @classmethod
    def make(cls, kind: str, seq: int, window: int, doc_range: tuple[int, int], seed: int) -> "MaskSpec":
        if kind == "causal":
            return cls("causal", seq)
        if kind == "sliding":
            return cls("sliding", seq, window=window)
        if kind == "docs":
            return cls("docs", seq, doc_lengths=random_doc_lengths(seq, doc_range[0], doc_range[1], seed + seq))
        raise ValueError(f"unknown mask kind {kind!r} (causal, sliding, docs)")

    @property
    def label(self) -> str:
        if self.kind == "sliding":
            return f"sliding({self.window})"
        if self.kind == "docs":
            n = len(self.doc_lengths or [])
            return f"docs(n={n})"
        return "causal"

    def pairs(self) -> int:
        """Exact number of allowed (q, k) pairs."""
        s = self.seq
        if self.kind == "causal":
            return s * (s + 1) // 2
        if self.kind == "sliding":
            w = int(self.window)
            if s <= w:
                return s * (s + 1) // 2
            return w * (w + 1) // 2 + (s - w) * w
        if self.kind == "docs":
            return sum(n * (n + 1) // 2 for n in self.doc_lengths)
        raise ValueError(self.kind)

    def segment_ids(self, device: torch.device) -> torch.Tensor | None:
        """(1, S) int64 document ids (docs mask only)."""
        if self.kind != "docs":
            return None
        ids = torch.repeat_interleave(
            torch.arange(len(self.doc_lengths)), torch.tensor(self.doc_lengths, dtype=torch.long)
        )
        return ids[None].to(device)

    def dense_rows(self, i0: int, i1: int, device: torch.device, seg: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean (i1 - i0, S) block of the mask (True = attend)."""
        q = torch.arange(i0, i1, device=device)[:, None]
        k = torch.arange(self.seq, device=device)[None, :]
        allowed = k <= q
        if self.kind == "sliding":
            allowed &= (q - k) < int(self.window)
        elif self.kind == "docs":
            if seg is None:
                seg = self.segment_ids(device)
            s = seg[0]
            allowed &= s[i0:i1, None] == s[None, :]
        return allowed

    def hf_mask_function(self, device: torch.device):
        """The mask_function transformers builds for this pattern (masking_utils primitives)."""
        from transformers import masking_utils as mu

        if self.kind == "causal":
            return mu.causal_mask_function
        if self.kind == "sliding":
            return mu.sliding_window_causal_mask_function(int(self.window))
        if self.kind == "docs":
            return mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(self.segment_ids(device)))
        raise ValueError(self.kind)
