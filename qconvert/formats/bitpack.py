"""Dense little-endian bit packing of unsigned codes into int32 words, shared by the integer formats.

Element i of a row sits at bits [i*bits, (i+1)*bits) of the row's bit string, word j holding bits
[32j, 32j+32). For bits that divide 32 this is "element i of a word at bits i*bits"; for 3 bits a value
may straddle two words, which is both compressed-tensors' pack_to_int32 layout and GPTQ's 3-bit layout
(32 values in 3 words, value 10 split over words 0 and 1, value 21 over words 1 and 2).
"""

from __future__ import annotations

import torch


def pack_bits(codes: torch.Tensor, bits: int, chunk: int = 1 << 24) -> torch.Tensor:
    """uint8 codes [rows, cols] -> int32 [rows, ceil(cols*bits/32)], element i at bit i*bits.
    Runs on the codes' device (the GPU packs a layer's weights in milliseconds), `chunk` codes at a time:
    the widened temporaries of a whole 28672-row linear would be gigabytes."""
    step = max(1, chunk // max(codes.shape[1], 1))
    if codes.shape[0] > step:
        return torch.cat([_pack(codes[r:r + step], bits) for r in range(0, codes.shape[0], step)])
    return _pack(codes, bits)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = codes.shape
    words = -(-cols * bits // 32)
    if 32 % bits == 0:  # whole values per word: OR the shifted columns of each word together
        per = 32 // bits
        v = torch.nn.functional.pad(codes.to(torch.int32), (0, words * per - cols)).view(rows, words, per)
        acc = v[:, :, 0].clone()
        for i in range(1, per):
            acc |= v[:, :, i] << (i * bits)  # the top value's shift reaches the sign bit: two's complement
        return acc
    pos = torch.arange(cols, dtype=torch.int64, device=codes.device) * bits
    word, off = pos // 32, pos % 32
    v = codes.to(torch.int64)
    acc = torch.zeros(rows, words + 1, dtype=torch.int64, device=codes.device)
    acc.scatter_add_(1, word.expand(rows, -1), (v << off) & 0xFFFFFFFF)
    spill = off + bits > 32  # the high bits of a value that straddles two words
    if spill.any():
        acc.scatter_add_(1, (word[spill] + 1).expand(rows, -1), v[:, spill] >> (32 - off[spill]))
    acc = acc[:, :words]
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)


def unpack_bits(packed: torch.Tensor, bits: int, cols: int, chunk: int = 1 << 24) -> torch.Tensor:
    """Inverse of pack_bits: int32 [rows, words] -> uint8 [rows, cols], `chunk` codes at a time."""
    step = max(1, chunk // max(cols, 1))
    if packed.shape[0] > step:
        return torch.cat([_unpack(packed[r:r + step], bits, cols) for r in range(0, packed.shape[0], step)])
    return _unpack(packed, bits, cols)


def _unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=torch.int64, device=w.device)], dim=1)
    pos = torch.arange(cols, dtype=torch.int64, device=w.device) * bits
    word, off = pos // 32, pos % 32
    v = (w[:, word] >> off) | (w[:, word + 1] << (32 - off))
    return (v & ((1 << bits) - 1)).to(torch.uint8)
