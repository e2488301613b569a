"""The gptq and awq commands end to end in their own layouts: written, read back by our readers, and
format/setting combinations that a layout cannot hold refused before any work."""

import json

import pytest
import torch

from qconvert.formats import awq, gptq
from qconvert.model.checkpoint import Checkpoint
from qconvert.quantized import QuantizedTensor

SMALL = ["--samples", "4", "--seq-len", "32", "-q"]


@pytest.mark.parametrize("method,fmt,reader,flags", [
    ("gptq", "gptq", gptq.read, []),
    ("gptq", "gptq", gptq.read, ["--asym", "--dynamic-groups"]),  # zero points >= 1 and a real g_idx
    ("awq", "awq", awq.read, []),
    ("awq", "awq", awq.read, ["--no-zero-point"]),
])
def test_native_layouts_round_trip(tiny, qconvert, tmp_path, method, fmt, reader, flags):
    out = tmp_path / "out"
    res = qconvert(method, tiny("llama"), "-o", out, "--group", "64", *flags, *SMALL)
    assert res.code == 0, res.err
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == fmt
    tensors = dict(reader(Checkpoint(out)))
    quantized = [t for t in tensors.values() if isinstance(t, QuantizedTensor)]
    assert len(quantized) == 2 * 7 and all(t.scale.dtype == torch.float16 for t in quantized)
    if "--dynamic-groups" in flags:
        assert any(t.g_idx is not None for t in quantized) and config["desc_act"] is True
    res = qconvert("eval", out, "--base", tiny("llama"), "--samples", "2", "--seq-len", "32", "--json")
    assert res.code == 0 and res.json()["kl_divergence"] < 0.1


@pytest.mark.parametrize("args,fragment", [
    (["awq", "--format", "gptq"], "awq writes awq or compressed-tensors"),
    (["awq", "--group", "-1"], "--format awq stores 4-bit codes"),
    (["gptq", "--w-bit", "3", "--format", "compressed-tensors"], "takes 4 or 8 bits"),
    (["rtn", "--w-bit", "3"], "--w-bit 3 is not supported"),
])
def test_formats_refuse_what_they_cannot_hold(tiny, qconvert, tmp_path, args, fragment):
    out = tmp_path / "out"
    res = qconvert(args[0], tiny("llama"), "-o", out, *args[1:], *SMALL)
    assert res.code == 2 and fragment in res.err, res.err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
