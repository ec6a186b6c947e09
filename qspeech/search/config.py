"""The schema of conf/search.yaml (`qspeech search`), registered in Hydra's ConfigStore as `_search_schema`
like the other primary configs; importing this module also registers the resolver naming the search's
folder (outputs/search/<model>_<method>_<budget>_<hash>)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING, DictConfig, OmegaConf

from qspeech.checks import FieldError, choice, integer, need, number
from qspeech.config import CostConfig, register_schema, to_typed
from qspeech.data.config import SPLITS, DataConfig
from qspeech.quant.config import QuantConfig, check_bits
from qspeech.identity import identity_dict, outside, stable_hash
from qspeech.upstream.config import ModelConfig

__all__ = ["MEASURES", "SearchConfig", "SearchRunConfig", "budget_tag"]

MEASURES = ("all", "last")


@dataclass
class SearchConfig:
    """How sensitivity is measured and the allocation solved (conf/search.yaml's `search:` values)."""

    # Candidate bit widths per module (32 = keep it at full precision, i.e. the 16-bit baseline).
    bits: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    # The first `utterances` of the data's `split` (sorted by id), each cut to its first `max_seconds`.
    split: str = "train"
    utterances: int = 8
    max_seconds: float = 4.0
    # Damage = relative squared error of the hidden states (mean over all of them: what the weighted-sum
    # featurizer sees; or the last one only).
    measure: str = "all"
    # DP resolution: exact while the budget spans at most this many cost units (see qspeech/search/solve.py).
    max_units: int = 200_000
    # Name of the plan (its run folder and quant_plan/<name>.yaml); null: <model>_<method>_<budget>_<hash>.
    name: str | None = outside(None)

    def __post_init__(self):
        need(isinstance(self.bits, list) and len(self.bits) > 0
             and all(isinstance(b, int) and not isinstance(b, bool) for b in self.bits), "bits", self.bits,
             "must be a non-empty list of bit widths, e.g. [1,2,4,8]")
        need(len(set(self.bits)) == len(self.bits), "bits", self.bits, "lists a bit width twice")
        choice(self, "split", SPLITS)
        integer(self, "utterances", 1)
        number(self, "max_seconds", 0, lo_open=True)
        choice(self, "measure", MEASURES)
        integer(self, "max_units", 1000)
        need(self.name is None or (bool(self.name) and "/" not in self.name and not self.name.startswith(".")),
             "name", self.name, "must be a plain file name (no '/', not starting with '.')")


@dataclass
class SearchRunConfig:
    """conf/search.yaml: `qspeech search` (the model, quantizer and data of a run, plus a budget)."""

    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    data: DataConfig = MISSING
    # Exactly one budget: storage MB (the accounting's), estimated runtime (fraction of the full-precision
    # MACs), or the storage of uniform `budget_bits` with the same quant settings.
    budget_mb: float | None = None
    budget_runtime: float | None = None
    budget_bits: int | None = None
    seed: int = 0
    command: str = outside("search")
    cache_dir: str = outside(MISSING)
    cost: CostConfig = field(default_factory=CostConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self):
        integer(self, "seed", 0)
        number(self, "budget_mb", 0, lo_open=True, optional=True)
        number(self, "budget_runtime", 0, lo_open=True, optional=True)
        given = [k for k in ("budget_mb", "budget_runtime", "budget_bits") if getattr(self, k) is not None]
        if len(given) != 1:
            raise FieldError(given[-1] if given else "budget_mb",
                             "set exactly one budget: budget_mb=<MB>, budget_runtime=<fraction of the full-precision "
                             f"MACs> or budget_bits=<b> (the storage of uniform b-bit); given: {', '.join(given) or 'none'}")
        if self.budget_bits is not None:
            need(isinstance(self.budget_bits, int) and self.budget_bits < 32, "budget_bits", self.budget_bits,
                 "must be a bit width below 32")
            check_bits(self.quant.method, self.budget_bits, "budget_bits")
        for b in self.search.bits:
            check_bits(self.quant.method, b, "search.bits")
        need(self.model.arch != "fbank", "model", self.model.name, "has no weights to quantize; choose an upstream")


def budget_tag(cfg) -> str:
    """The budget as a short name part: 1.94MB, rt0.25 or b2 (the storage of uniform 2-bit)."""
    if cfg.budget_mb is not None:
        return f"{float(cfg.budget_mb):g}MB"
    if cfg.budget_runtime is not None:
        return f"rt{float(cfg.budget_runtime):g}"
    return f"b{int(cfg.budget_bits)}"


def _search_name(*, _root_: DictConfig) -> str:
    """<model>[-init]_<method>_<budget>_<run identity hash>: the same search lands in the same folder."""
    if _root_.search.get("name"):
        return str(_root_.search.name)
    cfg = to_typed(_root_)
    init = "" if cfg.model.init == "pretrained" else f"-{cfg.model.init}"
    return f"{cfg.model.name}{init}_{cfg.quant.method}_{budget_tag(cfg)}_{stable_hash(identity_dict(cfg), 8)}"


register_schema("_search_schema", SearchRunConfig)
if not OmegaConf.has_resolver("qspeech_search_name"):
    OmegaConf.register_new_resolver("qspeech_search_name", _search_name)
