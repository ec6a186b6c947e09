"""The upstream as an ONNX graph (fixed input shape, one output per hidden state), onnxruntime sessions and
where their time goes (onnxruntime's profiler)."""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class HiddenStates(nn.Module):
    """Upstream -> tuple of hidden states, for ONNX export (one graph output per hidden state). Runs its
    architecture's hidden states without a padding mask (the benchmark's batch has no padding; s3prl's
    masked index_put does not export): the same computation as Upstream.forward with all-valid lengths."""

    def __init__(self, upstream):
        super().__init__()
        self.upstream = upstream

    def forward(self, wavs):
        up = self.upstream
        if up.normalize:
            wavs = F.layer_norm(wavs, wavs.shape[-1:])
        if hasattr(up.model, "feature_grad_mult"):
            up.model.feature_grad_mult = 0.0
        lens = torch.full((wavs.shape[0],), wavs.shape[1], dtype=torch.long)
        states = up.architecture.hidden_states(up.model, wavs, lens, None)
        frames = min(s.shape[1] for s in states)
        return tuple(s[:, :frames] for s in states)


@contextmanager
def _traceable_s3prl():
    """s3prl's pad_to_multiple calls float.is_integer() on x.size(dim) / multiple, which is a tensor while
    tracing; the export has a fixed input shape, so a python-int version is equivalent."""
    # s3prl is imported where used: heavy, and only the commands that build an upstream need it
    from s3prl.upstream.wav2vec2 import wav2vec2_model as w2v

    def pad_to_multiple(x, multiple, dim=-1, value=0):
        if x is None:
            return None, 0
        tsz = int(x.size(dim))
        remainder = math.ceil(tsz / multiple) * multiple - tsz
        if remainder == 0:
            return x, 0
        pad_offset = (0,) * (-1 - dim) * 2
        return F.pad(x, (*pad_offset, 0, remainder), value=value), remainder

    old = w2v.pad_to_multiple
    w2v.pad_to_multiple = pad_to_multiple
    try:
        yield
    finally:
        w2v.pad_to_multiple = old


def export_onnx(upstream, wavs: torch.Tensor, path) -> Path:
    """The upstream (fixed input shape) as ONNX via torch's TorchScript exporter (dynamo=False: the dynamo
    exporter needs onnxscript, which is not installed), outputs h0..hN."""
    path = Path(path)
    wrapper = HiddenStates(upstream).eval()
    n = upstream.num_hidden
    with warnings.catch_warnings(), torch.no_grad(), _traceable_s3prl():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (wavs,), str(path), input_names=["wavs"],
                          output_names=[f"h{i}" for i in range(n)], opset_version=17, do_constant_folding=True,
                          dynamo=False)
    return path


def session_options(threads: int, config: dict | None = None):
    import onnxruntime as ort  # heavy (onnx: 1.5 s to import): loaded when a graph is built

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # No busy-waiting between runs: spinning ORT threads would steal the cores from the torch variants
    # timed in between (measured: torch 30x slower beside a spinning session on 2 cores).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, str(v))
    return so


def ort_session(path, threads: int, config: dict | None = None):
    import onnxruntime as ort  # heavy (onnx: 1.5 s to import): loaded when a graph is built

    return ort.InferenceSession(str(path), session_options(threads, config), providers=["CPUExecutionProvider"])


def ort_runner(path, wavs: torch.Tensor, threads: int, config: dict | None = None):
    """(fn running the whole graph, the last hidden state of one run) for an ONNX file; `config`: session
    config entries (e.g. {"mlas.use_lut_gemm": 1})."""
    sess = ort_session(path, threads, config)
    feed = {"wavs": wavs.numpy()}
    last = torch.from_numpy(sess.run([sess.get_outputs()[-1].name], feed)[0])
    return (lambda: sess.run(None, feed)), last


def op_counts(path) -> dict:
    """The 12 most frequent node types of an ONNX graph."""
    import onnx  # heavy (onnx: 1.5 s to import): loaded when a graph is built

    m = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in m.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:12])


def profile_shares(path, feed: dict, threads: int, runs: int = 2, config: dict | None = None) -> dict:
    """Where an onnxruntime graph spends its time, from onnxruntime's profiler over `runs` runs after one
    warm-up (left out): ms per run (node time), the share of each part of the model (CNN front end,
    attention block, feed-forward, other) and ms per run of the 8 costliest operator types (the kernels)."""
    import onnxruntime as ort  # heavy (onnx: 1.5 s to import): loaded when a graph is built

    so = session_options(threads, config)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(path).with_suffix("")) + "_profile"
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink(missing_ok=True)
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    after_warmup = starts[1] if len(starts) > 1 else 0
    parts = {"cnn": 0.0, "attention": 0.0, "ffn": 0.0, "other": 0.0}
    ops: dict[str, float] = {}
    n = max(1, runs)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < after_warmup:
            continue
        parts[_part(e["name"])] += e["dur"] / 1e3
        op = e.get("args", {}).get("op_name", "?")
        ops[op] = ops.get(op, 0.0) + e["dur"] / 1e3 / n
    total = sum(parts.values())
    top = dict(sorted(((k, round(v, 1)) for k, v in ops.items()), key=lambda kv: -kv[1])[:8])
    return {"ms_per_run": round(total / n, 1),
            "share": {k: round(v / total, 3) if total else 0.0 for k, v in parts.items()}, "ops_ms": top}


def _part(node_name: str) -> str:
    if "feature_extractor" in node_name or "conv_layers" in node_name:
        return "cnn"
    if "self_attn" in node_name or "attention" in node_name:
        return "attention"
    if "fc1" in node_name or "fc2" in node_name or "feed_forward" in node_name:
        return "ffn"
    return "other"
