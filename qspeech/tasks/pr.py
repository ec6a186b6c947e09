"""SUPERB phoneme recognition (s3prl 0.4.18 `problem/asr/superb_pr.py`): frozen upstream -> weighted sum of all
hidden states -> FrameLevelLinear (Linear(D, 256) -> Linear(256, phones), no non-linearity) -> CTC (blank 0)
over the 39 CMU phones without stress, greedy decoding, PER (phone edit distance / reference phones, over the
split); Adam 1e-2, batch 16, 100k steps, dev PER every 1k (conf/train/superb_pr.yaml).

Labels: task=pr reads LibriSpeech (data=librispeech) and turns each transcript into phones with the recipe's
lexicon (s3prl's librispeech-lexicon-200k-g2p.txt + -allothers-g2p.txt, first pronunciation, stress digits
dropped); task=pr_small uses the synthesized mini corpus (data=mini, the ASR corpus) with the phones eSpeak NG
spoke for each utterance, in its voice's accent (qspeech/data/phonemes.py maps them to the same 39 phones).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qspeech.checks import choice, integer, need, number
from qspeech.data.phonemes import CMU_PHONES, phonemize, strip_stress
from qspeech.errors import ConfigError, DataError
from qspeech.tasks.config import Task, TaskConfig
from qspeech.tasks.ctc import CTCDownstream, CTCTask
from qspeech.tasks.downstream import Splits
from qspeech.tasks.featurizer import Featurizer
from qspeech.tasks.metrics import Metric, wer
from qspeech.upstream.checkpoints import s3prl_cache_path

LEXICON_URLS = (
    "https://huggingface.co/datasets/s3prl/g2p/raw/main/lexicon/librispeech-lexicon-200k-g2p.txt",
    "https://huggingface.co/datasets/s3prl/g2p/raw/main/lexicon/librispeech-lexicon-allothers-g2p.txt",
)
PHONES = ("<blank>", *CMU_PHONES)  # CTC blank at 0, as s3prl


@dataclass
class PRConfig(TaskConfig):
    """The `task` config group for kind=pr; the defaults are conf/task/pr.yaml (SUPERB's recipe)."""

    name: str = "pr"
    kind: str = "pr"
    # labels: lexicon (transcripts through the lexicon files) | espeak (what eSpeak NG spoke: data=mini only)
    labels: str = "lexicon"
    # lexicon files; null: s3prl's two LibriSpeech g2p lexicons in s3prl's download cache (~/.cache/s3prl/download)
    lexicon: list[str] | None = None
    featurizer_normalize: bool = False
    hidden_size: int = 256  # FrameLevelLinear's hidden_sizes=[256]
    lr: float = 1.0e-2  # Adam
    layer: int | None = None  # null: weighted sum of all hidden states; k: hidden state k alone

    def __post_init__(self):
        super().__post_init__()
        choice(self, "kind", ("pr",))
        choice(self, "labels", ("lexicon", "espeak"))
        need(self.lexicon is None or (isinstance(self.lexicon, list) and all(isinstance(x, str) for x in self.lexicon)
                                      and self.lexicon), "lexicon", self.lexicon, "must be null or a list of files")
        integer(self, "hidden_size", 1)
        number(self, "lr", 0, lo_open=True)
        integer(self, "layer", 0, optional=True)


class PRHead(nn.Module):
    def __init__(self, num_hidden: int, hidden_dim: int, cfg: PRConfig):
        super().__init__()
        if cfg.layer is not None and cfg.layer >= num_hidden:
            raise ConfigError(f"task.layer={cfg.layer}: the upstream has hidden states 0..{num_hidden - 1}")
        self.layer = cfg.layer
        self.featurizer = Featurizer(num_hidden, cfg.featurizer_normalize)
        self.proj = nn.Linear(hidden_dim, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, len(PHONES))

    def forward(self, hs: torch.Tensor, lens: torch.Tensor):
        x = self.featurizer(hs) if self.layer is None else hs[:, :, self.layer]
        return self.out(self.proj(x)), lens


# ---------------------------------------------------------------------------------------------- labels
def read_lexicon(files: list[str]) -> dict[str, list[str]]:
    """word -> phones (first pronunciation, stress digits dropped), as s3prl's G2P reads its lexicon files."""
    lex: dict[str, list[str]] = {}
    for f in files:
        p = Path(f).expanduser()
        if not p.is_file():
            raise DataError(f"pronunciation lexicon not found: {p}; set task.lexicon=[/path/to/lexicon.txt] "
                            f"(s3prl's: {LEXICON_URLS[0]})")
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            word, *phones = line.replace("\t", " ").split()
            if phones and word.upper() not in lex:
                lex[word.upper()] = [strip_stress(x) for x in phones]
    return lex


def lexicon_files(cfg: PRConfig) -> list[str]:
    """task.lexicon, or s3prl's two LibriSpeech lexicons in its download cache."""
    if cfg.lexicon is not None:
        return list(cfg.lexicon)
    return [str(s3prl_cache_path(u)) for u in LEXICON_URLS]


def _voices(utts) -> dict[str, str]:
    """utt_id -> eSpeak voice, from the mini corpus's manifest.tsv beside each split's speaker folders."""
    voices: dict[str, str] = {}
    for manifest in sorted({Path(u.path).parents[2] / "manifest.tsv" for u in utts}):
        if not manifest.is_file():
            raise DataError(f"task.labels=espeak needs the synthesized corpus (data=mini): no {manifest}")
        with open(manifest, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                voices[row["utt_id"]] = row["voice"]
    return voices


def phone_targets(cfg: PRConfig, utts, lexicon: dict | None) -> list[list[int]]:
    """Phone ids (PHONES) of each utterance; DataError naming an utterance without phones or an unknown word."""
    index = {p: i for i, p in enumerate(PHONES)}
    voices = _voices(utts) if cfg.labels == "espeak" else {}
    out = []
    for u in utts:
        if cfg.labels == "espeak":
            phones = phonemize(u.text.lower(), voices.get(u.utt_id, "en-us"))
        else:
            phones = []
            for w in u.text.split():
                if w not in lexicon:
                    raise DataError(f"word {w!r} of {u.utt_id} is not in the lexicon ({', '.join(lexicon_files(cfg))})")
                phones += lexicon[w]
        bad = next((p for p in phones if p not in index), None)
        if bad is not None:
            raise DataError(f"phone {bad!r} of {u.utt_id} is not one of the 39 CMU phones")
        if not phones:
            raise DataError(f"utterance {u.utt_id} ({u.path}) has no phonemes: its transcript {u.text!r} is empty "
                            "or unpronounceable; remove it from the data")
        out.append([index[p] for p in phones])
    return out


# ---------------------------------------------------------------------------------------------- task
class PRTask(CTCTask):
    """CTC over phones (PHONES, blank 0); dev PER picks the checkpoint. targets: split -> utt_id -> phone ids."""

    select_metric = "per"

    def __init__(self, model: PRHead, sources: dict, targets: dict, lr: float, eval_batch_size: int = 32):
        by_index = {s: [targets[s][u.utt_id] for u in src.utts] for s, src in sources.items()}
        super().__init__(model, sources, by_index, lr, blank=0, zero_infinity=True, eval_batch_size=eval_batch_size)

    def hypothesis(self, ids):
        return " ".join(PHONES[k] for k in ids)

    def reference(self, split, i):
        return " ".join(PHONES[k] for k in self.targets[split][i])

    def scores(self, refs, hyps):
        return {"per": wer(refs, hyps)}  # word error rate over phone tokens = PER

    def saved(self) -> dict:
        return {"phones": list(PHONES)}


class PRDownstream(CTCDownstream):
    """PR's part of run_downstream: data=...'s splits with their phone targets (task.labels), the PR head and
    its PRTask. The same feature cache as asr on the same data (one upstream pass for both tasks)."""

    def load(self, progress: bool) -> Splits:
        tcfg = self.cfg.task
        if tcfg.labels == "espeak" and self.cfg.data.kind != "mini":
            raise ConfigError(f"task.labels=espeak needs the synthesized corpus (data=mini), not "
                              f"data={self.cfg.data.name}; use task.labels=lexicon")
        data = super().load(progress)
        lexicon = read_lexicon(lexicon_files(tcfg)) if tcfg.labels == "lexicon" else None
        self.targets = {s: dict(zip([u.utt_id for u in us], phone_targets(tcfg, us, lexicon)))
                        for s, us in data.utts.items()}
        return data

    def head(self, upstream, data: Splits, sources: dict) -> PRTask:
        model = PRHead(upstream.num_hidden, upstream.hidden_size, self.cfg.task)
        return PRTask(model, sources, self.targets, self.cfg.task.lr, self.cfg.train.eval_batch_size)


TASK = Task("pr", PRConfig, PRDownstream, (Metric("per", higher_is_better=False),))
