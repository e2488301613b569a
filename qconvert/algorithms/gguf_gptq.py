"""GPTQ onto the GGUF grids: the Hessian error compensation of GPTQ, where the quantizer of each column
block is the GGUF type's own block quantizer (llama.cpp's, byte for byte, with the importance weights
llama.cpp's imatrix would give it), so the output is an ordinary GGUF file.

A GGUF type quantizes each row in blocks of 32 (Q8_0, Q5_0 ...) or 256 columns (the k-quants' super-blocks,
whose sub-block scales are chosen jointly), so the columns are swept a block at a time: llama.cpp's quantizer
picks the block's scales from its error-updated weights, the codes are rounded on them column by column with
GPTQ's update inside the block, and the block's error E goes to the columns after it as in GPTQ's
derivation for a set of columns fixed together. With U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), the
optimal update of the remaining columns R given block B fixed at Q_B is
    W_R -= (W_B - Q_B) · U_BB⁻¹ · U_BR
(the column-at-a-time GPTQ update is the case |B| = 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import gguf
import torch

from qconvert.algorithms import Algorithm, InputSet, register
from qconvert.algorithms.gptq import (
    Hessian,
    _take_hessian,
    hessian_of,
    inverse_cholesky,
    unit_dead_columns,
    warm_up_solver,
)
from qconvert.errors import QConvertError
from qconvert.formats.gguf import quants
from qconvert.formats.gguf.quants import kquants, legacy, native
from qconvert.formats.gguf.quants.common import div, nearest_int

Q = gguf.GGMLQuantizationType
KQUANTS = {Q.Q2_K: kquants.q2_K, Q.Q3_K: kquants.q3_K, Q.Q4_K: kquants.q4_K, Q.Q5_K: kquants.q5_K,
           Q.Q6_K: kquants.q6_K}


@dataclass(frozen=True)
class RowTypes:
    """The GGUF type of rows [start, stop) of one checkpoint tensor (a fused tensor may be split into
    GGUF tensors of different types)."""

    start: int
    stop: int
    qtype: int


@dataclass(frozen=True, eq=False)
class GGUFGPTQConfig:
    """types: checkpoint tensor name -> the GGUF types of its rows (from llama.cpp's mixture rules); a
    linear not listed is left as it is (its GGUF tensor keeps a float type, or is quantized plainly)."""

    types: dict[str, tuple[RowTypes, ...]] = field(default_factory=dict)
    damp: float = 0.01
    true_sequential: bool = True

    calibrated = True


@dataclass
class GGUFTensor:
    """One checkpoint tensor's GGUF bytes, per row range and type (what the engine hands the writer)."""

    parts: list[tuple[RowTypes, torch.Tensor]]  # (rows and type, uint8 [rows, row bytes]) in row order
    cols: int
    errors: list[tuple[float, float]] = field(default_factory=list)  # per part: ||W - Q||^2, ||W||^2

    @classmethod
    def of(cls, w: torch.Tensor, parts: list[tuple[RowTypes, torch.Tensor]]) -> "GGUFTensor":
        """w's bytes, with each part's squared error against w for the file's per-tensor report (summed over
        the parts that make one GGUF tensor, so the writer need not read the weights again)."""
        cols = w.shape[1]
        errors = []
        for r, raw in parts:
            ref = w[r.start:r.stop].float()
            err = ref - quants.dequantize(raw, r.qtype, (r.stop - r.start, cols))
            errors.append((float(err.pow(2).sum()), float(ref.pow(2).sum())))
        return cls(parts, cols, errors)

    def dequantize(self) -> torch.Tensor:
        return torch.cat([quants.dequantize(raw, r.qtype, (r.stop - r.start, self.cols)) for r, raw in self.parts])

    @property
    def bits(self) -> float:
        """Bits per weight over the whole tensor."""
        rows = sum(r.stop - r.start for r, _ in self.parts)
        return round(8 * sum(raw.numel() for _, raw in self.parts) / (rows * self.cols), 3)

    @property
    def group(self) -> str:
        return "+".join(dict.fromkeys(Q(r.qtype).name for r, _ in self.parts))


@dataclass
class Unchanged:
    """A linear with no GGUF block type: its weights go to the file as they are."""

    weight: torch.Tensor
    bits = None
    group = "float"

    def dequantize(self) -> torch.Tensor:
        return self.weight


def importance(h: torch.Tensor) -> torch.Tensor:
    """llama.cpp's imatrix value per column, the mean squared activation: diag(H) / 2 for H = 2/n Σ x xᵀ."""
    return torch.diag(h) / 2


def sweep(w: torch.Tensor, u: torch.Tensor, qtype: int, imatrix: torch.Tensor | None) -> torch.Tensor:
    """GGUF bytes uint8 [rows, row bytes] of w [rows, cols] (float32, consumed), given U [cols, cols].

    A k-quant block's scales come from llama.cpp's search on the block's error-updated weights; its codes
    are then rounded column by column, each column's error passed on to the block's later columns (GPTQ
    proper). The 32-value types likewise, on the scale (and min) llama.cpp's quantizer picks for the block."""
    block = gguf.GGML_QUANT_SIZES[Q(qtype)][0]
    rows, cols = w.shape
    if cols % block:
        raise QConvertError(f"{Q(qtype).name}: {cols} columns are not whole blocks of {block}")
    kquant = KQUANTS.get(Q(qtype))
    out = []
    for c0 in range(0, cols, block):
        c1 = c0 + block
        part, ub = w[:, c0:c1], u[c0:c1, c0:c1]
        weights = None if imatrix is None else imatrix[c0:c1]
        if kquant is not None:
            scaled = torch.empty_like(part)
            if native.available(w.device):  # the same sweep in C, a row per thread
                raw = torch.empty((rows, quants.row_bytes(qtype, block)), dtype=torch.uint8, device=w.device)
                native.gptq_superblocks(part, ub, Q(qtype), weights, raw, scaled)
            else:
                raw = kquant(part.clone(), weights, rounding=_compensating(part, ub, scaled))
        else:
            # the 32-value types' importance weighting reads the mean square of the whole (updated) row
            sigma2 = legacy.row_sigma2(w) if imatrix is not None else None
            raw = quants.quantize(part, qtype, weights, sigma2=sigma2)
            raw, scaled = _compensate_block(part, ub, raw, qtype)
        w[:, c1:] -= scaled @ u[c0:c1, c1:]
        out.append(raw)
    return torch.cat(out, dim=1)


def _compensate_block(w: torch.Tensor, u: torch.Tensor, raw: torch.Tensor, qtype: int):
    """One 32-column block of a legacy type: w [rows, 32] (updated in place) rounded column by column on the
    d (and m) llama.cpp chose for it in raw, each column's error, scaled by 1/U_cc, passed on to the block's
    later columns. Returns the block's bytes with those codes and the scaled errors [rows, 32]."""
    d, m = legacy.block_scales(raw, qtype)
    lo, hi, offset = legacy.CODES[Q(qtype)][:3]
    kept = d == 0  # llama.cpp's codes stay where its scale is 0 (a block of zeros)
    old = quants.dequantize(raw, qtype, w.shape)
    codes = torch.empty(w.shape, dtype=torch.int32, device=w.device)
    scaled = torch.empty_like(w)
    for c in range(w.shape[1]):
        x = w[:, c]
        centred = x if m is None else x - m
        q = nearest_int(div(centred, d)).add_(offset).clamp_(lo, hi)
        value = d * (q - offset) if m is None else d * (q - offset) + m
        value = torch.where(kept, old[:, c], value)
        codes[:, c] = q
        e = (x - value) / u[c, c]
        w[:, c + 1:] -= e[:, None] * u[c, c + 1:]
        scaled[:, c] = e
    return torch.where(kept[:, None], raw, legacy.with_codes(raw, qtype, codes)), scaled


def _compensating(w: torch.Tensor, u: torch.Tensor, scaled: torch.Tensor):
    """A k-quant `rounding` (see kquants._requantize) for one super-block w [rows, 256], updated in place:
    each column is rounded on llama.cpp's scales and its error, scaled by 1/U_cc, goes to the columns after
    it in the block and into `scaled` for the columns after the block."""

    def rounding(xs, d, dm, lo, hi, codes_if_zero, with_min):
        n = xs.shape[0]
        codes = torch.empty_like(codes_if_zero)
        for c in range(w.shape[1]):
            s, i = divmod(c, n)  # sub-block s, element i (kquants' [n, nsub, rows, 1] layout)
            dc, x = d[s, :, 0], w[:, c]
            shift = dm[s, :, 0] if with_min else 0.0
            q = nearest_int(div(x + shift, dc)).clamp_(lo, hi)
            q = torch.where(dc != 0, q, codes_if_zero[i, s, :, 0])
            codes[i, s, :, 0] = q
            e = (x - (dc * q - shift)) / u[c, c]
            w[:, c + 1:] -= e[:, None] * u[c, c + 1:]
            scaled[:, c] = e
        return codes

    return rounding


def quantize_set(inputs: InputSet, stats: Hessian, types: dict[str, tuple[RowTypes, ...]], damp: float) -> list:
    """The set's linears swept onto their GGUF types with the Hessian of their common input."""
    weights = [lin.weight for lin in inputs.linears]
    typed = [types.get(n) for n in inputs.files]
    if not any(typed):
        return [Unchanged(w.detach()) for w in weights]
    h = _take_hessian(stats, weights[0])
    imatrix = importance(h)  # 0 for a column nothing reached, as in llama.cpp's imatrix
    unit_dead_columns(h)
    u = inverse_cholesky([h.flip(0, 1).contiguous()], damp, ", ".join(inputs.names))
    del h
    results = []
    for w, row_types in zip(weights, typed):
        if not row_types:
            results.append(Unchanged(w.detach()))
            continue
        parts = [(r, sweep(w.detach()[r.start:r.stop].float().clone(), u, r.qtype, imatrix)) for r in row_types]
        results.append(GGUFTensor.of(w.detach(), parts))
    return results


def warm_ups(device: torch.device, damp: float) -> list:
    """The engine's warm-ups for the sweep (see Algorithm.warm_ups): cuBLAS and cuSOLVER, then the compiled
    sweep (its library loaded, or built on a machine's first run) and the 32-value types' PyTorch rounding."""
    cols = 256

    def sweeps():  # (float32 spelled out: the engine may have changed torch's default dtype meanwhile)
        f32 = dict(device=device, dtype=torch.float32)
        eye, ones = torch.eye(cols, **f32), torch.ones(cols, **f32)
        for qtype in (Q.Q4_K, Q.Q5_0):
            sweep(torch.randn(64, cols, **f32), eye, qtype, ones)

    return [partial(warm_up_solver, device, cols, damp), sweeps]


@register(GGUFGPTQConfig)
class GGUFGPTQ(Algorithm):
    repeatable = False

    def __init__(self, config: GGUFGPTQConfig, arch):
        super().__init__(config, arch)
        self.sequential = config.true_sequential

    def warm_ups(self, device):
        return warm_ups(device, self.config.damp)

    def statistics(self, inputs: InputSet) -> Hessian:
        return hessian_of(inputs)

    def quantize(self, inputs, stats, scale_dtype):
        return quantize_set(inputs, stats, self.config.types, self.config.damp)
