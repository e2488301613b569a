"""Outputs appear whole or not at all, and the input checkpoint is never modified."""

import hashlib
import json

import torch
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file, save_file

from qconvert.algorithms.rtn import RTNConfig
from qconvert.pipeline import Request, run


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_input_is_untouched_and_output_is_complete(tiny, qconvert, tmp_path):
    src = tiny()
    before = _digest(src)
    out = tmp_path / "nested" / "out"
    res = qconvert("rtn", src, "-o", out, "--dataset", "mixed", "--samples", "4", "--seq-len", "32", "--json")
    assert res.code == 0, res.err
    assert _digest(src) == before
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "report.json",
            "generation_config.json"} <= names
    assert not [p for p in out.parent.iterdir() if p.name != "out"]  # no staging folder left
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and "lm_head" in qc["ignore"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 128
    state = load_file(out / "model.safetensors")
    assert "lm_head.weight" in state and "model.embed_tokens.weight" in state  # not quantized
    assert state["lm_head.weight"].dtype == torch.bfloat16
    assert not any(k.endswith("proj.weight") for k in state)  # every linear packed
    card = (out / "README.md").read_text()
    assert "rtn" in card and "mixed (4 x 32 tokens, seed 0)" in card and "qconvert rtn" in card
    assert (out.stat().st_mode & 0o777) != 0o700  # published with normal permissions


def test_failed_overwrite_keeps_the_previous_output(tiny, qconvert, tmp_path):
    out = tmp_path / "out"
    assert qconvert("rtn", tiny(), "-o", out, "-q").code == 0
    before = _digest(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in tiny().iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    state = load_file(bad / "model.safetensors")
    state["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    res = qconvert("rtn", bad, "-o", out, "--overwrite", "-q")
    assert res.code == 2 and "NaN or Inf" in res.err
    assert _digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out"]


def test_overwrite_replaces(tiny, qconvert, tmp_path):
    out = tmp_path / "out"
    assert qconvert("rtn", tiny(), "-o", out, "-q").code == 0
    assert qconvert("rtn", tiny(), "-o", out, "-q", "--overwrite", "--w-bit", "8").code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 8


def test_sharded_output_with_index(tiny, tmp_path):
    """Large outputs are split into shards with an index that transformers follows."""
    out = tmp_path / "out"
    run(Request(str(tiny(layers=4)), out, "rtn", RTNConfig(), None, max_shard_bytes=64 * 1024))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((out / f).is_file() for f in files)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()
