"""FP8 (three schemes, two layouts) and INT8 W8A8 with SmoothQuant: the quantizers' arithmetic, the
layouts read back by our readers and by transformers, and the simulated activation rounding."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qconvert.algorithms.fp8 import quantize_fp8
from qconvert.algorithms.int8 import smoothing_scale
from qconvert.eval.activations import fake_quantizer
from qconvert.eval.loader import dequantized_state
from qconvert.formats import compressed_tensors, fp8
from qconvert.model.checkpoint import Checkpoint
from qconvert.quantized import FP8_MAX, FP8Tensor, QuantizedTensor

SMALL = ["--samples", "4", "--seq-len", "32", "-q"]


@pytest.mark.parametrize("scheme,scale_shape", [("dynamic", (300, 1)), ("static", (1,)), ("block", (3, 2))])
def test_fp8_scales_and_rounding(scheme, scale_shape):
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0)) * 0.02
    w[7, 3] = 1.5  # one outlier: only its row / tensor / block gets the larger scale
    qt = quantize_fp8(w, scheme, torch.bfloat16)
    assert tuple(qt.scale.shape) == scale_shape and qt.weight.dtype == torch.float8_e4m3fn
    # the largest element of every scale's slice lands on (or, after the scale's rounding, next to) ±448
    assert float(qt.weight.float().abs().max()) >= 0.99 * FP8_MAX
    err = (qt.dequantize().float() - w).abs() / w.abs().clamp(min=1e-3)
    assert float(err.median()) < 0.05  # 3 mantissa bits: half an ulp is 6 %
    if scheme == "block":  # the outlier's block alone
        assert float(qt.scale[0, 0]) > 10 * float(qt.scale[1:].max())


def test_smoothing_scale_moves_the_range():
    x_max, w_max = torch.tensor([100.0, 1.0, 0.0]), torch.tensor([0.01, 0.01, 0.5])
    s = smoothing_scale(x_max, w_max, 0.5)
    assert torch.allclose(s[:2], torch.tensor([100.0, 10.0])) and s[2] == 1  # a dead channel is left alone
    # after smoothing, activation and weight ranges are balanced (α = 0.5: both sqrt(x_max·w_max))
    assert torch.allclose(x_max[:2] / s[:2], w_max[:2] * s[:2])


@pytest.mark.parametrize("kind", ["int", "float"])
def test_activation_rounding_per_token(kind):
    x = torch.randn(2, 5, 64) * torch.logspace(-2, 2, 5)[None, :, None]  # tokens of very different size
    q = fake_quantizer({"num_bits": 8, "type": kind, "strategy": "token"}, None)(x)
    rel = ((q - x).norm(dim=-1) / x.norm(dim=-1)).max()
    assert 0 < float(rel) < (0.01 if kind == "int" else 0.05)
    static = fake_quantizer({"num_bits": 8, "type": "float", "strategy": "tensor"}, torch.tensor([100 / FP8_MAX]))(x)
    assert float(static.abs().max()) <= 100 * (1 + 1e-6)  # clamped to the calibrated range


@pytest.mark.parametrize("args,fmt,scheme", [
    (["fp8"], "float-quantized", ("channel", "token")),
    (["fp8", "--scheme", "static"], "float-quantized", ("tensor", "tensor")),
    (["fp8", "--scheme", "block"], "float-quantized", ("block", "group")),
    (["int8"], "int-quantized", ("channel", "token")),
    (["int8", "--smoothquant", "0.5", "--gptq"], "int-quantized", ("channel", "token")),
])
def test_compressed_tensors_w8a8(tiny, qconvert, tmp_path, args, fmt, scheme):
    model = tiny("llama", head_dim=64)  # every linear made of whole 128 x 128 blocks
    out = tmp_path / "out"
    res = qconvert(*args, model, "-o", out, *SMALL)
    assert res.code == 0, res.err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == fmt and (group["weights"]["strategy"], group["input_activations"]["strategy"]) == scheme
    tensors = dict(compressed_tensors.read(Checkpoint(out)))
    quantized = [t for t in tensors.values() if isinstance(t, (QuantizedTensor, FP8Tensor))]
    assert len(quantized) == 2 * 7
    if "static" in args:
        assert all(t.input_scale is not None and float(t.input_scale) > 0 for t in quantized)
    quantizers = {}
    dequantized_state(Checkpoint(out), quantizers)
    assert len(quantizers) == 2 * 7
    # transformers (compressed-tensors) loads it on the CPU, keeping our very codes and scales, and runs it
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    module = "model.layers.1.mlp.down_proj"
    params = dict(hf.get_submodule(module).named_parameters())
    stored = Checkpoint(out).load([f"{module}.weight", f"{module}.weight_scale"])
    assert params["weight"].dtype in (torch.int8, torch.float8_e4m3fn)
    assert torch.equal(params["weight"].view(torch.uint8), stored[f"{module}.weight"].view(torch.uint8))
    assert torch.equal(params["weight_scale"], stored[f"{module}.weight_scale"])
    assert torch.isfinite(hf(torch.tensor([[1, 2, 3]])).logits).all()
    res = qconvert("eval", out, "--base", model, "--samples", "2", "--seq-len", "32", "--json")
    assert res.code == 0 and 0 < res.json()["kl_divergence"] < 0.05


def test_smoothquant_writes_the_folded_norms(tiny, qconvert, tmp_path):
    """The norms before q/k/v and gate/up carry 1/s (fold_scale, shared with AWQ and tested there)."""
    model = tiny("llama")
    res = qconvert("int8", model, "-o", tmp_path / "sq", "--smoothquant", "0.8", *SMALL, "--json")
    assert res.code == 0, res.err
    plain = Checkpoint(model)
    smoothed = Checkpoint(tmp_path / "sq")
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(plain.get(norm), smoothed.get(norm))


def test_vllm_fp8_layout(tiny, qconvert, tmp_path):
    out = tmp_path / "out"
    res = qconvert("fp8", tiny("qwen3", head_dim=64), "--scheme", "block", "--format", "fp8", "-o", out, *SMALL)
    assert res.code == 0, res.err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128] and "lm_head" in qc["ignored_layers"]
    ckpt = Checkpoint(out)
    scale = next(n for n in ckpt.names() if n.endswith("down_proj.weight_scale_inv"))
    assert ckpt.get(scale).dtype == torch.float32
    assert sum(isinstance(t, FP8Tensor) for _, t in fp8.read(ckpt)) == 2 * 7


@pytest.mark.parametrize("args,fragment", [
    (["fp8", "--scheme", "dynamic", "--format", "fp8"], "use --scheme block"),
    (["fp8", "--scheme", "tensorwise"], "--scheme tensorwise"),
    (["int8", "--smoothquant", "1.5"], "between 0 and 1"),
    (["int8", "--format", "gptq"], "No such option"),
    (["fp8", "--scheme", "block"], "k_proj: [64 x 128] is not made of whole 128x128 blocks"),
])
def test_w8a8_refusals(tiny, qconvert, tmp_path, args, fragment):
    res = qconvert(*args, tiny("llama"), "-o", tmp_path / "out", *SMALL)
    assert res.code != 0 and fragment in res.err and not (tmp_path / "out").exists()
