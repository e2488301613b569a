"""write -> read -> dequantize equals QuantizedTensor.dequantize(), and our packing is the layout
compressed-tensors itself produces."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from qconvert.algorithms.rtn import RTNConfig, rtn
from qconvert.formats import compressed_tensors as ct
from qconvert.model.checkpoint import Checkpoint
from qconvert.output import write_config


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
