"""Cost accounting: parameters, MACs and weight bits per module -> storage MB and estimated runtime.

Conventions (the paper's, see README):
  storage MB  = (quantized weights x bits + their scales/zero points x 16 + every other parameter x 16)
                / 8 / 1e6                                                   (a 16-bit baseline)
  est runtime = sum_m MACs_m x (bits_m / 32 if m is quantized else 1) / sum_m MACs_m
                                                                        (weight bits vs a 32-bit reference)
Pretraining-only heads (HuBERT's final_proj/label embeddings, DistilHuBERT's prediction heads) are left
out, which gives the published parameter counts (HuBERT Base 94,371,712; DistilHuBERT 23,491,200).
MACs are counted on the real modules during one forward pass of `seconds` of audio.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qspeech.quant import as_quant_config, overhead_values
from qspeech.quant.targets import candidate_modules, is_excluded_from_accounting, select_targets
from qspeech.records import Record, renamed

BASELINE_BITS = 16  # storage of every non-quantized parameter and of scales
REFERENCE_BITS = 32  # runtime reference

# Summary groups of `qspeech cost`, in the order of the forward pass (module kinds: qspeech.quant.targets).
GROUP_OF_KIND = {"cnn": "CNN", "proj": "projection", "pos_conv": "pos_conv", "norm": "norms",
                 "attention": "attention matmuls", "heads": "prediction heads"}
GROUP_ORDER = ("CNN", "norms", "projection", "pos_conv", "attention linears", "attention matmuls", "FFN",
               "prediction heads")

OverheadFn = Callable[[tuple, int], int]  # (weight shape, bits) -> number of 16-bit scale values


@dataclass
class ModuleCost(Record):
    name: str
    kind: str
    params: int
    macs: int
    bits: int  # weight bits (32 = not quantized)
    scale_values: int  # 16-bit scales / zero points / codebook entries
    storage_bits: int

    @property
    def quantized(self) -> bool:
        return self.bits < REFERENCE_BITS

    @property
    def stored_bits(self) -> int | None:
        """The bits its weight is stored (and counted) at: `bits` if quantized, else the 16-bit baseline;
        None for a row without parameters (the attention matmuls)."""
        if not self.params:
            return None
        return self.bits if self.quantized else BASELINE_BITS

    @property
    def group(self) -> str:
        """The row's part of the model in the summary: the transformer linears split into attention and FFN."""
        if self.kind == "linear":
            return "attention linears" if ".self_attn." in self.name else "FFN"
        return GROUP_OF_KIND.get(self.kind, self.kind)

    def to_dict(self) -> dict:
        # derived on load; for readers of cost.json
        return super().to_dict() | {"quantized": self.quantized, "stored_bits": self.stored_bits}


@dataclass
class CostReport(Record):
    """The accounting of one model (cost.json holds it, under "modules" the per-module rows)."""

    params: int
    quantized_params: int
    macs: int
    storage_mb: float
    est_runtime: float
    seconds: float
    rows: list[ModuleCost] = renamed("modules")


def _mha_modules(model: nn.Module) -> dict[str, nn.Module]:
    # fairseq-style attention: has q/k/v/out projections that F.multi_head_attention_forward may use
    # directly (their forward hooks then never fire).
    return {n: m for n, m in model.named_modules() if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))}


@torch.no_grad()
def count_macs(upstream, seconds: float) -> dict[str, tuple[str, int]]:
    """name -> (kind, MACs) for one forward pass of `seconds` of audio (batch 1).

    Linear/Conv1d MACs come from the shapes each module actually produced. Attention projections that
    bypass their module's forward are counted from the attention input's shape; the two attention
    matmuls (QK^T, AV) get a row of kind 'attention'. Checked against torch's FlopCounterMode in tests.
    """
    model = upstream.model
    mha = _mha_modules(model)
    macs: dict[str, int] = {}
    attn_inputs: dict[str, tuple[int, int, int]] = {}
    handles = _mac_hooks(model, mha, macs, attn_inputs)
    try:
        n = int(round(seconds * 16_000))
        was_training = upstream.training
        upstream.eval()
        upstream(torch.zeros(1, n), torch.tensor([n]))
        upstream.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return _mac_table(model, mha, macs, attn_inputs)


def _mac_hooks(model: nn.Module, mha: dict[str, nn.Module], macs: dict[str, int],
               attn_inputs: dict[str, tuple[int, int, int]]) -> list:
    """Hooks that add each module's MACs (outputs x inputs per output) to `macs` and record the input shape
    of each attention module in `attn_inputs`. Returns their handles."""

    def add(name: str, per_output: Callable[[nn.Module], int]):
        def hook(mod, inp, out):
            macs[name] = macs.get(name, 0) + out.numel() * per_output(mod)
        return hook

    def attn(name: str):
        def hook(mod, args, kwargs):
            q = args[0] if args else kwargs["query"]
            attn_inputs[name] = tuple(q.shape)  # (T, B, E)
        return hook

    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(add(name, lambda m: m.in_features)))
        elif type(mod).__name__ == "SplitLinear" and hasattr(mod, "weight"):
            # DistilHuBERT's prediction heads: a batched matmul, not nn.Linear
            handles.append(mod.register_forward_hook(add(name, lambda m: m.in_dim)))
        elif isinstance(mod, nn.Conv1d):
            handles.append(mod.register_forward_hook(
                add(name, lambda m: (m.in_channels // m.groups) * m.kernel_size[0])))
    for name, mod in mha.items():
        handles.append(mod.register_forward_pre_hook(attn(name), with_kwargs=True))
    return handles


def _mac_table(model: nn.Module, mha: dict[str, nn.Module], macs: dict[str, int],
               attn_inputs: dict[str, tuple[int, int, int]]) -> dict[str, tuple[str, int]]:
    """The hooks' counts plus what they cannot see (projections attention ran without calling the module,
    the attention matmuls), each with its kind; pretraining-only modules left out."""
    out: dict[str, tuple[str, int]] = {}
    kinds = {name: kind for name, (kind, _) in candidate_modules(model).items()}
    for name, (T, B, E) in attn_inputs.items():
        mod = mha[name]
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            full = f"{name}.{p}"
            if full not in macs:
                lin = getattr(mod, p)
                macs[full] = T * B * lin.in_features * lin.out_features
        heads, head_dim = mod.num_heads, E // mod.num_heads
        out[f"{name}.<matmul>"] = ("attention", 2 * B * heads * T * T * head_dim)
    for name, m in macs.items():
        if is_excluded_from_accounting(name) and not name.startswith("output_layer"):
            continue
        kind = kinds.get(name) or ("heads" if name.startswith("output_layer") else "other")
        out[name] = (kind, m)
    return out


def account(
    upstream,
    bits_by_module: Mapping[str, int],
    overhead: OverheadFn | None = None,
    seconds: float = 10.0,
) -> CostReport:
    """Cost of `upstream` when the modules in bits_by_module have that many weight bits."""
    model = upstream.model
    overhead = overhead or (lambda shape, bits: 0)
    modules = dict(model.named_modules())
    mac_table = count_macs(upstream, seconds)

    rows: dict[str, ModuleCost] = {}
    # Parameters, grouped by the module that owns them.
    for pname, p in _named_params(model):
        if is_excluded_from_accounting(pname):
            continue
        owner = pname.rsplit(".", 1)[0] if "." in pname else ""
        leaf = pname.rsplit(".", 1)[-1]
        row = rows.get(owner)
        if row is None:
            kind = mac_table.get(owner, (None,))[0] or _kind_of(owner, modules.get(owner))
            row = rows[owner] = ModuleCost(owner, kind, 0, 0, REFERENCE_BITS, 0, 0)
        row.params += p.numel()
        b = bits_by_module.get(owner)
        quantized = b is not None and b < REFERENCE_BITS
        if quantized and leaf == "weight_g":
            continue  # weight norm's gain is folded into the quantized weight (counted via weight_v)
        if quantized and leaf in ("weight", "weight_v"):
            scales = overhead(tuple(p.shape), b)
            row.bits = b
            row.scale_values += scales
            row.storage_bits += p.numel() * b + scales * BASELINE_BITS
        else:
            row.storage_bits += p.numel() * BASELINE_BITS
    for name, (kind, m) in mac_table.items():
        row = rows.get(name)
        if row is None:
            row = rows[name] = ModuleCost(name, kind, 0, 0, REFERENCE_BITS, 0, 0)
        row.macs = m

    ordered = list(rows.values())
    total_macs = sum(r.macs for r in ordered)
    weighted = sum(r.macs * (r.bits / REFERENCE_BITS if r.quantized else 1.0) for r in ordered)
    return CostReport(
        rows=ordered,
        params=sum(r.params for r in ordered),
        quantized_params=sum(_weight_numel(modules[r.name]) for r in ordered if r.quantized),
        macs=total_macs,
        storage_mb=sum(r.storage_bits for r in ordered) / 8 / 1e6,
        est_runtime=weighted / total_macs if total_macs else 1.0,
        seconds=seconds,
    )


def account_quantized(upstream, quant_cfg, bits: int, seconds: float = 10.0) -> CostReport:
    """Cost of `upstream` as quantize_(upstream.model, quant_cfg, bits) quantizes it: the same module
    selection (select_targets) and the method's scale values per weight tensor."""
    q = as_quant_config(quant_cfg)
    chosen = select_targets(upstream.model, int(bits), q.targets, q.exclude, q.overrides)
    return account(upstream, chosen, lambda shape, b: overhead_values(q, shape, b), float(seconds))


def _named_params(model: nn.Module):
    """Parameters under their module's name; a parametrized weight is reported once, as `<module>.weight`.
    Learned quantizer parameters (LSQ steps...) are counted through the method's scale values instead."""
    for name, p in model.named_parameters():
        if ".parametrizations." in name:
            mod, rest = name.split(".parametrizations.", 1)
            if rest.endswith(".original") or rest.endswith(".original0"):
                yield f"{mod}.{rest.split('.')[0]}", p
            continue
        yield name, p


def _weight_numel(mod: nn.Module) -> int:
    return int(mod.weight.numel())


def _kind_of(name: str, mod: nn.Module | None) -> str:
    if mod is None:
        return "other"
    if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    return "other"


def _bits_text(bits: set[int]) -> str:
    return "/".join(str(b) for b in sorted(bits, reverse=True)) if bits else "-"


def summary_by_group(report: CostReport) -> list[dict]:
    """One row per part of the model (CNN, norms, projection, pos_conv, attention linears and matmuls, FFN,
    heads, other): modules, params, MACs, the bits its weights are stored at, bytes and shares. Sums of the
    module rows, so the totals are the report's."""
    groups: dict[str, list[ModuleCost]] = {}
    for r in report.rows:
        groups.setdefault(r.group, []).append(r)
    order = [g for g in GROUP_ORDER if g in groups] + sorted(g for g in groups if g not in GROUP_ORDER)
    total_bits = sum(r.storage_bits for r in report.rows) or 1
    out = []
    for g in order:
        rows = groups[g]
        params, macs, storage = (sum(getattr(r, a) for r in rows) for a in ("params", "macs", "storage_bits"))
        out.append({"group": g, "modules": len(rows), "params": params, "macs": macs,
                    "bits": _bits_text({r.stored_bits for r in rows if r.stored_bits is not None}),
                    "quantized": sum(r.quantized for r in rows), "bytes": storage / 8,
                    "macs_share": macs / report.macs if report.macs else 0.0, "storage_share": storage / total_bits})
    return out


def format_summary(report: CostReport) -> str:
    from tabulate import tabulate

    rows = [(s["group"], f"{s['modules']} ({s['quantized']} quantized)", f"{s['params']:,}", s["bits"],
             f"{s['bytes']:,.0f}", f"{100 * s['storage_share']:.1f} %", f"{s['macs'] / 1e6:,.1f}",
             f"{100 * s['macs_share']:.1f} %") for s in summary_by_group(report)]
    return tabulate(rows, headers=("part", "modules", "params", "weight bits", "bytes", "of storage", "MMACs",
                                   "of MACs"), tablefmt="github", disable_numparse=True)


def format_table(report: CostReport) -> str:
    """Every module, then the summary by part and the totals. `weight bits` is what a weight is counted at
    in storage: its quantized bits, else the 16-bit baseline (biases, norms and scales are always 16)."""
    from tabulate import tabulate

    rows = [
        (r.name or "(model)", r.kind, f"{r.params:,}", f"{r.macs / 1e6:,.1f}", r.stored_bits or "-",
         f"{r.storage_bits / 8:,.0f}")
        for r in report.rows
    ]
    rows.append(("TOTAL", "", f"{report.params:,}", f"{report.macs / 1e6:,.1f}", "", f"{report.storage_mb * 1e6:,.0f}"))
    table = tabulate(rows, headers=("module", "kind", "params", "MMACs", "weight bits", "bytes"), tablefmt="github",
                     disable_numparse=True)
    summary = (
        f"params {report.params:,} (quantized {report.quantized_params:,}) | "
        f"MACs for {report.seconds:g} s: {report.macs / 1e9:,.2f} G | "
        f"storage {report.storage_mb:.2f} MB | est. runtime {report.est_runtime:.3f}"
    )
    note = ("weight bits: what each weight is stored and counted at (quantized bits, else 16); biases, norms and "
            "scales at 16 bits")
    return f"{table}\n\nBy part of the model:\n\n{format_summary(report)}\n\n{note}\n{summary}"
