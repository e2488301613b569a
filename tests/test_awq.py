"""AWQ: folding scales leaves the float block unchanged on every architecture, the search and the
clipping lower the error, and on activations with outlier channels AWQ beats RTN."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from qconvert.algorithms.awq import AWQ, AWQConfig, clip_range, resolve_groups
from qconvert.algorithms.rtn import fake_quantize_groups
from qconvert.engine import input_sets
from qconvert.model.architectures import architecture_for
from qconvert.model.blocks import build_skeleton, capture_block_inputs, decoder_blocks, load_block, run_block
from qconvert.model.checkpoint import Checkpoint
from qconvert.testing.tiny_models import ARCHITECTURES

CPU = torch.device("cpu")


def _first_block(path):
    ckpt = Checkpoint(path)
    arch = architecture_for(ckpt.model_type)
    model = build_skeleton(ckpt, arch, torch.float32)
    tokens = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, ckpt, arch, tokens, 2, CPU, torch.float32)
    block = decoder_blocks(model, arch)[0]
    load_block(block, ckpt, arch, 0, CPU, torch.float32)
    return arch, block, inputs


@pytest.mark.parametrize("arch_name", ARCHITECTURES)
def test_fold_preserves_the_float_block(tiny, arch_name):
    arch, block, inputs = _first_block(tiny(arch_name))
    with torch.no_grad():  # non-trivial norms, so Gemma's (1 + w) form matters
        for name, p in block.named_parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    before = run_block(block, 0, inputs)
    awq = AWQ(AWQConfig(), arch)
    groups = resolve_groups(block, arch.scale_groups, input_sets(arch.linear_groups(block)))
    assert groups and {type(g.prev).__name__ for g in groups}  # every architecture has scale groups
    gen = torch.Generator().manual_seed(1)
    changed = set()
    for g in groups:
        g.scale = torch.rand(g.linears[0].in_features, generator=gen) * 4 + 0.25
        changed |= awq._fold(block, g)
    after = run_block(block, 0, inputs)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(n.endswith("layernorm.weight") for n in changed)
    if arch_name in ("mixtral", "qwen2_moe", "qwen3_moe"):
        assert "mlp.gate.weight" in changed  # the router reads the scaled input too


def test_clipping_lowers_group_output_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.05
    w[:, ::37] *= 8  # outlier weights stretch their groups' ranges
    x = torch.randn(512, 256, generator=g)
    cfg = AWQConfig(group_size=128)
    clipped = clip_range(w, x, cfg)
    assert (clipped.abs() <= w.abs() + 1e-7).all() and not torch.equal(clipped, w)

    def err(v):
        q = fake_quantize_groups(v.reshape(64, 2, 128), 4, False).reshape(64, 256)
        return float((x @ (q - w).T).pow(2).sum())

    assert err(clipped) < err(w)


def _with_outlier_channels(src, dst):
    """The same tiny model whose norms make a few activation channels 30x louder (as real LLMs have)."""
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for name, t in tensors.items():
        if name.endswith("layernorm.weight"):
            t[:4] *= 30
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_awq_beats_rtn_with_outlier_channels(tiny, qconvert, tmp_path):
    model = _with_outlier_channels(tiny("llama", layers=2), tmp_path / "loud")
    common = ["--group", "64", "--format", "compressed-tensors", "--samples", "16", "--seq-len", "64"]
    assert qconvert("awq", model, "-o", tmp_path / "awq", *common, "-q").code == 0
    assert qconvert("rtn", model, "-o", tmp_path / "rtn", "--group", "64", "--asym", "-q").code == 0
    kl = {}
    for name in ("awq", "rtn"):
        res = qconvert("eval", tmp_path / name, "--base", model, "--samples", "8", "--seq-len", "64", "--json")
        assert res.code == 0, res.err
        kl[name] = res.json()["kl_divergence"]
    assert kl["awq"] < 0.8 * kl["rtn"], kl


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_runs(tiny, qconvert, tmp_path, arch):
    out = tmp_path / "out"
    res = qconvert("awq", tiny(arch), "-o", out, "--format", "compressed-tensors", "--group", "64",
                   "--samples", "4", "--seq-len", "32", "--json")
    assert res.code == 0, res.err
    assert all(layer["output_error"] < 0.1 for layer in res.json()["layers"])
