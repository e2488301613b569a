"""RTN output of every supported architecture loads in transformers (through the compressed-tensors
package) and gives exactly the logits of our own dequantized reference."""

import compressed_tensors
import pytest
import torch
from packaging.version import Version
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from qconvert.eval.loader import load_model
from qconvert.formats import compressed_tensors as ct
from qconvert.model.checkpoint import Checkpoint
from qconvert.testing.packed_outputs import write_rtn_checkpoint
from qconvert.testing.tiny_models import ARCHITECTURES

CASES = [(arch, "--sym", 4, 128) for arch in ARCHITECTURES] + [
    ("llama", "--asym", 4, 64),
    ("qwen3", "--sym", 8, -1),
    ("gemma3_text", "--asym", 8, 32),
]


@pytest.mark.parametrize("arch,sym,bits,group", CASES)
def test_rtn_output_loads_and_matches_reference(tiny, qconvert, tmp_path, arch, sym, bits, group):
    src = tiny(arch)
    out = tmp_path / "out"
    res = qconvert("rtn", src, "-o", out, "--w-bit", bits, "--group", group, sym, "--quiet")
    assert res.code == 0, res.err
    # transformers 5.23 with compressed-tensors 0.20 expects unpacked zero points on its default
    # (compressed) load path; the packed layout we write is the one compressed-tensors itself writes
    # and vLLM reads, which transformers loads with dequantize=True.
    extra = {} if sym == "--sym" else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, **extra).eval()
    ours, _ = load_model(str(out), torch.bfloat16, torch.device("cpu"))
    base, _ = load_model(str(src), torch.bfloat16, torch.device("cpu"))
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = theirs(ids).logits, ours(ids).logits, base(ids).logits
    assert torch.equal(a, b)
    assert not torch.equal(b, c)  # it is quantized
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    quantized = [k for k in our_state if k.endswith("proj.weight") or k.endswith("gate_up_proj")]
    assert quantized and all(torch.equal(their_state[k], our_state[k]) for k in quantized)


@pytest.mark.parametrize("arch,bits,group", [("mixtral", 4, 128), ("qwen2_moe", 8, 32), ("qwen3_moe", 4, 64)])
def test_asymmetric_moe_experts_decompress_in_compressed_tensors(tiny, qconvert, tmp_path, arch, bits, group):
    """transformers 5.23 cannot dequantize asymmetric MoE experts (its expert converter drops the
    zero points), so each module is checked against compressed-tensors' own decompressor instead."""
    out = tmp_path / "out"
    assert qconvert("rtn", tiny(arch), "-o", out, "--asym", "--w-bit", bits, "--group", group, "-q").code == 0
    ckpt = Checkpoint(out)
    config = ckpt.config_dict["quantization_config"]
    scheme = QuantizationScheme(targets=["Linear"], weights=config["config_groups"]["group_0"]["weights"])
    checked = 0
    for name, qt in ct.read(ckpt):
        if isinstance(qt, torch.Tensor):
            continue
        module = name.removesuffix(".weight")
        state = ckpt.load([f"{module}.{s}" for s in ct.SUFFIXES if f"{module}.{s}" in ckpt])
        theirs = PackedQuantizationCompressor.decompress({k.rsplit(".", 1)[1]: v for k, v in state.items()}, scheme)
        assert torch.equal(theirs["weight"], qt.dequantize()), name
        checked += ".experts." in name
    assert checked >= 2 * 4 * 3  # every expert projection of both layers


@pytest.mark.parametrize("sym", [True, False])
def test_act_order_output_loads_and_matches_reference(tiny, tmp_path, sym):
    """weight_g_idx + actorder "group": compressed-tensors up to 0.18 (the version vLLM 0.28-0.30 pin)
    loads it in transformers with exactly our logits. 0.19 removed act-order "group"; there the load
    must fail loudly on the config rather than drop g_idx and load wrong weights. (transformers'
    dequantize=True path drops weight_g_idx in 5.23, so the default load path is the one checked.)"""
    out = write_rtn_checkpoint(tiny("llama"), tmp_path / "out", "compressed-tensors", 4, 64, sym,
                               act_order_seed=5, scale_dtype=torch.bfloat16)
    if Version(compressed_tensors.__version__) >= Version("0.19"):
        with pytest.raises(Exception, match="actorder='group' has been removed"):
            AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        return
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ours, _ = load_model(str(out), torch.bfloat16, torch.device("cpu"))
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)
