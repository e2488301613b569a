"""eval scores what is on disk; inspect describes a checkpoint from its headers."""

from safetensors.torch import load_file, save_file


def test_eval_of_base_against_itself(tiny, qconvert):
    res = qconvert("eval", tiny(), "--base", tiny(), "--samples", "3", "--seq-len", "64", "--json")
    assert res.code == 0, res.err
    r = res.json()
    assert r["kl_divergence"] < 1e-6 and r["top1_agreement"] == 1.0
    assert abs(r["perplexity"] - r["base_perplexity"]) < 1e-3 and r["tokens"] == 3 * 63


def test_eval_reads_the_written_files(tiny, qconvert, tmp_path):
    out = tmp_path / "out"
    assert qconvert("rtn", tiny(), "-o", out, "-q").code == 0
    args = ("eval", out, "--base", tiny(), "--samples", "3", "--seq-len", "64", "--json")
    first = qconvert(*args).json()
    assert first["kl_divergence"] > 1e-5 and first["perplexity"] != first["base_perplexity"]
    state = load_file(out / "model.safetensors")  # damage the file: the score must move
    state["model.layers.0.mlp.down_proj.weight_scale"] *= 4
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    second = qconvert(*args).json()
    assert second["kl_divergence"] > 2 * first["kl_divergence"]


def test_eval_knows_a_gguf_output_by_its_contents_not_its_name(qconvert, tmp_path):
    from qconvert.testing.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "hf", "llama", 2, tokenizer="sentencepiece", hidden_size=256,
                            intermediate_size=512, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "quantized"  # `-o` without the .gguf suffix
    assert qconvert("gguf", model, "Q8_0", "-o", out, "-q").code == 0
    res = qconvert("eval", out, "--base", model, "--samples", "3", "--seq-len", "64", "--json")
    assert res.code == 0, res.err
    assert 0 < res.json()["kl_divergence"] < 0.05


def test_inspect_base_and_quantized(tiny, qconvert, tmp_path):
    base = qconvert("inspect", tiny(), "--json").json()
    assert base["model_type"] == "llama" and base["quantization"] is None
    assert base["config"]["num_hidden_layers"] == 2 and base["tensor_dtypes"] == {"BF16": 21}
    out = tmp_path / "out"
    assert qconvert("rtn", tiny(), "-o", out, "-q", "--asym", "--group", "64").code == 0
    q = qconvert("inspect", out, "--json").json()
    assert q["parameters"] == base["parameters"]  # logical weights, not packed words
    assert q["size_bytes"] < base["size_bytes"]
    assert q["quantization"]["format"] == "pack-quantized"
    assert len(q["quantization"]["modules"]) == 14
    assert {r["scheme"] for r in q["quantization"]["by_type"]} == {"int4 g64 asym"}
    text = qconvert("inspect", out)
    assert text.code == 0 and "model.layers.*.self_attn.q_proj" in text.out


def test_inspect_moe_groups_experts(tiny, qconvert, tmp_path):
    out = tmp_path / "out"
    assert qconvert("rtn", tiny("mixtral"), "-o", out, "-q").code == 0
    rows = qconvert("inspect", out, "--json").json()["quantization"]["by_type"]
    experts = [r for r in rows if "experts" in r["modules"]]
    assert {r["modules"] for r in experts} == {f"model.layers.*.block_sparse_moe.experts.*.{w}" for w in ("w1", "w2", "w3")}
    assert all(r["count"] == 2 * 4 for r in experts)
