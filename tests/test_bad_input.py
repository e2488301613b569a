"""Bad input: one clear line on stderr, exit code 2, and nothing left at (or beside) the output path."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file


def _assert_refused(res, out, *fragments):
    assert res.code == 2
    lines = [line for line in res.err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.err  # progress lines may precede it
    for fragment in fragments:
        assert fragment in " ".join(res.err.split()), res.err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_path(qconvert, tmp_path):
    out = tmp_path / "out"
    _assert_refused(qconvert("rtn", tmp_path / "nope", "-o", out), out, "no such directory")


def test_not_a_checkpoint(qconvert, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    _assert_refused(qconvert("rtn", tmp_path / "empty", "-o", out), out, "not a checkpoint", "config.json")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _assert_refused(qconvert("rtn", tmp_path / "empty", "-o", out), out, "not a checkpoint", "weights")


def test_truncated_safetensors(tiny, qconvert, tmp_path):
    src = _copy(tiny(), tmp_path / "src")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    out = tmp_path / "out"
    _assert_refused(qconvert("rtn", src, "-o", out), out, "corrupt or truncated")


def test_unsupported_architecture(qconvert, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "out"
    _assert_refused(qconvert("rtn", tmp_path / "gpt2", "-o", out), out, "unsupported architecture 'gpt2'", "llama")


def test_nan_weights(tiny, qconvert, tmp_path):
    src = _copy(tiny(layers=3), tmp_path / "src")
    state = load_file(src / "model.safetensors")
    state["model.layers.2.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    _assert_refused(qconvert("rtn", src, "-o", out), out, "model.layers.2.mlp.up_proj.weight", "NaN or Inf")


def test_output_exists(tiny, qconvert, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = qconvert("rtn", tiny(), "-o", out)
    assert res.code == 2 and "already exists" in res.err and "--overwrite" in res.err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("flags,fragment", [
    (["--w-bit", "3"], "--w-bit 3 is not supported"),
    (["--w-bit", "16"], "--w-bit 16 is not supported"),
    (["--group", "100"], "--group 100 is not supported"),
    (["--group", "0"], "--group 0 is not supported"),
])
def test_invalid_bits_or_group(tiny, qconvert, tmp_path, flags, fragment):
    out = tmp_path / "out"
    _assert_refused(qconvert("rtn", tiny(), "-o", out, *flags), out, fragment)


def test_group_that_does_not_divide_a_layer(tiny, qconvert, tmp_path):
    """compressed-tensors refuses ragged groups, so we refuse before writing, naming the layer."""
    src = tiny(hidden_size=192, intermediate_size=384, num_attention_heads=6, num_key_value_heads=2)
    out = tmp_path / "out"
    _assert_refused(qconvert("rtn", src, "-o", out, "--group", "128"), out,
                    "model.layers.0.", "input size 192 is not a multiple of group size 128", "32, 64")
    assert qconvert("rtn", src, "-o", out, "--group", "64", "-q").code == 0


def test_output_inside_input_is_refused(tiny, qconvert, tmp_path):
    src = _copy(tiny(), tmp_path / "src")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = src / "quantized"
    _assert_refused(qconvert("rtn", src, "-o", out), out, "must not be inside")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_unknown_device_and_dataset(tiny, qconvert, tmp_path):
    out = tmp_path / "out"
    _assert_refused(qconvert("rtn", tiny(), "-o", out, "--device", "tpu"), out, "--device tpu")
    _assert_refused(qconvert("rtn", tiny(), "-o", out, "--dataset", "nosuchset"), out, "unknown dataset 'nosuchset'")


def test_calibration_ids_outside_the_vocabulary(tiny, qconvert, tmp_path):
    ids = tmp_path / "ids.pt"
    torch.save(torch.full((4, 32), 10**6), ids)
    out = tmp_path / "out"
    _assert_refused(qconvert("gptq", tiny(), "-o", out, "--dataset", ids, "--samples", "4", "--seq-len", "32"), out,
                    "calibration token id 1000000 is outside the model's vocabulary")


def test_gguf_bad_requests(tiny, qconvert, tmp_path):
    out = tmp_path / "out.gguf"
    _assert_refused(qconvert("gguf", tiny(), "Q4_Z", "-o", out), out, "unknown GGUF type 'Q4_Z'", "Q4_K_M")
    _assert_refused(qconvert("gguf", tiny(), "F16", "-o", out, "--imatrix"), out, "only applies to quantized types")
    # the tiny byte-level BPE tokenizer's pre-tokenizer is unknown to llama.cpp: refused like llama.cpp does
    _assert_refused(qconvert("gguf", tiny(), "Q8_0", "-o", out), out, "pre-tokenizer", "probe hash")
    _assert_refused(qconvert("gguf", tiny(), "Q8_0", "-o", out, "--imatrix-file", tmp_path / "none.dat"), out,
                    "no such imatrix file")
