"""Bit-packed export of quantized upstreams: packing layout, exact reload, size vs accounting."""

import json

import pytest
import torch

from conftest import random_upstream
from qspeech.export import FORMAT, export_packed, load_packed, read_packed
from qspeech.quant import act_bits_of, get_method, overhead_values, quant_config, quantize_, quantized_modules
from qspeech.quant import clone_model as clone_upstream
from qspeech.quant.packing import is_storage_exact, pack_codes, packed_nbytes, round_to_storage_, unpack_codes

SYM = quant_config("rtn", symmetric=True)  # rtn per channel, symmetric (the accounting's reference)


@pytest.fixture(scope="module")
def tiny():
    return random_upstream("tiny_hubert")


@pytest.fixture(scope="module")
def wav():
    return torch.randn(2, 3200, generator=torch.Generator().manual_seed(1)) * 0.1


def _hidden(up, wav):
    lens = torch.tensor([wav.shape[1], wav.shape[1] - 800])
    with torch.inference_mode():
        return up(wav, lens).hidden_states


def test_pack_2bit_hand_made():
    # LSB first: byte = c0 | c1 << 2 | c2 << 4 | c3 << 6; the tail byte is zero-padded.
    codes = torch.tensor([[0, 1, 2, 3, 3], [2, 1, 0, 1, 2]])
    packed = pack_codes(codes, 2)
    # stream: 0,1,2,3 | 3,2,1,0 | 1,2
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0b11100100, 0b00011011, 0b00001001]
    assert unpack_codes(packed, 2, 10).tolist() == codes.reshape(-1).tolist()


def test_pack_1_4_8_3_bit_layout():
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0b10000001, 0b1]
    assert pack_codes(torch.tensor([0xA, 0x5, 0x3]), 4).tolist() == [0x5A, 0x03]
    assert pack_codes(torch.tensor([7, 200]), 8).tolist() == [7, 200]
    # 3 bits: code i at stream bits [3i, 3i+3): 5 | 3<<3 | 7<<6 = 0b11_011_101 then the high bit of 7
    assert pack_codes(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b1]
    assert pack_codes(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 16])
def test_pack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 9, 1000):
        codes = torch.randint(0, 2**bits, (n,), generator=g)
        packed = pack_codes(codes, bits)
        assert packed.numel() == packed_nbytes(n, bits)
        assert torch.equal(unpack_codes(packed, bits, n), codes)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([2**bits]), bits)


CASES = [
    ("rtn", 1, {}), ("rtn", 2, {"symmetric": True}), ("rtn", 4, {"symmetric": True}), ("rtn", 8, {"symmetric": True}),
    ("rtn", 3, {"symmetric": False}), ("rtn", 2, {"granularity": "group", "group_size": 128, "symmetric": True}),
    ("kmeans", 2, {"iters": 5}), ("lsq", 2, {}), ("bit", 1, {}), ("bit", 2, {"act_bits": 2}),
    ("rtn", 4, {"targets": ["all"], "symmetric": True}),
]


@pytest.mark.parametrize("method,bits,extra", CASES, ids=[f"{m}{b}{'-' + '-'.join(e) if e else ''}" for m, b, e in CASES])
def test_export_load_identical(tiny, wav, tmp_path, method, bits, extra):
    up = clone_upstream(tiny)
    qc = quant_config(method, **extra)
    quantize_(up, qc, bits)
    if act_bits_of(qc):
        _hidden(up, wav)  # initialises the activation quantizers
    round_to_storage_(up)
    assert is_storage_exact(up)
    path = export_packed(up, qc, bits, tmp_path / "up.safetensors")
    loaded = load_packed(path)
    a, b = _hidden(up, wav), _hidden(loaded, wav)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert float((x - y).abs().max()) == 0.0
    _, meta = read_packed(path)
    assert meta["format"] == FORMAT and meta["exact"] is True and meta["bits"] == bits
    assert meta["arch"] == "hubert" and meta["quant"]["method"] == method
    assert set(meta["modules"]) == set(quantized_modules(up))
    assert all(m["bits"] == bits for m in meta["modules"].values())
    assert {m["format"] for m in meta["modules"].values()} <= set(get_method(method).formats)


def test_round_to_storage_is_idempotent_and_export_flags_inexact(tiny, wav, tmp_path):
    up = clone_upstream(tiny)
    quantize_(up, SYM, 4)
    assert not is_storage_exact(up)
    path = export_packed(up, SYM, 4, tmp_path / "inexact.safetensors")
    assert read_packed(path)[1]["exact"] is False
    first = round_to_storage_(up)
    assert first["changed"] > 0
    assert round_to_storage_(up)["changed"] == 0


def test_packed_codes_match_parts(tiny, tmp_path):
    from qspeech.quant import quantized_weight_parts
    from qspeech.export import unpacked_parts

    up = clone_upstream(tiny)
    quantize_(up, SYM, 2)
    round_to_storage_(up)
    path = export_packed(up, SYM, 2, tmp_path / "p.safetensors")
    tensors, meta = read_packed(path)
    name = "encoder.layers.0.fc1"
    parts = quantized_weight_parts(dict(up.model.named_modules())[name])
    got = unpacked_parts(tensors, name, meta["modules"][name])
    assert torch.equal(got["codes"], parts["codes"]) and torch.equal(got["scale"], parts["scale"])
    assert tensors[f"q::{name}.codes"].numel() == parts["codes"].numel() * 2 // 8
    assert tensors[f"q::{name}.scale"].dtype == torch.float16
    assert all(t.dtype != torch.float32 for t in tensors.values())
    json.dumps(meta)  # metadata decodes to plain JSON values


def test_export_command_reloads_identically(tmp_path):
    from conftest import run_cli

    proc = run_cli("export", "bits=2", "model.init=random", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (out,) = (tmp_path / "outputs" / "export").rglob("export.json")
    info = json.loads(out.read_text())
    assert info["reload_max_abs_diff"] == 0.0 and abs(info["packed_vs_storage"] - 1) < 0.02
    assert read_packed(info["path"])[1]["exact"] is True
    assert info["s3prl_reload_max_abs_diff"] == 0.0 and info["s3prl_path"].endswith("upstream.s3prl.pt")
    # the CLI takes the s3prl file back (`qspeech cost` loads model.ckpt); the packed one gets one clear line
    proc = run_cli("cost", "bits=2", f"model.ckpt={info['s3prl_path']}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("cost", "bits=2", f"model.ckpt={info['path']}", cwd=tmp_path)
    assert proc.returncode == 2 and "upstream.s3prl.pt written beside it" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_packed_size_matches_accounting_hubert_base(tmp_path, bits):
    from qspeech.cost import account
    from qspeech.quant.targets import select_targets

    base = random_upstream("hubert")
    qc = SYM
    chosen = select_targets(base.model, bits, qc.targets, qc.exclude, qc.overrides)
    storage_mb = account(base, chosen, lambda s, b: overhead_values(qc, s, b), 0.1).storage_mb
    quantize_(base, qc, bits)
    round_to_storage_(base)
    packed_mb = export_packed(base, qc, bits, tmp_path / "base.safetensors").stat().st_size / 1e6
    assert abs(packed_mb / storage_mb - 1) < 0.02, (packed_mb, storage_mb)


# ------------------------------------------------------------------ the way back to s3prl

def _s3prl_class_hidden(path, arch, wav, normalize=False):
    """Load the checkpoint as s3prl itself does (s3prl.upstream.hubert.convert.load_converted_model for
    HuBERT; the distiller expert's two keys), with no qspeech loader involved, and take the hidden states."""
    from qspeech.upstream import Upstream, UpstreamSpec

    def merge_with_parent(dc, cfg: dict):  # s3prl.upstream.utils' (that module imports torchaudio)
        assert type(cfg) is dict and cfg
        return dc(**{k: v for k, v in cfg.items() if k in dc.__dataclass_fields__})

    state = torch.load(path, map_location="cpu", weights_only=True)
    if arch == "hubert":
        from s3prl.upstream.hubert.hubert_model import HubertConfig, HubertModel, HubertPretrainingConfig

        for key in ("task_cfg", "model_cfg", "model_weight", "dictionaries_symbols"):  # what s3prl requires
            assert key in state
        model = HubertModel(merge_with_parent(HubertConfig, state["model_cfg"]),
                            merge_with_parent(HubertPretrainingConfig, state["task_cfg"]),
                            state["dictionaries_symbols"])
        model.load_state_dict(state["model_weight"])  # strict: every key of s3prl's class, nothing else
    else:
        from s3prl.upstream.distiller.model import DistillerConfig, DistillerModel

        model = DistillerModel(DistillerConfig(state["Config"]["distiller"]))
        model.load_state_dict(state["Distiller"])
    return _hidden(Upstream(model, UpstreamSpec("s3prl", arch, {}), normalize).requires_grad_(False), wav)


S3PRL_CASES = [
    ("tiny_hubert", "pretrained", "rtn", 2, {"targets": ["linear", "cnn"]}),  # configs from the packaged asset
    ("tiny_hubert", "random", "rtn", 4, {"targets": ["all"], "symmetric": True}),  # pos_conv: weight norm rebuilt
    ("tiny_distilhubert", "random", "bit", 1, {}),
]


@pytest.mark.parametrize("name,init,method,bits,extra", S3PRL_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}{c[3]}" for c in S3PRL_CASES])
def test_s3prl_checkpoint_reloads_to_the_quantized_model(wav, tmp_path, name, init, method, bits, extra):
    """Beside the packed file: the dequantized model in s3prl's format, whose hidden states through
    model.ckpt= and through s3prl's own class equal the evaluated (fake-quantized) model's exactly."""
    from conftest import model_cfg
    from qspeech.export import load_s3prl, s3prl_path
    from qspeech.upstream import build_upstream

    torch.manual_seed(0)
    up = build_upstream(model_cfg(name, init=init))
    qc = quant_config(method, **extra)
    quantize_(up, qc, bits)
    round_to_storage_(up)
    up.requires_grad_(False)  # as the task runs it (attention's kernel depends on it)
    packed = export_packed(up, qc, bits, tmp_path / "upstream.packed.safetensors")
    path = s3prl_path(packed)
    assert path == tmp_path / "upstream.s3prl.pt" and path.is_file()
    expected = _hidden(up, wav)
    for got in (_hidden(load_s3prl(model_cfg(name), path), wav), _s3prl_class_hidden(path, up.spec.arch, wav)):
        assert len(got) == len(expected)
        assert all(torch.equal(x, y) for x, y in zip(got, expected))
    if init == "pretrained":  # the source checkpoint's own configs and label dictionaries are kept
        source = torch.load(up.spec.source, weights_only=True)
        state = torch.load(path, weights_only=True)
        assert state["model_cfg"] == source["model_cfg"] and state["task_cfg"] == source["task_cfg"]
        assert state["dictionaries_symbols"] == source["dictionaries_symbols"]


def test_exported_files_are_readable_like_other_outputs(tiny, tmp_path):
    """safetensors recreates the temp file with mode 0600; the outputs are 0666 minus the umask (0644)."""
    import os

    up = clone_upstream(tiny)
    quantize_(up, SYM, 2)
    round_to_storage_(up)
    packed = export_packed(up, SYM, 2, tmp_path / "upstream.packed.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    for path in (packed, tmp_path / "upstream.s3prl.pt"):
        assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upstream.packed.safetensors", "upstream.s3prl.pt"]


def test_activation_quantization_has_no_s3prl_checkpoint(tiny, wav, tmp_path, caplog):
    up = clone_upstream(tiny)
    qc = quant_config("bit", act_bits=2)
    quantize_(up, qc, 2)
    _hidden(up, wav)
    round_to_storage_(up)
    with caplog.at_level("WARNING"):
        export_packed(up, qc, 2, tmp_path / "upstream.packed.safetensors")
    assert not (tmp_path / "upstream.s3prl.pt").exists()
    assert any("quant.act_bits" in r.message for r in caplog.records)


def test_ignored_ckpt_warns_and_a_packed_ckpt_is_named(tmp_path, caplog):
    from conftest import model_cfg
    from qspeech.errors import CheckpointError
    from qspeech.upstream import build_upstream

    with caplog.at_level("WARNING"):
        build_upstream(model_cfg("tiny_hubert", init="random", ckpt="/no/such/file.pt"))
    [record] = [r for r in caplog.records if "model.ckpt" in r.message]
    assert "model.ckpt=/no/such/file.pt is ignored: model.init=random" in record.message
    packed = tmp_path / "upstream.packed.safetensors"
    packed.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="upstream.s3prl.pt written beside it"):
        build_upstream(model_cfg("tiny_hubert", ckpt=str(packed)))


def test_fbank_has_packed_file_only(tmp_path):
    from conftest import model_cfg
    from qspeech.upstream import build_upstream

    up = build_upstream(model_cfg("fbank"))
    export_packed(up, SYM, 32, tmp_path / "upstream.packed.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["upstream.packed.safetensors"]
