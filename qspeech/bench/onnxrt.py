"""The upstream as an ONNX graph (fixed input shape, one output per hidden state) and onnxruntime sessions."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


class HiddenStates(nn.Module):
    """Upstream -> tuple of hidden states, for ONNX export (one graph output per hidden state). Runs the
    s3prl model without a padding mask (the benchmark's batch has no padding; s3prl's masked index_put does
    not export): the same computation as Upstream.forward with all-valid lengths."""

    def __init__(self, upstream):
        super().__init__()
        self.upstream = upstream

    def forward(self, wavs):
        import torch.nn.functional as F

        from qspeech.upstream.builders import hidden_states_with_hooks

        up = self.upstream
        if up.spec.arch == "distiller":
            return tuple(up(wavs).hidden_states)
        if up.normalize:
            wavs = F.layer_norm(wavs, wavs.shape[-1:])
        if hasattr(up.model, "feature_grad_mult"):
            up.model.feature_grad_mult = 0.0
        states = hidden_states_with_hooks(up.model, lambda: up.model.extract_features(wavs, None, mask=False))
        frames = min(s.shape[1] for s in states)
        return tuple(s[:, :frames] for s in states)


@contextmanager
def _traceable_s3prl():
    """s3prl's pad_to_multiple calls float.is_integer() on x.size(dim) / multiple, which is a tensor while
    tracing; the export has a fixed input shape, so a python-int version is equivalent."""
    import math

    import torch.nn.functional as F
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
    import warnings

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
    import onnxruntime as ort

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
    import onnxruntime as ort

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
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in m.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:12])
