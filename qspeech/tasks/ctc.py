"""Greedy (best-path) CTC decoding."""

from __future__ import annotations

import torch


def greedy_collapse(ids, blank: int = 0) -> list[int]:
    """Collapse repeated labels, then remove blanks: [a a _ a b b] -> [a a b]."""
    out, prev = [], None
    for i in ids:
        i = int(i)
        if i != prev and i != blank:
            out.append(i)
        prev = i
    return out


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor | None = None, blank: int = 0) -> list[list[int]]:
    """logits: (B, T, V) (or (T, V)); lengths: (B,) valid frames. Returns label ids per utterance."""
    if logits.dim() == 2:
        logits = logits.unsqueeze(0)
    best = logits.argmax(dim=-1).cpu()
    if lengths is None:
        lengths = torch.full((best.shape[0],), best.shape[1], dtype=torch.long)
    return [greedy_collapse(best[b, : int(n)].tolist(), blank) for b, n in enumerate(lengths.tolist())]
