"""Word and character error rates (jiwer), in percent, over a corpus (not averaged per utterance)."""

from __future__ import annotations

import jiwer


def _pairs(refs: list[str], hyps: list[str]) -> tuple[list[str], list[str]]:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    # jiwer refuses empty references; an utterance without words has nothing to score.
    keep = [i for i, r in enumerate(refs) if r.strip()]
    return [refs[i] for i in keep], [hyps[i] for i in keep]


def wer(refs: list[str], hyps: list[str]) -> float:
    refs, hyps = _pairs(refs, hyps)
    return 100.0 * jiwer.wer(refs, hyps) if refs else float("nan")


def cer(refs: list[str], hyps: list[str]) -> float:
    refs, hyps = _pairs(refs, hyps)
    return 100.0 * jiwer.cer(refs, hyps) if refs else float("nan")
