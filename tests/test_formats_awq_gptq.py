"""AWQ GEMM and GPTQ v1: write -> read gives back exactly what was written, and the bits on disk are the
layouts the consumers read (checked against words built by hand, not against our own unpacker)."""

import json

import pytest
import torch

from qconvert.algorithms.rtn import RTNConfig, rtn
from qconvert.eval.loader import dequantized_state
from qconvert.formats import awq, gptq
from qconvert.inspect import describe
from qconvert.model.checkpoint import Checkpoint
from qconvert.output import write_config
from qconvert.quantized import QuantizedTensor
from qconvert.testing.packed_outputs import act_order_g_idx, rtn_any_bits, write_rtn_checkpoint

NAME = "model.layers.0.mlp.up_proj.weight"


def as_int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


def write_awq(path, qt, group_size, zero_point=True, **tensors):
    path.mkdir(parents=True, exist_ok=True)
    writer = awq.Writer(path, group_size, zero_point=zero_point)
    writer.add_quantized(NAME, qt)
    for name, t in tensors.items():
        writer.add_tensor(name, t)
    write_config({"model_type": "llama"}, path, writer.finish(["lm_head"]))
    return dict(awq.read(Checkpoint(path)))


def write_gptq(path, qt, sym, desc_act=False):
    path.mkdir(parents=True, exist_ok=True)
    writer = gptq.Writer(path, qt.bits, qt.group_size, sym, desc_act=desc_act)
    writer.add_quantized(NAME, qt)
    write_config({"model_type": "llama"}, path, writer.finish())
    return dict(gptq.read(Checkpoint(path)))


def assert_same(back: QuantizedTensor, qt: QuantizedTensor):
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.scale, qt.scale)
    assert (back.zero is None) == (qt.zero is None) and (qt.zero is None or torch.equal(back.zero, qt.zero))
    assert (back.g_idx is None) == (qt.g_idx is None) and (qt.g_idx is None or torch.equal(back.g_idx, qt.g_idx))
    assert (back.bits, back.group_size) == (qt.bits, qt.group_size)
    assert torch.equal(back.dequantize(), qt.dequantize())


# -- bits on disk -------------------------------------------------------------------------------

def test_awq_pack_unpack_roundtrip():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = awq.pack_awq(codes)
    assert packed.dtype == torch.int32 and packed.shape == (5, 8)
    assert torch.equal(awq.unpack_awq(packed), codes)


def test_awq_interleave_matches_hand_built_word():
    """Nibble i holds column [0,2,4,6,1,3,5,7][i]: columns 0..7 = 1..8 give nibbles (low to high)
    1,3,5,7,2,4,6,8. A plain (non-interleaved) packing would give 0x87654321."""
    codes = torch.arange(1, 17, dtype=torch.uint8).remainder(16).reshape(1, 16)  # 1..15, 0
    words = awq.pack_awq(codes)
    assert words[0, 0].item() == as_int32(0x86427531)
    assert words[0, 1].item() == 0x0ECAFDB9  # columns 8..15 = 9..15, 0: nibbles 9,B,D,F,A,C,E,0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (64, 24), dtype=torch.uint8)  # [in, out]
    packed = gptq.pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 24)
    assert torch.equal(gptq.unpack_rows(packed, bits, 64), codes)


def test_gptq_4bit_word_is_input_rows_low_nibble_first():
    codes = torch.arange(1, 9, dtype=torch.uint8).reshape(8, 1)  # input rows 0..7 of one output column
    assert gptq.pack_rows(codes, 4)[0, 0].item() == as_int32(0x87654321)


def test_gptq_3bit_values_straddle_words_as_in_gptq():
    """32 3-bit values fill 3 words: value 10 takes bits 30-31 of word 0 and bit 0 of word 1, value 21
    bit 31 of word 1 and bits 0-1 of word 2 (GPTQ QuantLinear.pack, wbits == 3)."""
    for index, expected in ((10, (0xC0000000, 0x1, 0x0)), (21, (0x0, 0x80000000, 0x3)), (31, (0, 0, 0xE0000000))):
        codes = torch.zeros(32, 1, dtype=torch.uint8)
        codes[index] = 7
        assert gptq.pack_rows(codes, 3)[:, 0].tolist() == [as_int32(w) for w in expected]


# -- writer -> reader ---------------------------------------------------------------------------

@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
def test_awq_roundtrip(tmp_path, group, sym):
    qt = rtn(torch.randn(96, 256), RTNConfig(4, group, sym), scale_dtype=torch.float16)
    norm = torch.ones(4, dtype=torch.bfloat16)
    read = write_awq(tmp_path, qt, group, zero_point=not sym, **{"model.norm.weight": norm})
    assert_same(read[NAME], qt)
    assert read["model.norm.weight"].dtype == torch.float16  # AWQ kernels compute in fp16


def test_awq_symmetric_tensor_in_zero_point_checkpoint_stores_8(tmp_path):
    qt = rtn(torch.randn(16, 128), RTNConfig(4, 128, True), scale_dtype=torch.float16)
    back = write_awq(tmp_path, qt, 128, zero_point=True)[NAME]
    assert (back.zero == 8).all() and torch.equal(back.dequantize(), qt.dequantize())
    assert (Checkpoint(tmp_path).get(NAME.replace("weight", "qzeros")) == as_int32(0x88888888)).all()


def test_bf16_scales_are_stored_as_fp16(tmp_path):
    """The reader hands back the fp16 scale that is on disk, so dequantize() of the read-back tensor
    uses it, not the bf16 original."""
    qt = rtn(torch.randn(32, 128), RTNConfig(4, 64, False), scale_dtype=torch.bfloat16)
    back = write_awq(tmp_path, qt, 64)[NAME]
    assert back.scale.dtype == torch.float16 and torch.equal(back.scale, qt.scale.half())
    expected = QuantizedTensor(qt.codes, qt.scale.half(), qt.zero, 4, 64)
    assert torch.equal(back.dequantize(), expected.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [64, -1])
def test_gptq_roundtrip(tmp_path, bits, sym, group):
    qt = rtn_any_bits(torch.randn(64, 256), bits, group, sym, torch.float16)
    if not sym:  # v1 cannot store a zero point of 0 (see test_gptq_refuses_zero_point_0)
        qt = QuantizedTensor(qt.codes, qt.scale, qt.zero.clamp(min=1), bits, group)
    assert_same(write_gptq(tmp_path, qt, sym)[NAME], qt)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_act_order_roundtrip(tmp_path, sym):
    g_idx = act_order_g_idx(256, 64, seed=1)
    qt = rtn_any_bits(torch.randn(64, 256), 4, 64, sym, torch.float16, g_idx)
    back = write_gptq(tmp_path, qt, sym, desc_act=True)[NAME]
    assert_same(back, qt)
    assert torch.equal(Checkpoint(tmp_path).get(NAME.replace("weight", "g_idx")), g_idx)


def test_gptq_reader_drops_the_column_order_g_idx(tmp_path):
    qt = rtn(torch.randn(32, 256), RTNConfig(4, 64, True), scale_dtype=torch.float16)
    back = write_gptq(tmp_path, qt, True)[NAME]
    assert back.g_idx is None
    assert Checkpoint(tmp_path).get(NAME.replace("weight", "g_idx")).tolist() == [c // 64 for c in range(256)]


def test_gptq_v1_stores_zero_minus_one(tmp_path):
    """Symmetric 4-bit has zero 8, stored 7 in every nibble; asymmetric zeros are stored minus one."""
    qt = rtn(torch.randn(32, 256), RTNConfig(4, 64, True), scale_dtype=torch.float16)
    write_gptq(tmp_path / "sym", qt, True)
    assert (Checkpoint(tmp_path / "sym").get(NAME.replace("weight", "qzeros")) == 0x77777777).all()
    zero = torch.randint(1, 16, (32, 4), dtype=torch.uint8)
    qt = QuantizedTensor(qt.codes, qt.scale, zero, 4, 64)
    write_gptq(tmp_path / "asym", qt, False)
    raw = Checkpoint(tmp_path / "asym").get(NAME.replace("weight", "qzeros"))  # [groups, out / 8]
    nibbles = torch.stack([(raw.long() >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(4, 32)
    assert torch.equal(nibbles.T, zero.long() - 1)


def test_configs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "g").mkdir()
    writer = awq.Writer(tmp_path / "a", 128, zero_point=False)
    assert writer.finish(["lm_head", "mlp.gate"]) == {
        "bits": 4, "group_size": 128, "modules_to_not_convert": ["lm_head", "mlp.gate"],
        "quant_method": "awq", "version": "gemm", "zero_point": False}
    writer = gptq.Writer(tmp_path / "g", 4, 128, True, desc_act=True, damp_percent=0.1)
    config = writer.finish()
    assert config == json.loads((tmp_path / "g" / "quantize_config.json").read_text())
    assert config == {"bits": 4, "checkpoint_format": "gptq", "damp_percent": 0.1, "desc_act": True,
                      "group_size": 128, "quant_method": "gptq", "static_groups": False, "sym": True,
                      "true_sequential": True}


# -- refusals -----------------------------------------------------------------------------------

def test_writers_refuse_what_consumers_would_misread(tmp_path):
    w = torch.randn(32, 256)
    asym = rtn(w, RTNConfig(4, 64, False), scale_dtype=torch.float16)
    sym = rtn(w, RTNConfig(4, 64, True), scale_dtype=torch.float16)
    act = QuantizedTensor(sym.codes, sym.scale, None, 4, 64, act_order_g_idx(256, 64, seed=0))
    with pytest.raises(ValueError, match="group size -1"):
        awq.Writer(tmp_path / "a1", -1)
    with pytest.raises(ValueError, match="act-order"):
        awq.Writer(tmp_path / "a2", 64).add_quantized(NAME, act)
    with pytest.raises(ValueError, match="asymmetric"):
        awq.Writer(tmp_path / "a3", 64, zero_point=False).add_quantized(NAME, asym)
    with pytest.raises(ValueError, match="desc_act=False"):
        gptq.Writer(tmp_path / "g1", 4, 64, True).add_quantized(NAME, act)
    with pytest.raises(ValueError, match="asymmetric"):
        gptq.Writer(tmp_path / "g2", 4, 64, True).add_quantized(NAME, asym)
    with pytest.raises(ValueError, match="differs"):
        gptq.Writer(tmp_path / "g3", 4, 128, True).add_quantized(NAME, sym)
    lopsided = torch.zeros(256, dtype=torch.int32).index_fill(0, torch.arange(4), 3)  # 252 columns in group 0
    uneven = QuantizedTensor(sym.codes, sym.scale, None, 4, 64, lopsided)
    with pytest.raises(ValueError, match="exactly 64 columns"):
        gptq.Writer(tmp_path / "g4", 4, 64, True, desc_act=True).add_quantized(NAME, uneven)


def test_gptq_refuses_zero_point_0(tmp_path):
    """0 - 1 wraps to 15, which v1 kernels read back as zero point 16."""
    qt = rtn(torch.randn(32, 256), RTNConfig(4, 64, True), scale_dtype=torch.float16)
    zero = torch.full((32, 4), 5, dtype=torch.uint8)
    zero[3, 2] = 0
    with pytest.raises(ValueError, match="zero point of 0"):
        gptq.Writer(tmp_path, 4, 64, False).add_quantized(NAME, QuantizedTensor(qt.codes, qt.scale, zero, 4, 64))


def test_fp16_cast_refuses_overflow(tmp_path):
    writer = awq.Writer(tmp_path, 64)
    with pytest.raises(ValueError, match="range of torch.float16"):
        writer.add_tensor("model.embed_tokens.weight", torch.tensor([1e6], dtype=torch.bfloat16))


def test_test_helper_rtn_any_bits_is_rtn():
    w = torch.randn(32, 256, dtype=torch.bfloat16)
    for bits, group, sym in ((4, 64, True), (8, -1, False)):
        a = rtn_any_bits(w, bits, group, sym, torch.float16)
        b = rtn(w, RTNConfig(bits, group, sym), scale_dtype=torch.float16)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


# -- the rest of qconvert reads them ------------------------------------------------------------

@pytest.mark.parametrize("fmt,bits,sym,seed", [("awq", 4, False, None), ("gptq", 4, True, 3), ("gptq", 3, True, None)])
def test_loader_and_inspect_read_awq_and_gptq(tiny, tmp_path, fmt, bits, sym, seed):
    src = tiny("qwen2")
    out = write_rtn_checkpoint(src, tmp_path / "out", fmt, bits, 64, sym, act_order_seed=seed)
    ckpt = Checkpoint(out)
    state = dequantized_state(ckpt)
    assert state["model.layers.1.self_attn.q_proj.weight"].shape == (128, 128)
    assert state["model.layers.1.self_attn.q_proj.bias"].dtype == torch.float16  # qwen2 biases ride along
    info = describe(out)
    assert info["parameters"] == describe(src)["parameters"]  # logical weights, not packed words
    q = info["quantization"]
    assert q["quant_method"] == fmt and q["bits"] == bits and q["group_size"] == 64
    assert len(q["modules"]) == 14 and all(s.startswith(f"int{bits} g64") for s in q["modules"].values())
    assert all(s.endswith("act-order") == (seed is not None) for s in q["modules"].values())
