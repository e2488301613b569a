"""FP8 KV-cache scales: calibrated on what the attention stores (keys after k-norm and RoPE), written where
vLLM and compressed-tensors read them, loaded by transformers, and simulated in evaluation."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, DynamicCache

from qconvert.eval.loader import dequantized_state, pop_kv_scales
from qconvert.kv_cache import SCALES, round_fp8
from qconvert.model.checkpoint import Checkpoint
from qconvert.pipeline import Calibration, calibration_tokens
from qconvert.quantized import FP8_MAX

SMALL = ["--samples", "4", "--seq-len", "32", "-q"]


def test_round_fp8_saturates_and_rounds():
    scale = torch.tensor([0.5])
    x = torch.tensor([0.0, 0.26, 224.0, 1000.0, -1000.0])
    y = round_fp8(x, scale)
    assert y[0] == 0 and y[2] == 224.0  # 448 * 0.5 is the largest value held
    assert y[3] == FP8_MAX * 0.5 and y[4] == -FP8_MAX * 0.5
    assert y[1] == torch.tensor(0.52).to(torch.float8_e4m3fn).float() * 0.5


def _cached_amax(model_dir, tokens, tmp_path) -> list[tuple[float, float]]:
    """Per layer, max |k| and |v| that transformers' own KV cache holds for the dequantized model."""
    state = dequantized_state(Checkpoint(model_dir))
    pop_kv_scales(state)
    dense = tmp_path / "dense"
    dense.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, dense / "model.safetensors")
    config = json.loads((model_dir / "config.json").read_text())
    del config["quantization_config"]
    (dense / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    amax = None
    for batch in tokens.split(2):
        cache = DynamicCache(config=model.config)
        model(input_ids=batch, past_key_values=cache, use_cache=True)
        seen = [(layer.keys.abs().max().item(), layer.values.abs().max().item()) for layer in cache.layers]
        amax = seen if amax is None else [(max(a, c), max(b, d)) for (a, b), (c, d) in zip(amax, seen)]
    return amax


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gemma2", "phi3", "mixtral"])
def test_scales_are_the_cached_maxima(tiny, qconvert, tmp_path, arch):
    """k_scale / v_scale = max |k| / 448 and max |v| / 448 of what the quantized model's cache holds
    (keys after k-norm and RoPE), rounded up to the stored dtype."""
    model = tiny(arch)
    out = tmp_path / "out"
    res = qconvert("rtn", model, "-o", out, "--w-bit", "8", "--kv-cache", "fp8", *SMALL)
    assert res.code == 0, res.err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"]["type"] == "float" and qc["kv_cache_scheme"]["strategy"] == "tensor"
    ckpt = Checkpoint(out)
    tokens = calibration_tokens(model, Calibration("mixed", 4, 32))
    for i, (k_amax, v_amax) in enumerate(_cached_amax(out, tokens, tmp_path)):
        scales = ckpt.load([f"model.layers.{i}.self_attn.{s}" for s in SCALES])
        for amax, scale in zip((k_amax, v_amax), scales.values()):
            assert scale.shape == (1,) and scale.dtype == torch.bfloat16
            assert amax / FP8_MAX <= scale.item() <= amax / FP8_MAX * (1 + 2 ** -7) + 1e-9


def test_transformers_loads_kv_scales_and_eval_rounds_the_cache(tiny, qconvert, tmp_path):
    model = tiny("llama")
    plain, with_kv = tmp_path / "plain", tmp_path / "kv"
    assert qconvert("fp8", model, "-o", plain, *SMALL).code == 0
    assert json.loads((plain / "report.json").read_text())["calibration"] is None  # dynamic FP8 needs none
    res = qconvert("fp8", model, "-o", with_kv, "--kv-cache", "fp8", *SMALL)
    assert res.code == 0, res.err
    hf = AutoModelForCausalLM.from_pretrained(with_kv, dtype=torch.bfloat16)
    attn = hf.get_submodule("model.layers.1.self_attn")
    stored = Checkpoint(with_kv).get("model.layers.1.self_attn.k_scale")
    assert torch.equal(attn.k_scale.detach().reshape(-1), stored.reshape(-1))
    assert torch.isfinite(hf(torch.tensor([[1, 2, 3]])).logits).all()
    # the only difference between the two outputs is the KV-cache rounding evaluation simulates
    scores = [qconvert("eval", out, "--base", model, "--samples", "2", "--seq-len", "32", "--json").json()
              for out in (plain, with_kv)]
    assert scores[1]["kl_divergence"] > scores[0]["kl_divergence"] > 0


def test_vllm_fp8_layout_carries_the_scales(tiny, qconvert, tmp_path):
    out = tmp_path / "out"
    res = qconvert("fp8", tiny("llama", head_dim=64), "-o", out, "--scheme", "block", "--format", "fp8", "--kv-cache", "fp8", *SMALL)
    assert res.code == 0, res.err
    names = set(Checkpoint(out).names())
    assert {f"model.layers.{i}.self_attn.{s}" for i in range(2) for s in SCALES} <= names


@pytest.mark.parametrize("args,fragment", [
    (["gptq", "--kv-cache", "fp8"], "--format gptq has no place"),
    (["awq", "--kv-cache", "fp8"], "--format awq has no place"),
    (["rtn", "--kv-cache", "int4"], "choose one of fp8"),
])
def test_kv_cache_refusals(tiny, qconvert, tmp_path, args, fragment):
    out = tmp_path / "out"
    res = qconvert(args[0], tiny("llama"), "-o", out, *args[1:], *SMALL)
    assert res.code != 0 and fragment in res.err
    assert not out.exists()
