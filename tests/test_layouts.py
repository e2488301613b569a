"""One quantization pass written in several layouts (`--format a,b`, recipe `format: [a, b]`): each layout
equals what a run of its own writes where the two runs see the same weights."""

import json
import time

from safetensors.torch import load_file

SMALL = ["--samples", "4", "--seq-len", "32", "-q"]
MARLIN_FITS = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "num_key_value_heads": 4}


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _equal(a, b, prefix=""):
    keys = [k for k in a if k.startswith(prefix)]
    return keys and set(keys) == {k for k in b if k.startswith(prefix)} and all(a[k].equal(b[k]) for k in keys)


def test_awq_in_two_layouts(tiny, qconvert, tmp_path, capsys, record_property):
    model = tiny("llama")
    start = time.perf_counter()
    res = qconvert("awq", model, "-o", tmp_path / "both", "--format", "awq,compressed-tensors", *SMALL)
    both = time.perf_counter() - start
    assert res.code == 0, res.err
    start = time.perf_counter()
    for fmt in ("awq", "compressed-tensors"):
        assert qconvert("awq", model, "-o", tmp_path / fmt, "--format", fmt, *SMALL).code == 0
    alone = time.perf_counter() - start
    record_property("one_pass_seconds", round(both, 2))
    record_property("two_runs_seconds", round(alone, 2))
    with capsys.disabled():
        print(f"\nawq in two layouts: {both:.1f} s in one pass, {alone:.1f} s in two runs")
    # AutoAWQ (fp16 scales) is the first layout: its rounding drives the next blocks' inputs, as in its own run
    assert _equal(_tensors(tmp_path / "both" / "awq"), _tensors(tmp_path / "awq"))
    # compressed-tensors (bf16 scales) sees the same first block; later blocks see AutoAWQ's rounding
    ct, ct_alone = _tensors(tmp_path / "both" / "compressed-tensors"), _tensors(tmp_path / "compressed-tensors")
    assert _equal(ct, ct_alone, "model.layers.0.")
    assert set(ct) == set(ct_alone)
    for fmt in ("awq", "compressed-tensors"):
        report = json.loads((tmp_path / "both" / fmt / "report.json").read_text())
        assert report["format"] == fmt and report["output"].endswith(f"both/{fmt}")
        res = qconvert("eval", tmp_path / "both" / fmt, "--base", model, "--samples", "2", "--seq-len", "32", "--json")
        assert res.code == 0 and res.json()["kl_divergence"] < 0.1
    res = qconvert("report", tmp_path / "both")
    assert res.code != 0 and "one output per layout" in res.err


def test_gptq_shares_one_pass_only_where_the_scales_agree(tiny, qconvert, tmp_path):
    model = tiny("llama", **MARLIN_FITS)
    assert qconvert("gptq", model, "-o", tmp_path / "both", "--format", "gptq,marlin", *SMALL).code == 0
    assert qconvert("gptq", model, "-o", tmp_path / "marlin", "--format", "marlin", *SMALL).code == 0
    assert _equal(_tensors(tmp_path / "both" / "marlin"), _tensors(tmp_path / "marlin"))  # both fp16 scales
    res = qconvert("gptq", model, "-o", tmp_path / "no", "--format", "gptq,compressed-tensors", *SMALL)
    assert res.code != 0 and "different dtypes" in res.err and not (tmp_path / "no").exists()
    res = qconvert("gptq", model, "-o", tmp_path / "no", "--format", "gptq,gptq", *SMALL)
    assert res.code != 0 and "named twice" in res.err


def test_recipe_with_two_layouts(tiny, qconvert, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: two\nmethod: awq\nformat: [compressed-tensors, awq]\n"
                      "calibration: {dataset: mixed, samples: 4, seq_len: 32}\ngates: {max_kl: 0.5}\n")
    res = qconvert("run", recipe, tiny("llama"), "-o", tmp_path / "out", "--eval-samples", "2", "--eval-seq-len", "32",
                   "--json", "-q")
    assert res.code == 0, res.err
    result = res.json()
    assert result["verified"] and result["report"].endswith("out/compressed-tensors/report.html")
    assert (tmp_path / "out" / "awq" / "config.json").is_file()
