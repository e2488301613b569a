"""write -> read -> dequantize equals QuantizedTensor.dequantize(), and our packing is the layout
compressed-tensors itself produces."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from qconvert.algorithms.rtn import RTNConfig, rtn
from qconvert.formats import compressed_tensors as ct
from qconvert.model.checkpoint import Checkpoint
from qconvert.output import write_config
from qconvert.quantized import QuantizedTensor
from qconvert.testing.packed_outputs import act_order_g_idx, rtn_any_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (7, 101), dtype=torch.uint8)
    packed = ct.pack_bits(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, -(-101 * bits // 32))
    assert torch.equal(ct.unpack_bits(packed, bits, 101), codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_matches_compressed_tensors(bits):
    """Guards against a nibble-order or offset mistake that our own unpacker would mirror."""
    codes = torch.randint(0, 1 << bits, (16, 256), dtype=torch.uint8)
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(ct.pack_bits(codes, bits), pack_to_int32(signed, bits))
    zp = codes[:, :4]
    ours = ct.pack_bits(zp.T.contiguous(), bits).T
    theirs = pack_to_int32((zp.to(torch.int16) - (1 << (bits - 1))).to(torch.int8), bits, packed_dim=0)
    assert torch.equal(ours, theirs)
    back = unpack_from_int32(ours.contiguous(), bits, zp.shape, packed_dim=0)
    assert torch.equal(back.to(torch.int16) + (1 << (bits - 1)), zp.to(torch.int16))


@pytest.mark.parametrize("bits,group,sym", [(4, 128, True), (4, 32, False), (8, -1, True), (8, 64, False)])
def test_writer_reader_roundtrip(tmp_path, bits, group, sym):
    w = torch.randn(96, 256, dtype=torch.bfloat16)
    qt = rtn(w, RTNConfig(bits, group, sym), scale_dtype=torch.bfloat16)
    writer = ct.Writer(tmp_path)
    writer.add_quantized("model.layers.0.mlp.up_proj.weight", qt)
    writer.add_tensor("model.norm.weight", torch.ones(4))
    write_config({"model_type": "llama"}, tmp_path, writer.finish(["lm_head"]))
    read = dict(ct.read(Checkpoint(tmp_path)))
    back = read["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.scale, qt.scale)
    assert (back.zero is None) == sym and (sym or torch.equal(back.zero, qt.zero))
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert torch.equal(read["model.norm.weight"], torch.ones(4))


@pytest.mark.parametrize("sym", [True, False])
def test_act_order_roundtrip(tmp_path, sym):
    """An act-order g_idx is written as weight_g_idx with actorder "group" and comes back from the reader."""
    g_idx = act_order_g_idx(256, 64, seed=0)
    qt = rtn_any_bits(torch.randn(96, 256, dtype=torch.bfloat16), 4, 64, sym, torch.bfloat16, g_idx)
    writer = ct.Writer(tmp_path)
    writer.add_quantized("model.layers.0.mlp.up_proj.weight", qt)
    writer.add_quantized("model.layers.0.mlp.down_proj.weight", rtn(torch.randn(96, 256), RTNConfig(4, 64, sym),
                                                                     scale_dtype=torch.bfloat16))
    config = writer.finish(["lm_head"])
    write_config({"model_type": "llama"}, tmp_path, config)
    actorders = {tuple(g["targets"]): g["weights"]["actorder"] for g in config["config_groups"].values()}
    assert actorders == {("model.layers.0.mlp.down_proj",): None, ("model.layers.0.mlp.up_proj",): "group"}
    assert torch.equal(Checkpoint(tmp_path).get("model.layers.0.mlp.up_proj.weight_g_idx"), g_idx)
    read = dict(ct.read(Checkpoint(tmp_path)))
    back = read["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(back.g_idx, g_idx) and torch.equal(back.codes, qt.codes)
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert read["model.layers.0.mlp.down_proj.weight"].g_idx is None


def test_act_order_needs_full_groups(tmp_path):
    """compressed-tensors sorts the columns by g_idx and cuts runs of group_size: uneven groups would shift."""
    qt = rtn(torch.randn(8, 128), RTNConfig(4, 64, True), scale_dtype=torch.bfloat16)
    uneven = torch.zeros(128, dtype=torch.int32)
    uneven[:10] = 1
    with pytest.raises(ValueError, match="exactly group_size columns"):
        ct.Writer(tmp_path).add_quantized("x.weight", QuantizedTensor(qt.codes, qt.scale, None, 4, 64, uneven))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_in_slabs_of_rows_gives_the_same_words(bits):
    """A large linear is packed and unpacked a slab of rows at a time (bounded temporaries): the same words
    and codes."""
    codes = torch.randint(0, 1 << bits, (300, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = ct.pack_bits(codes, bits, chunk=96 * 7)
    assert torch.equal(packed, ct.pack_bits(codes, bits, chunk=1 << 30))
    assert torch.equal(ct.unpack_bits(packed, bits, 96, chunk=96 * 5), codes)
