"""The layer-by-layer engine computes what the whole transformers model computes, one block at a time."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from qconvert.model.architectures import architecture_for
from qconvert.model.blocks import (
    BlockInputs,
    build_skeleton,
    capture_block_inputs,
    decoder_blocks,
    load_block,
    run_block,
    unload_block,
)
from qconvert.model.checkpoint import Checkpoint
from qconvert.model.moe import UnfusedExperts
from qconvert.testing.tiny_models import ARCHITECTURES

# sliding windows shorter than the sequence, so per-layer masks differ (Gemma 2/3, Mistral, Qwen)
SLIDING = {"gemma2": dict(sliding_window=8), "gemma3_text": dict(sliding_window=8),
           "mistral": dict(sliding_window=8)}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_by_block_equals_full_model(tiny, arch):
    path = tiny(arch, layers=3, **SLIDING.get(arch, {}))
    ckpt = Checkpoint(path)
    adapter = architecture_for(ckpt.model_type)
    tokens = torch.randint(3, 512, (3, 20), generator=torch.Generator().manual_seed(1))
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation=adapter.attn_implementation).eval()
    with torch.no_grad():
        expected = full(tokens, output_hidden_states=True).hidden_states
    model = build_skeleton(ckpt, adapter, torch.float32)
    inputs = capture_block_inputs(model, ckpt, adapter, tokens, 2, torch.device("cpu"), torch.float32)
    assert torch.allclose(torch.cat(inputs.hidden), expected[0], atol=1e-6)
    blocks = decoder_blocks(model, adapter)
    for i, block in enumerate(blocks):
        load_block(block, ckpt, adapter, i, torch.device("cpu"), torch.float32)
        inputs.hidden = run_block(block, i, inputs)
        unload_block(block)
        if i < len(blocks) - 1:  # the last hidden state has the final norm applied
            torch.testing.assert_close(torch.cat(inputs.hidden), expected[i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_unfused_experts_match_fused(tiny, arch):
    path = tiny(arch)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    moe_block = full.model.layers[0].mlp
    fused = moe_block.experts
    unfused = UnfusedExperts(fused, architecture_for(arch).moe)
    gate, up, down = architecture_for(arch).moe.proj
    inter = fused.gate_up_proj.shape[1] // 2
    for e in range(unfused.num_experts):
        expert = getattr(unfused, str(e))
        getattr(expert, gate).weight = torch.nn.Parameter(fused.gate_up_proj[e, :inter].clone())
        getattr(expert, up).weight = torch.nn.Parameter(fused.gate_up_proj[e, inter:].clone())
        getattr(expert, down).weight = torch.nn.Parameter(fused.down_proj[e].clone())
    x = torch.randn(10, fused.gate_up_proj.shape[2])
    _, weights, index = moe_block.gate(x)
    with torch.no_grad():
        torch.testing.assert_close(unfused(x, index, weights), fused(x, index, weights))


def test_experts_without_calibration_tokens_are_reported(tiny, qconvert, tmp_path):
    """Two calibration tokens reach at most a few of 8 experts; the rest must be named, not hidden."""
    path = tiny("qwen3_moe", num_experts=8, num_experts_per_tok=1)
    out = tmp_path / "out"
    res = qconvert("rtn", path, "-o", out, "--dataset", "mixed", "--samples", "1", "--seq-len", "2", "--json")
    assert res.code == 0, res.err
    layers = res.json()["layers"]
    missing = [n for layer in layers for n in layer["uncalibrated"]]
    assert len(missing) >= 3 * 5 and all(".experts." in n for n in missing)
    seen = [lr for layer in layers for n, lr in layer["linears"].items() if n not in layer["uncalibrated"]]
    assert all(lr["tokens"] > 0 for lr in seen)


def test_a_pass_ends_after_the_mini_batch_that_was_enough():
    """AWQ's pass after its rewrite only fills 1024-token input samples: it stops once they are full."""
    seen = []

    class Block(torch.nn.Module):
        def forward(self, hidden):
            seen.append(hidden)
            return (hidden * 2,)

    inputs = BlockInputs(hidden=[torch.full((2, 3, 4), float(i)) for i in range(5)], call_args=[{2: ((), {})}])
    out = run_block(Block(), 0, inputs, enough=lambda: len(seen) >= 2)
    assert len(seen) == 2 and [float(o[0, 0, 0]) for o in out] == [0.0, 2.0]
    assert len(run_block(Block(), 0, inputs)) == 5  # without it, every mini-batch
