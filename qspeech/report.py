"""The results table: every run's result.json -> outputs/results.csv, outputs/report.md, outputs/report.png,
with the paper's published rows beside ours and the DistilHuBERT comparison the paper makes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from qspeech import paper
from qspeech.atomic import atomic_path, write_text_atomic
from qspeech.errors import QSpeechError
from qspeech.results import COST_FILE, RunResult, collect, load_results
from qspeech.tasks.metrics import higher_is_better

BENCH_FILE = "bench.json"

KEY = ["model", "init", "quant", "bits", "task", "data"]
COLUMNS = KEY + [
    "overrides", "seeds", "n", "flags", "source", "status", "metric", "higher_is_better", "value", "value_std",
    "rise_pct", "majority_acc",
    "dev_value", "cer", "cer_std", "eval_data", "eval_value", "eval_cer", "skipped_audio", "storage_mb", "packed_mb", "est_runtime", "measured_speedup",
    "measured_vs_ort", "params", "quantized_params", "macs", "runtime_vs_teacher", "storage_vs_distil",
    "runtime_vs_distil", "metric_vs_distil", "error", "run_dir",
]
DISTIL_OF = {"tiny_hubert": "tiny_distilhubert", "tiny_distilhubert": "tiny_distilhubert"}
# est_runtime is relative to the model's own full-precision MACs (the convention); the paper's
# DistilHuBERT runtime (0.73) is relative to HuBERT, so runtimes are also shown against the teacher.
TEACHER_OF = {"tiny_hubert": "tiny_hubert", "tiny_distilhubert": "tiny_hubert", "distilhubert": "hubert"}

# Config keys (and key prefixes) that never distinguish two experiments: where files go, logging, speed
# knobs, other commands' settings. Runs that differ only in these are replicates.
IGNORED_KEYS = ("cache_dir", "command", "bench", "cost", "export", "logger", "optimized_metric", "hydra",
                "model.trust_checkpoint", "train.num_threads", "train.resume", "train.ckpt_dir", "train.log_every",
                "train.save_every", "train.eval_batch_size", "train.cache_features", "train.cache_max_gb",
                "train.feature_batch_s", "quant.log_every", "quant.ckpt_every")
SEED_KEY = "seed"  # runs that differ only by it are aggregated (mean +- std over seeds)
SMOKE_MAX_STEPS = 50  # fewer training steps than this: a check run whose numbers mean nothing
UNITS = {"wer": "%", "cer": "%", "per": "%", "acc": "%"}  # metrics are in percent (TaskMetrics.value)


def _quant_label(r: RunResult) -> str:
    if r.bits >= 32:
        return "fp"
    label = r.quant or "?"
    targets = r.targets or ["linear"]
    if list(targets) != ["linear"]:
        label += "[" + "+".join(targets) + "]"
    return label


def _has_prefix(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the value as JSON (so that lists and nulls compare), the keys that matter only."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        elif not _has_prefix(key, IGNORED_KEYS):
            out[key] = json.dumps(v, sort_keys=True, default=str)
    return out


def _override_value(v: str) -> str:
    """A recorded value as one writes it on the command line: task.lr=0.001, model.ckpt=null, x=[a,b]."""
    value = json.loads(v)
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else json.dumps(value)


def _smoke(r: RunResult) -> bool:
    """experiment=smoke on the run's command line (Hydra's .hydra/overrides.yaml), or too few steps."""
    steps = (r.config.get("train") or {}).get("max_steps")
    if isinstance(steps, int) and steps < SMOKE_MAX_STEPS:
        return True
    overrides = Path(r.run_dir or ".") / ".hydra" / "overrides.yaml"
    try:
        return "experiment=smoke" in overrides.read_text().split()
    except OSError:
        return False


def _better_higher(metric: str | None, recorded: bool | None) -> bool | None:
    """Whether a larger value is better: as the run recorded it, else as the metric's name says."""
    if recorded is not None:
        return bool(recorded)
    return None if metric is None else higher_is_better(metric)


def _row(r: RunResult) -> dict:
    m = r.metrics
    flags = [f for f, on in (("random init", r.init == "random"), ("smoke", _smoke(r))) if on]
    return {
        "model": r.model,
        "init": r.init,
        "quant": _quant_label(r),
        "bits": r.bits,
        "task": r.task,
        "data": r.data,
        "seeds": r.config.get(SEED_KEY),
        "flags": ", ".join(flags),
        "source": "qspeech",
        "status": r.status,
        "metric": r.metric,
        "higher_is_better": _better_higher(r.metric, m and m.higher_is_better),
        "value": r.value,
        "majority_acc": m and m.majority_acc,  # classification: the chance line (train's majority class)
        "dev_value": m and m.dev_value,
        "cer": m and m.cer,
        # the head scored on a second data set (eval_data=...), in the task's metric
        "eval_data": ((m and m.eval) or {}).get("data"),
        "eval_value": ((m and m.eval) or {}).get(r.metric),
        "eval_cer": ((m and m.eval) or {}).get("cer"),
        "skipped_audio": (m and m.skipped_audio) or None,  # shown only where some audio was unreadable
        "storage_mb": r.storage_mb,
        "packed_mb": r.packed_mb,
        "est_runtime": r.est_runtime,
        "params": r.params,
        "quantized_params": r.quantized_params,
        "macs": r.macs,
        "error": r.error,
        "run_dir": r.run_dir,
        "_config": flat_config(r.config),
        "_finished": r.finished or "",
    }


def _distinguishing(rows: list[dict]) -> dict[str, list[str]]:
    """Per identity (KEY) group, the config keys whose recorded values differ between its runs (the seed
    and, at full precision, the unused quantizer settings aside): what a sweep varied."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in KEY), []).append(row)
    varying: dict[tuple, list[str]] = {}
    for key, members in groups.items():
        values: dict[str, set] = {}
        for row in members:
            for k, v in row["_config"].items():
                values.setdefault(k, set()).add(v)
        skip = ("quant",) if key[KEY.index("bits")] >= 32 else ()
        varying[key] = sorted(k for k, vs in values.items()
                              if len(vs) > 1 and k != SEED_KEY and not _has_prefix(k, skip))
    return varying


def _label_overrides(rows: list[dict]) -> None:
    varying = _distinguishing(rows)
    for row in rows:
        keys = varying[tuple(row[k] for k in KEY)]
        cfg = row["_config"]
        row["overrides"] = " ".join(f"{k}={_override_value(cfg[k])}" for k in keys if k in cfg)


def _mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and not pd.isna(v)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
    return mean, std


def _aggregate(members: list[dict]) -> dict:
    """Successful runs of one experiment that differ only by seed -> one row: means, sample std, n, seeds."""
    members = sorted(members, key=lambda r: (str(r["seeds"]), r["_finished"]))
    out = dict(members[-1])
    out["n"] = len(members)
    seeds = [r["seeds"] for r in members if r["seeds"] is not None]
    out["seeds"] = ",".join(str(s) for s in dict.fromkeys(seeds))
    out["run_dir"] = ";".join(str(r["run_dir"]) for r in members)
    for col in ("value", "cer"):
        out[col], out[f"{col}_std"] = _mean_std([r[col] for r in members])
    for col in ("dev_value", "eval_value", "eval_cer", "storage_mb", "packed_mb", "est_runtime", "majority_acc"):
        out[col] = _mean_std([r[col] for r in members])[0]
    return out


def _config_signature(row: dict, drop: tuple[str, ...]) -> str | None:
    """The run's config without `drop` (and the seed): two rows with equal signatures ran the same
    recipe. None for rows without a recorded config (the paper's, older result files)."""
    cfg = row.get("_config")
    if not cfg:
        return None
    return json.dumps({k: v for k, v in cfg.items() if k != SEED_KEY and not _has_prefix(k, drop)},
                      sort_keys=True)


def _reference(row: dict, candidates: list[dict], drop: tuple[str, ...]) -> dict | None:
    """The candidate run with the same recipe as `row` (all but `drop`); where no config was recorded, the
    only candidate. None when no candidate is comparable."""
    sig = _config_signature(row, drop)
    same = [c for c in candidates if _config_signature(c, drop) == sig] if sig else []
    if len(same) == 1:
        return same[0]
    if len(candidates) == 1 and (sig is None or _config_signature(candidates[0], drop) is None):
        return candidates[0]
    return None


def _add_rise(rows: list[dict]) -> None:
    """rise_pct: the relative rise of the metric (from means) over the full-precision row of the same model,
    init, task, data and recipe, as the paper's 7.06 -> 12.68 WER (+80 %)."""
    same = lambda a, b: all(a[k] == b[k] for k in ("source", "model", "init", "task", "data"))  # noqa: E731
    fps = [r for r in rows if r["bits"] >= 32 and r["status"] in ("ok", "published") and r["value"] is not None]
    for row in rows:
        if row["bits"] >= 32 or row["value"] is None or pd.isna(row["value"]):
            continue
        ref = _reference(row, [f for f in fps if same(row, f)], ("bits", "quant"))
        if ref is not None and ref["value"]:
            row["rise_pct"] = round(100.0 * (float(row["value"]) - float(ref["value"])) / float(ref["value"]), 1)


def _paper_rows() -> list[dict]:
    return [{**p, "init": "pretrained", "data": "librispeech", "source": paper.SOURCE, "status": "published",
             "higher_is_better": _better_higher(p["metric"], None), "overrides": "", "flags": "", "n": 1,
             "_config": {}} for p in paper.ROWS]


def build_table(results: list[RunResult]) -> pd.DataFrame:
    """Every run is kept: one row per distinct experiment, labelled by the config overrides that tell it
    apart from the runs of the same model/init/quant/bits/task/data; successful runs that differ only by
    seed become one row (mean, std, n, seeds); each failed or unfinished run is a row of its own with its
    error. Then the paper's rows; the rise over full precision and the DistilHuBERT comparison."""
    rows = [_row(r) for r in results]
    _label_overrides(rows)
    ours, experiments = [], {}
    for row in rows:
        if row["status"] == "ok":
            experiments.setdefault(tuple(row[k] for k in KEY) + (row["overrides"],), []).append(row)
        else:
            ours.append(row | {"n": 1})
    ours += [_aggregate(members) for members in experiments.values()]
    all_rows = ours + _paper_rows()
    _add_rise(all_rows)
    table = _vs_distil(all_rows)
    table = table.sort_values(["source", "task", "data", "model", "init", "bits", "quant", "overrides", "status"],
                              ascending=[False, True, True, True, True, False, True, True, False],
                              ignore_index=True, key=lambda c: c.fillna("") if c.dtype == object else c)
    return table


def fastest_variant(variants: dict, bits: int) -> dict | None:
    """The bench variant that runs `bits`-bit weights fastest (torch_fp32 for bits >= 32)."""
    if bits >= 32:
        return variants.get("torch_fp32")
    timed = [v for v in variants.values() if v.get("bits") == bits and v.get("measured_speedup")]
    return max(timed, key=lambda v: v["measured_speedup"]["vs_torch_fp32"], default=None)


def add_measured_speed(table: pd.DataFrame, benches: list[dict]) -> pd.DataFrame:
    """Measured speed-ups from `qspeech bench` runs (the latest per model and quant method) beside the
    estimate: the fastest kernel measured for the row's bit-width (torch fp32 for full precision)."""
    table = table.copy()
    latest: dict[tuple, dict] = {}
    for b in sorted(benches, key=lambda b: b.get("_mtime", 0)):
        latest[(b.get("model"), (b.get("quant") or {}).get("method") if isinstance(b.get("quant"), dict)
                else b.get("quant"))] = b
    for idx, row in table.iterrows():
        if row["source"] != "qspeech":
            continue
        bench = latest.get((row["model"], str(row["quant"]).split("[")[0])) or (
            latest.get(next((k for k in latest if k[0] == row["model"]), None)) if row["bits"] >= 32 else None)
        variant = fastest_variant((bench or {}).get("variants", {}), int(row["bits"]))
        if variant and variant.get("measured_speedup"):
            table.at[idx, "measured_speedup"] = round(float(variant["measured_speedup"]["vs_torch_fp32"]), 2)
            vs_ort = variant["measured_speedup"].get("vs_ort_fp32")
            table.at[idx, "measured_vs_ort"] = None if vs_ort is None else round(float(vs_ort), 2)
    return table


def _num(v) -> float | None:
    return None if v is None or pd.isna(v) else float(v)


def _vs_distil(rows: list[dict]) -> pd.DataFrame:
    """The paper's comparison: storage and runtime as a ratio to DistilHuBERT's, metric as a difference,
    against the DistilHuBERT run of the same task, data and recipe."""
    macs_of: dict[str, float] = {}
    for row in rows:
        if _num(row.get("macs")) is not None:
            macs_of[row["model"]] = max(macs_of.get(row["model"], 0.0), float(row["macs"]))
    weighted = {}  # MAC-weighted runtime in MACs: comparable across models of one family
    for i, row in enumerate(rows):
        macs, est = _num(row.get("macs")), _num(row.get("est_runtime"))
        if macs is not None and est is not None:
            weighted[i] = est * macs
            teacher = macs_of.get(TEACHER_OF.get(row["model"], row["model"]))
            if teacher:
                row["runtime_vs_teacher"] = round(weighted[i] / teacher, 3)
        elif est is not None and row["source"] != "qspeech":
            row["runtime_vs_teacher"] = est  # the paper's are relative to HuBERT
    for i, row in enumerate(rows):
        ref_model = DISTIL_OF.get(row["model"], "distilhubert")
        candidates = [j for j, c in enumerate(rows) if c["model"] == ref_model and c["bits"] >= 32
                      and all(c[k] == row[k] for k in ("task", "data", "source")) and c["init"] == "pretrained"
                      and c["status"] in ("ok", "published")]
        ref = _reference(row, [rows[j] for j in candidates], ("bits", "quant", "model"))
        if ref is None:
            continue
        j = next(j for j in candidates if rows[j] is ref)
        storage, ref_storage = _num(row.get("storage_mb")), _num(ref.get("storage_mb"))
        if storage is not None and ref_storage:
            row["storage_vs_distil"] = round(storage / ref_storage, 3)
        if i in weighted and j in weighted:
            row["runtime_vs_distil"] = round(weighted[i] / weighted[j], 3)
        elif row["source"] != "qspeech" and _num(row.get("est_runtime")) is not None and _num(ref.get("est_runtime")):
            row["runtime_vs_distil"] = round(float(row["est_runtime"]) / float(ref["est_runtime"]), 3)
        if _num(row.get("value")) is not None and _num(ref.get("value")) is not None:
            row["metric_vs_distil"] = round(float(row["value"]) - float(ref["value"]), 2)
    return pd.DataFrame(rows, columns=COLUMNS)


def _fmt(v, digits=2):
    if v is None or v is pd.NA or (isinstance(v, float) and pd.isna(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _with_std(row, col: str) -> str:
    """`70.52 ± 2.18 (n=3)` for an aggregate of seeds, the plain value otherwise."""
    value, std, n = row[col], row.get(f"{col}_std"), row.get("n")
    text = _fmt(value)
    if text and _num(std) is not None and _num(n) is not None and int(n) > 1:
        text += f" ± {float(std):.2f} (n={int(n)})"
    return text


def _cell(row, col: str) -> str:
    if col in ("value", "cer"):
        return _with_std(row, col)
    if col == "rise_pct":
        return "" if _num(row[col]) is None else f"{float(row[col]):+.1f} %"
    if col == "bits":
        return str(int(row[col]))
    return _fmt(row[col], 3 if col in ("est_runtime", "storage_vs_distil", "runtime_vs_distil") else 2)


SHOW = ["model", "init", "quant", "bits", "task", "data", "overrides", "seeds", "flags", "status", "metric", "value",
        "rise_pct", "cer", "eval_data", "eval_value", "eval_cer", "skipped_audio", "storage_mb", "packed_mb", "est_runtime", "runtime_vs_teacher", "measured_speedup",
        "measured_vs_ort", "storage_vs_distil", "runtime_vs_distil", "metric_vs_distil"]
ALWAYS = {"model", "quant", "bits", "task", "data", "status", "metric", "value"}

CAPTION = (
    "Storage MB: quantized weights x bits + scales at 16 bits + all other parameters at 16 bits (/8/1e6). "
    "Est. runtime: MAC-weighted weight bits / 32, relative to the model's own full-precision MACs; "
    "runtime_vs_teacher: the same MAC-weighted cost relative to the full-precision teacher (HuBERT / tiny_hubert), "
    "the scale of the paper's DistilHuBERT 0.73. *_vs_distil: ratio to (metric: difference from) the DistilHuBERT "
    "row of the same task, data and recipe (tiny_distilhubert for tiny models). overrides: the config values that "
    "tell a row apart from the other runs of the same model/quant/bits/task/data (derived from the recorded "
    "configs); runs that differ only by seed are one row, value mean ± sample std (n runs, seeds listed); "
    "rise_pct: relative rise of the metric (means) over the full-precision row of the same model, task, data and "
    "recipe. flags: *random init* (no pretrained weights), *smoke* (experiment=smoke or under "
    f"{SMOKE_MAX_STEPS} training steps: a check run, not a result)."
)


def render_markdown(table: pd.DataFrame, problems: list[str]) -> str:
    from tabulate import tabulate

    lines = ["# qspeech results", "", CAPTION, ""]
    for source, part in table.groupby("source", sort=False):
        lines += [f"## {'Our runs' if source == 'qspeech' else source}", ""]
        records = part.to_dict("records")
        cells = {c: [_cell(r, c) for r in records] for c in SHOW}
        show = [c for c in SHOW if c in ALWAYS or any(cells[c])]  # columns empty in this section are left out
        lines += [tabulate(list(zip(*(cells[c] for c in show))), headers=show, tablefmt="github",
                          disable_numparse=True), ""]
        unfinished = [r for r in records if r["status"] not in ("ok", "published")]
        for r in unfinished:
            what = " ".join(str(x) for x in (r["model"], r["quant"], f"{int(r['bits'])}-bit", r["task"], r["data"],
                                             r["overrides"]) if x)
            seed = f", seed {r['seeds']}" if _fmt(r["seeds"]) else ""
            lines.append(f"- {r['status']}: {what}{seed}: {_fmt(r['error']) or 'no error recorded'} ({r['run_dir']})")
        if unfinished:
            lines.append("")
    if problems:
        lines += ["## Skipped result files", ""] + [f"- {p}" for p in problems] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- the SUPERB-style table
# SUPERB's column order (Yang et al. 2021, Table 2: PR, KS, IC, SID, ..., ASR); other tasks follow by name.
SUPERB_ORDER = ("pr", "ks", "ic", "sid", "asr")
SUPERB_CAPTION = (
    "One column per task: its test metric in percent (↑ higher is better, ↓ lower is better), mean ± sample std "
    "over seeds where there are several; rows per upstream x quantizer x bits (quantized modules in brackets). "
    "Storage MB and est. runtime as above (runtime vs teacher: relative to the full-precision teacher's MACs). "
    "chance: the test accuracy of always answering the training split's most frequent class. Failed runs are "
    "listed under the main table."
)
_ROW_KEY = ["model", "init", "quant", "bits", "overrides", "flags"]


def _task_order(task: str) -> tuple:
    kind = str(task).split("_")[0]
    return (SUPERB_ORDER.index(kind) if kind in SUPERB_ORDER else len(SUPERB_ORDER), str(task))


def _task_columns(ours: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(column name, task, data) per task of our runs, in SUPERB's order; a task run on several data sets
    gets a column per data set, named `task (data)`."""
    pairs = sorted({(t, d) for t, d in zip(ours["task"], ours["data"])}, key=lambda p: (_task_order(p[0]), p[1]))
    many = {t for t, _ in pairs if sum(1 for u, _ in pairs if u == t) > 1}
    return [(f"{t} ({d})" if t in many else t, t, d) for t, d in pairs]


def superb_table(table: pd.DataFrame) -> pd.DataFrame:
    """Our runs as SUPERB reports them: one row per upstream x quantizer x bits (and the overrides and flags
    that set a row apart), one column per task with its test metric (`<task>.value`, `.value_std`, `.n`,
    `.metric`, `.higher_is_better`, `.chance`, or `.status` where the task has only failed runs), storage and
    estimated runtime beside. Empty when our runs cover one ASR task only: the main table is that table."""
    ours = table[table["source"] == "qspeech"].copy()
    ours[["overrides", "flags"]] = ours[["overrides", "flags"]].fillna("")
    if ours.empty or (ours["task"].nunique() == 1 and set(ours["metric"].dropna()) <= {"wer"}):
        return pd.DataFrame()
    columns = _task_columns(ours)
    rows: dict[tuple, dict] = {}
    for _, r in ours.iterrows():
        row = rows.setdefault(tuple(r[k] for k in _ROW_KEY), {k: r[k] for k in _ROW_KEY})
        name = next(c for c, t, d in columns if (t, d) == (r["task"], r["data"]))
        if r["status"] != "ok":
            row.setdefault(f"{name}.status", r["status"])  # shown only where the task has no finished run
            continue
        for col in ("storage_mb", "est_runtime", "runtime_vs_teacher"):
            if _num(row.get(col)) is None:  # the upstream's cost: the same for every task it ran
                row[col] = r[col]
        row |= {f"{name}.{k}": r[v] for k, v in (("metric", "metric"), ("higher_is_better", "higher_is_better"),
                                                  ("value", "value"), ("value_std", "value_std"), ("n", "n"),
                                                  ("chance", "majority_acc"))}
        row[f"{name}.status"] = "ok"

    def order(row: dict) -> tuple:  # the teacher and its quantized versions, then DistilHuBERT, then FBANK
        no_upstream = _num(row.get("storage_mb")) == 0.0
        return (no_upstream, "distil" in str(row["model"]), str(row["model"]), row["init"] != "pretrained",
                str(row["init"]), -int(row["bits"]), row["quant"] != "fp", str(row["quant"]), str(row["overrides"]),
                str(row["flags"]))

    cols = _ROW_KEY + ["storage_mb", "est_runtime", "runtime_vs_teacher"] + [
        f"{c}.{k}" for c, _, _ in columns
        for k in ("metric", "higher_is_better", "value", "value_std", "n", "chance", "status")]
    return pd.DataFrame(sorted(rows.values(), key=order), columns=cols)


def render_superb(sup: pd.DataFrame) -> str:
    """The SUPERB-style table as a markdown section, with a chance row for the classification tasks."""
    from tabulate import tabulate

    tasks = [c[: -len(".status")] for c in sup.columns if c.endswith(".status")]
    heads, chance = [], []
    for t in tasks:
        metric = sup[f"{t}.metric"].dropna()
        metric = str(metric.iloc[0]) if len(metric) else "metric"
        hib = sup[f"{t}.higher_is_better"].dropna()
        arrow = "" if not len(hib) else (" ↑" if bool(hib.iloc[0]) else " ↓")
        heads.append(f"{t} {metric.upper()}{' %' if metric in UNITS else ''}{arrow}")
        chance.append(_fmt(_mean_std(list(sup[f"{t}.chance"]))[0]))
    extra = [c for c in ("overrides", "flags") if sup[c].astype(str).str.len().any()]
    body = []
    for _, r in sup.iterrows():
        upstream = r["model"] if r["init"] == "pretrained" else f"{r['model']} ({r['init']} init)"
        cells = [upstream, r["quant"], str(int(r["bits"]))] + [str(r[c]) for c in extra] + [
            _fmt(r["storage_mb"]), _fmt(r["est_runtime"], 3), _fmt(r["runtime_vs_teacher"], 3)]
        for t in tasks:
            status = r[f"{t}.status"]
            if status == "ok":
                cells.append(_with_std({"value": r[f"{t}.value"], "value_std": r[f"{t}.value_std"],
                                        "n": r[f"{t}.n"]}, "value"))
            else:
                cells.append("" if pd.isna(status) else str(status))
        body.append(cells)
    if any(chance):
        body.append(["chance (majority class)", "", ""] + [""] * len(extra) + ["", "", ""] + chance)
    headers = ["upstream", "quant", "bits", *extra, "storage MB", "est. runtime", "runtime vs teacher", *heads]
    keep = [i for i, h in enumerate(headers) if h not in ("est. runtime", "runtime vs teacher")
            or any(row[i] for row in body)]  # runtime vs teacher needs the runs' MAC counts
    body = [[row[i] for i in keep] for row in body]
    return "\n".join(["## SUPERB tasks: our runs, one column per task", "", SUPERB_CAPTION, "",
                      tabulate(body, headers=[headers[i] for i in keep], tablefmt="github", disable_numparse=True),
                      ""])


def _ylabel(part: pd.DataFrame) -> str:
    metric = str(part["metric"].dropna().iloc[0]) if part["metric"].notna().any() else "metric"
    unit = UNITS.get(metric)
    return f"{metric.upper()} ({unit})" if unit else metric


def _series_name(model, init, quant, overrides, flags) -> str:
    notes = [f for f in str(flags or "").split(", ") if f and f != "random init"]
    name = f"{model}{'' if init == 'pretrained' else ' (' + init + ' init)'} {quant}"
    return " ".join(p for p in [name, str(overrides or "")] + [f"[{n}]" for n in notes] if p)


def _fp_point(part: pd.DataFrame, model, init, overrides) -> pd.DataFrame:
    """The full-precision row a quantizer's curve starts from: same model and init, the same overrides
    label if there is one, else the only full-precision row."""
    fp = part[(part["model"] == model) & (part["init"] == init) & (part["quant"] == "fp")]
    same = fp[fp["overrides"].fillna("") == (overrides or "")]
    return same.head(1) if not same.empty else fp if len(fp) == 1 else fp.head(0)


def _draw_panel(ax, part: pd.DataFrame, x: str) -> None:
    keys = ["model", "init", "quant", "overrides", "flags"]
    part = part.assign(**{k: part[k].fillna("") for k in ("overrides", "flags")})
    for (model, init, quant, overrides, flags), grp in part.groupby(keys, sort=False):
        if (grp["storage_mb"].astype(float) == 0).all():  # FBANK: no weights, no upstream cost
            ax.axhline(float(grp["value"].iloc[0]), linestyle="--", color="gray", linewidth=1,
                       label=f"{model} (no upstream)")
            continue
        is_distil = "distil" in str(model)
        if quant == "fp" and not is_distil:
            continue  # full-precision points are drawn last, on top of the curves that start at them
        own = grp.sort_values("bits")
        line = own if is_distil else pd.concat([own, _fp_point(part, model, init, overrides)])
        ax.errorbar(line[x].astype(float), line["value"].astype(float), yerr=line["value_std"].astype(float),
                    marker="*" if is_distil else "o", markersize=14 if is_distil else 6, capsize=2,
                    linestyle="" if is_distil else "-", label=_series_name(model, init, quant, overrides, flags))
        for _, r in own.iterrows():
            ax.annotate(f"{int(r['bits'])}b", (float(r[x]), float(r["value"])), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    fp = part[(part["quant"] == "fp") & ~part["model"].astype(str).str.contains("distil")
              & (part["storage_mb"].astype(float) != 0)]
    for _, r in fp.iterrows():
        ax.errorbar([float(r[x])], [float(r["value"])], yerr=[_num(r["value_std"]) or 0.0], marker="s",
                    markersize=8, markeredgecolor="black", capsize=2, zorder=5, linestyle="",
                    label=_series_name(r["model"], r["init"], "fp", r["overrides"], r["flags"]))
        ax.annotate("32b", (float(r[x]), float(r["value"])), fontsize=7, xytext=(3, 3), textcoords="offset points")


def _ok_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["status"].isin(["ok", "published"]) & table["value"].notna()]


def plot(table: pd.DataFrame, path: Path) -> Path | None:
    """WER against storage and against estimated runtime: one row of panels per task and data of our runs,
    then the paper's. Seed aggregates carry their std as error bars; full-precision points are squares
    drawn on top of the curves that start at them."""
    ok = _ok_rows(table)
    if ok.empty:
        return None
    panels = [(f"Our runs: task {t}, data {d}", part) for (t, d), part in
              ok[ok["source"] == "qspeech"].groupby(["task", "data"], sort=True)]
    pub = ok[ok["source"] == paper.SOURCE]
    panels += [(f"Published (Yeh et al. 2023): task {t}, data {d} (test-clean)", part)
               for (t, d), part in pub.groupby(["task", "data"], sort=True)]
    return _draw_figure(panels, path)


def plot_superb(table: pd.DataFrame, path: Path) -> Path | None:
    """The SUPERB table's plots: per task (SUPERB's order) its metric against storage and against estimated
    runtime, our runs only, with the chance line (majority class) of the classification tasks."""
    ok = _ok_rows(table)
    ours = ok[ok["source"] == "qspeech"]
    if ours.empty:
        return None
    panels = []
    for name, t, d in _task_columns(ours):
        part = ours[(ours["task"] == t) & (ours["data"] == d)]
        hib = part["higher_is_better"].dropna()
        better = "" if hib.empty else f" ({'higher' if bool(hib.iloc[0]) else 'lower'} is better)"
        panels.append((f"task {t}, data {d}: {_ylabel(part)}{better}", part))
    return _draw_figure(panels, path, chance=True)


def _draw_figure(panels: list[tuple[str, pd.DataFrame]], path: Path, chance: bool = False) -> Path:
    """One row of two panels (metric against storage, against runtime) per (title, rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 2, figsize=(15, 4.2 * len(panels)), squeeze=False)
    axes_spec = [("storage_mb", "storage (MB)"),
                 ("runtime_vs_teacher", "est. runtime (relative to the full-precision teacher)")]
    for row_i, (title, part) in enumerate(panels):
        part = part.assign(runtime_vs_teacher=part["runtime_vs_teacher"].fillna(part["est_runtime"]))
        level = _mean_std(list(part["majority_acc"]))[0] if chance else None
        for col_i, (x, xlabel) in enumerate(axes_spec):
            ax = axes[row_i][col_i]
            _draw_panel(ax, part, x)
            if level is not None:
                ax.axhline(level, linestyle=":", color="red", linewidth=1, label="chance (majority class)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(_ylabel(part))
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.margins(x=0.08, y=0.08)  # points at the edges (100 % WER, full-precision storage) stay inside
            if col_i == 1:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a reader never sees half a picture
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def cost_table(costs: list[dict]) -> pd.DataFrame:
    """`qspeech cost` runs (the latest per model/quant/targets/bits) beside the paper's storage and runtime
    for the same model and bits: the accounting checked against the published estimates."""
    rows = []
    for c in costs:
        bits = int(c["bits"])
        pub = next((p for p in paper.ROWS if p["model"] == c["model"] and p["bits"] == bits), None)
        rows.append({
            "_macs": c.get("macs"), "_seconds": c.get("seconds"),
            "model": c["model"], "quant": "fp" if bits >= 32 else c.get("quant"),
            "targets": "+".join(c.get("targets") or ["linear"]), "bits": bits, "params": c.get("params"),
            "quantized_params": c.get("quantized_params"), "storage_mb": round(float(c["storage_mb"]), 2),
            "paper_storage_mb": pub and pub["storage_mb"], "est_runtime": round(float(c["est_runtime"]), 3),
            "paper_est_runtime": pub and pub["est_runtime"], "_mtime": c.get("_mtime", 0),
        })
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows).sort_values("_mtime").drop_duplicates(["model", "quant", "targets", "bits"], keep="last")
    teacher_macs = {(r["model"], r["_seconds"]): r["_macs"] for _, r in df.iterrows() if r["_macs"]}
    df.insert(df.columns.get_loc("paper_est_runtime"), "runtime_vs_teacher", [
        round(r["est_runtime"] * r["_macs"] / t, 3) if (t := teacher_macs.get((TEACHER_OF.get(r["model"], r["model"]),
                                                                               r["_seconds"]))) else None
        for _, r in df.iterrows()])
    df = df.drop(columns=["_mtime", "_macs", "_seconds"])
    return df.sort_values(["model", "targets", "bits"], ascending=[True, True, False])


def make_report(outputs: str | Path = "outputs") -> dict:
    from tabulate import tabulate

    outputs = Path(outputs)
    if not outputs.is_dir():  # a typo must not create a folder and report "0 runs"
        raise QSpeechError(f"--outputs {outputs}: no such folder; pass the folder your runs wrote into "
                           f"(default: outputs)")
    results, problems = load_results(outputs)
    costs, _ = collect(outputs, COST_FILE, frozenset({"model", "bits", "storage_mb", "est_runtime"}))
    benches, _ = collect(outputs, BENCH_FILE, frozenset({"model", "variants"}))
    table = add_measured_speed(build_table(results), benches)
    costs_df = cost_table(costs)
    csv_path, md_path, png_path = outputs / "results.csv", outputs / "report.md", outputs / "report.png"
    write_text_atomic(csv_path, table.to_csv(index=False))
    markdown = render_markdown(table, problems)
    if not costs_df.empty:
        markdown += ("\n## Accounting (`qspeech cost`) beside the paper's estimates\n\n"
                     + tabulate(costs_df.fillna("").values.tolist(), headers=list(costs_df.columns), tablefmt="github")
                     + "\n")
    sup = superb_table(table)
    sup_csv = sup_png = None
    if not sup.empty:
        sup_csv, sup_png = outputs / "superb.csv", outputs / "superb.png"
        write_text_atomic(sup_csv, sup.to_csv(index=False))
        markdown += "\n" + render_superb(sup) + f"\nPlots: `{sup_png.name}` (per task, against storage and runtime).\n"
    write_text_atomic(md_path, markdown)
    png = plot(table, png_path)
    if sup_png is not None:
        sup_png = plot_superb(table, sup_png)
    return {"csv": csv_path, "markdown": md_path, "plot": png, "runs": len(results), "problems": problems,
            "table": table, "superb": sup, "superb_csv": sup_csv, "superb_plot": sup_png}
