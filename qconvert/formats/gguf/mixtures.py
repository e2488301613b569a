"""Which GGML type each tensor of a GGUF file gets for a llama.cpp file type ("Q4_K_M", ...).

Follows llama.cpp's `llama-quant.cpp` (llama_tensor_get_type and its helpers, llama-cpp-python
0.3.36): tensors are visited in the quantizer's order (non-block tensors first, then block by
block, names sorted), attn_v / ffn_down counters advance in that order, and a type whose block
does not divide a row falls back to a smaller block type. Only the k-quant, legacy and float file
types are covered (no IQ types).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as F

# file type -> default tensor type (llama_ftype_get_default_type)
DEFAULT_TYPE = {
    F.ALL_F32: T.F32, F.MOSTLY_F16: T.F16, F.MOSTLY_BF16: T.BF16,
    F.MOSTLY_Q4_0: T.Q4_0, F.MOSTLY_Q4_1: T.Q4_1, F.MOSTLY_Q5_0: T.Q5_0, F.MOSTLY_Q5_1: T.Q5_1,
    F.MOSTLY_Q8_0: T.Q8_0,
    F.MOSTLY_Q2_K: T.Q2_K, F.MOSTLY_Q2_K_S: T.Q2_K,
    F.MOSTLY_Q3_K_S: T.Q3_K, F.MOSTLY_Q3_K_M: T.Q3_K, F.MOSTLY_Q3_K_L: T.Q3_K,
    F.MOSTLY_Q4_K_S: T.Q4_K, F.MOSTLY_Q4_K_M: T.Q4_K,
    F.MOSTLY_Q5_K_S: T.Q5_K, F.MOSTLY_Q5_K_M: T.Q5_K,
    F.MOSTLY_Q6_K: T.Q6_K,
}
FILE_TYPES = {ft.name.removeprefix("MOSTLY_").removeprefix("ALL_"): ft for ft in DEFAULT_TYPE}

# a row length the type's block does not divide -> the type to use instead (tensor_type_fallback)
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)

# substrings that keep a tensor out of quantization (tensor_allows_quantization, the parts that
# concern the architectures qconvert writes)
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight")
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelFacts:
    arch: str  # gguf architecture name
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:  # llama.cpp's LLM_TYPE_70B: 80-layer llama with grouped-query attention
        return self.arch == "llama" and self.n_layer == 80 and self.n_head != self.n_head_kv


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length
    src_type: T


def quantizer_order(names: list[str]) -> list[str]:
    """llama-quantize's tensor order: by block index (-1 outside blocks), then by name."""

    def key(name: str):
        m = _LAYER.match(name)
        return (int(m.group(1)) if m else -1, name)

    return sorted(names, key=key)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for needle, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                        ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                        ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                        ("ffn_down", "ffn_down")):
        if needle in name:
            return cat
    return "other"


def n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count ([H, 1] is 1-D)."""
    dims = len(shape)
    while dims > 1 and shape[dims - 1] == 1:
        dims -= 1
    return dims


def allows_quantization(t: TensorInfo) -> bool:
    return n_dims(t.shape) >= 2 and t.name.endswith("weight") and not any(s in t.name for s in _NEVER_QUANTIZED)


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class _Counters:
    def __init__(self, tensors: list[TensorInfo], facts: ModelFacts):
        self.n_attn_v = sum(_category(t.name) == "attn_v" for t in tensors)
        self.i_attn_v = self.i_ffn_down = 0
        self.n_layer = facts.n_layer
        self.tied = not any(t.name == "output.weight" for t in tensors)


def _layer(name: str, counter: int, facts: ModelFacts) -> int:
    if max(1, facts.n_expert) > 1:  # experts are not one tensor per layer: read the block index
        return int(_LAYER.match(name).group(1))
    return counter


def _mixture_type(t: TensorInfo, new: T, ftype: F, facts: ModelFacts, c: _Counters, has_imatrix: bool) -> T:
    """llama_tensor_get_type_impl for the k-quant and legacy file types."""
    cat = _category(t.name)
    n_layer = c.n_layer
    if cat == "output" or (c.tied and cat == "token_embd"):
        if t.shape[0] % GGML_QUANT_SIZES[new][0]:
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if cat == "token_embd":
        return new
    if cat == "attn_v":
        if ftype == F.MOSTLY_Q2_K:
            new = T.Q4_K if facts.n_gqa >= 4 else T.Q3_K
        elif ftype == F.MOSTLY_Q2_K_S and facts.n_gqa >= 4:
            new = T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if c.i_attn_v < 2 else T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(c.i_attn_v, c.n_attn_v):
            new = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and c.i_attn_v < 4:
            new = T.Q5_K
        if facts.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if facts.n_expert == 8:
            new = T.Q8_0
        c.i_attn_v += 1
    elif cat == "attn_k":
        if facts.n_expert == 8:
            new = T.Q8_0
    elif cat == "ffn_down":
        i = _layer(t.name, c.i_ffn_down, facts)
        if ftype == F.MOSTLY_Q2_K:
            new = T.Q3_K
        elif ftype == F.MOSTLY_Q2_K_S:
            if i < n_layer // 8:
                new = T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new = T.Q5_K if i < n_layer // 16 else T.Q4_K  # the Q3_K branch is Falcon-only
        elif ftype == F.MOSTLY_Q3_K_L:
            new = T.Q5_K
        elif ftype == F.MOSTLY_Q4_K_M:
            if _use_more_bits(i, n_layer):
                new = T.Q6_K
        elif ftype == F.MOSTLY_Q5_K_M and _use_more_bits(i, n_layer):
            new = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and i < n_layer // 8:
            new = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and has_imatrix and i < n_layer // 8:
            new = T.Q4_1 if ftype == F.MOSTLY_Q4_0 else T.Q5_1
        c.i_ffn_down += 1
    elif cat == "attn_output":
        if facts.n_expert == 8:
            if ftype in (F.MOSTLY_Q2_K, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M):
                new = T.Q5_K
        elif ftype == F.MOSTLY_Q2_K:
            new = T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new = T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new = T.Q5_K
    return new


def _fallback(t: TensorInfo, new: T) -> T:
    cols = t.shape[0]
    if cols % GGML_QUANT_SIZES[new][0] == 0:
        return new
    new = FALLBACK.get(new, new)
    return new if cols % GGML_QUANT_SIZES[new][0] == 0 else T.F16


def tensor_types(tensors: list[TensorInfo], ftype: F, facts: ModelFacts, has_imatrix: bool = False) -> dict[str, T]:
    """name -> GGML type for every tensor; `tensors` in any order (the quantizer's order is applied)."""
    if ftype not in DEFAULT_TYPE:
        raise ValueError(f"file type {ftype.name} is not supported")
    default = DEFAULT_TYPE[ftype]
    by_name = {t.name: t for t in tensors}
    ordered = [by_name[n] for n in quantizer_order(list(by_name))]
    counters = _Counters(ordered, facts)
    types = {}
    for t in ordered:
        if not allows_quantization(t):
            types[t.name] = t.src_type
        elif default in FLOAT_TYPES:
            types[t.name] = default
        else:
            types[t.name] = _fallback(t, _mixture_type(t, default, ftype, facts, counters, has_imatrix))
    return types
