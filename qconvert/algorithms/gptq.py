"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize one input column at a time and push each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's input, H = 2/n Σ x xᵀ.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial

import torch

from qconvert import distributed
from qconvert.algorithms import Algorithm, InputSet, gptq_kernel, register
from qconvert.algorithms.rtn import check_bits_and_group, minmax_params
from qconvert.errors import QConvertError
from qconvert.quantized import QuantizedTensor

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GPTQConfig:
    """act_order: quantize columns by descending Hessian diagonal (the group of a column is then
    recorded in g_idx unless static_groups fixes the groups up front in the original column order);
    damp: fraction of the mean Hessian diagonal added to it; true_sequential: each group of linears
    sees the outputs of the already-quantized groups before it in the block."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    act_order: bool = True  # with static groups: llm-compressor's default too, and the best here (README)
    static_groups: bool = True
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    zero_floor: int = 0  # set by the output format: GPTQ v1 cannot store a zero point of 0

    def __post_init__(self):
        check_bits_and_group(self.bits, self.group_size, BITS)
        if not 0 < self.damp < 1:
            raise QConvertError(f"--damp {self.damp}: must be between 0 and 1")
        if self.block_size < 1:
            raise QConvertError(f"--block-size {self.block_size}: must be positive")

    calibrated = True  # needs calibration data (its Hessians)


class Hessian:
    """Running H = 2/n Σ x xᵀ over every token the linear reads, in float32."""

    def __init__(self, columns: int, device: torch.device):
        self.matrix = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[0]
        if n == 0:
            return
        total = self.tokens + n
        _add_gram(self.matrix, x, self.tokens / total, 2 / total)
        self.tokens = total

    def reduce(self, ranks) -> None:
        """The H of every rank's tokens: each rank's mean weighted by its share of them."""
        (total,) = ranks.add([self.tokens])
        if total:
            self.matrix.mul_(self.tokens / total)
            ranks.sum_(self.matrix)
        self.tokens = int(total)


def _add_gram(h: torch.Tensor, x: torch.Tensor, beta: float, alpha: float) -> None:
    """h = beta·h + alpha·xᵀx in float32, in place (no second Hessian-sized temporary)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        # products of 16-bit values are exact in fp32: no fp32 copy of x, and tensor cores do the work
        try:
            torch.addmm(h, x.T, x, beta=beta, alpha=alpha, out_dtype=torch.float32, out=h)
            return
        except (TypeError, RuntimeError):  # a torch without addmm(out_dtype=): one temporary, still fast
            h.mul_(beta).add_(torch.mm(x.T, x, out_dtype=torch.float32), alpha=alpha)
            return
    x = x.float()
    h.addmm_(x.T, x, beta=beta, alpha=alpha)


def _damped_factor(box: list[torch.Tensor], damp: float, name: str) -> torch.Tensor:
    """M, the lower Cholesky factor of J·(H + λI)·J, λ = damp · mean(diag H), from box = [J·H·J] (H with its
    rows and columns reversed; the caller hands it over in the box so it is freed here). λ grows tenfold,
    with a warning, while H + λI is not positive definite."""
    h = box.pop()
    mean_diag = float(torch.diag(h).mean())
    added = 0.0
    for attempt in range(6):
        lam = damp * 10**attempt * mean_diag
        h.diagonal().add_(lam - added)
        added = lam
        m, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        m = None  # the failed factor is freed before the next attempt makes another
    else:
        raise QConvertError(f"{name}: the Hessian stays singular even with damp {damp * 10**5:g} "
                            "(too little calibration data for this layer?)")
    if attempt:
        log.warning("%s: Hessian not positive definite with damp %g; used damp %g", name, damp, damp * 10**attempt)
    return m


def inverse_cholesky(box: list[torch.Tensor], damp: float, name: str = "") -> torch.Tensor:
    """U, the upper Cholesky factor of (H + λI)⁻¹ (see _damped_factor for box and λ).

    With J·H·J = M·Mᵀ (M lower), H = R·Rᵀ for R = J·M·J (upper), so H⁻¹ = (R⁻¹)ᵀ·R⁻¹ and U = R⁻¹ =
    J·M⁻¹·J: one factorization and one triangular inversion, never more than two n² buffers (a 14336²
    Hessian is 822 MB; cholesky_inverse followed by a second factorization needs three)."""
    m = _damped_factor(box, damp, name)
    invert_lower(m)
    return m.flip(0, 1)


def plane_factor(box: list[torch.Tensor], damp: float, name: str = "") -> torch.Tensor:
    """C, with C[j, i] = R[j, i] / R[i, i] for the upper R of H + λI = R·Rᵀ (see inverse_cholesky): GPTQ's
    sweep without the inverse. Quantizing column i after columns j < i were rounded to q_j, the rest of the
    weights minimizing (w − v)ᵀH(w − v) put column i at w_i + Σ_j C[j, i]·(w_j − q_j) (Babai's nearest
    plane; Chen et al., 2025, "The Geometry of LLM Quantization: GPTQ as Babai's Nearest Plane Algorithm"),
    the value GPTQ's error feedback through U = R⁻¹ reaches. One factorization, no triangular inversion."""
    m = _damped_factor(box, damp, name)
    m.div_(m.diagonal().clone()[None, :])  # R's columns over their diagonal, in M's reversed coordinates
    return m.flip(0, 1)


def invert_lower(m: torch.Tensor, leaf: int = 1024) -> None:
    """m ← m⁻¹ in place for a lower-triangular m, by halves: [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0],
    [−D⁻¹·C·A⁻¹, D⁻¹]]. A third of the multiply-adds of a triangular solve against I, nearly all in
    matrix products, and half an n² of scratch rather than a second n² buffer."""
    n = m.shape[0]
    if n <= leaf:
        m.copy_(torch.linalg.solve_triangular(m, torch.eye(n, dtype=m.dtype, device=m.device), upper=False))
        return
    k = n // 2
    k += -k % 128 if k >= 128 else 0  # tile-aligned halves for the products
    a, c, d = m[:k, :k], m[k:, :k], m[k:, k:]
    invert_lower(a, leaf)
    invert_lower(d, leaf)
    c.copy_(d @ (c @ a)).neg_()


def unit_dead_columns(h: torch.Tensor) -> None:
    """A column no calibration token reached gets a unit diagonal in H, so it is rounded alone and passes no
    error on (its weights are kept: real inputs may still reach it)."""
    h.diagonal().masked_fill_(torch.diag(h) == 0, 1.0)


def _params(wg: torch.Tensor, config: GPTQConfig, scale_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (as float) of each group of wg [rows, groups, g]: [rows, groups] each."""
    bits = config.bits
    scale, zero = minmax_params(wg, bits, config.symmetric, scale_dtype, config.zero_floor)
    z = torch.full_like(scale, 1 << (bits - 1), dtype=torch.float32) if zero is None else zero.float()
    return scale, z


def gptq(
    w: torch.Tensor,
    hessian: list[torch.Tensor],
    config: GPTQConfig,
    scale_dtype: torch.dtype,
    name: str = "",
) -> QuantizedTensor:
    """Quantize w [rows, cols] (rows may be several linears that share the input) given hessian = [H]
    ([cols, cols]), which is taken out of its box and used up: an argument passed bare stays referenced
    by the caller's frame for the whole call, and H must be freed as soon as it is permuted."""
    rows, cols = w.shape
    g = cols if config.group_size == -1 else config.group_size
    if cols % g:
        raise QConvertError(f"{name}: group size {g} does not divide input size {cols}")
    maxq = (1 << config.bits) - 1
    W = w.detach().float().clone()
    H = hessian.pop()
    unit_dead_columns(H)

    groups = cols // g
    fixed = config.static_groups or config.group_size == -1
    if fixed:  # all group parameters from the weights, before any error feedback
        scale, zero = _params(W.reshape(rows, groups, g), config, scale_dtype)
    else:
        scale = torch.empty(rows, groups, dtype=scale_dtype, device=W.device)
        zero = torch.empty(rows, groups, dtype=torch.float32, device=W.device)

    perm = None
    if config.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
    position = torch.arange(cols, device=W.device)
    source = perm if perm is not None else position  # the column of w quantized at each position
    column_group = (source if fixed else position) // g
    # H in quantization order, reversed (see inverse_cholesky), one axis at a time so that the 822 MB
    # down_proj Hessian exists at most twice
    order = source.flip(0)
    H = H.index_select(0, order)
    H = H.index_select(1, order)
    box = [H]
    del H
    c = plane_factor(box, config.damp, name)

    # blocks never straddle a group boundary, so a group's parameters come from weights that have
    # received the error of every column before it
    block = config.block_size if fixed else math.gcd(config.block_size, g)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    rounding = scale.float()  # the stored scales, in the sweep's precision (one kernel variant for all)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        if not fixed and i1 % g == 0:
            s_k, z_k = _params(W[:, None, i1:i1 + g], config, scale_dtype)
            scale[:, i1 // g], zero[:, i1 // g] = s_k[:, 0], z_k[:, 0]
            rounding[:, i1 // g] = scale[:, i1 // g]
        # W holds the targets; the block's own weights are read from the caller's w (W's float copy)
        codes[:, i1:i2], err = sweep_block(w, source[i1:i2], W[:, i1:i2], c[i1:i2, i1:i2], rounding, zero,
                                           column_group[i1:i2], maxq)
        W[:, i2:].addmm_(err, c[i1:i2, i2:])

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if not fixed:  # column c was quantized at position inv[c], in that position's group
            g_idx = (inv // g).to(torch.int32).cpu()
    zero_codes = None if config.symmetric else zero.to(torch.uint8)
    return QuantizedTensor(codes, scale, zero_codes, config.bits, config.group_size, g_idx)


def sweep_block(w: torch.Tensor, cols: torch.Tensor, t1: torch.Tensor, c1: torch.Tensor, scale: torch.Tensor,
                zero: torch.Tensor, groups: torch.Tensor, maxq: int):
    """Quantize the columns of one block in order (see plane_factor): column i, the weights w[:, cols[i]],
    is rounded at its target t1[:, i] plus Σ c1[j, i]·err[:, j] over the block's columns j < i, err = weight −
    dequantized, on the scale and zero point of its group groups[i]. w [rows, n] (any float dtype); t1
    [rows, B] float32; c1 [B, B]; scale, zero [rows, groups]. Returns (codes uint8, err); t1 is not
    modified."""
    if w.is_cuda and gptq_kernel.available(w.device):  # one launch per block instead of ~10 per column
        return gptq_kernel.quantize_block(w, cols, t1, c1, scale, zero, groups, maxq)
    w1, s1, z1 = w[:, cols].float(), scale[:, groups].float(), zero[:, groups].float()
    t = t1.clone()
    codes = torch.empty(t.shape, dtype=torch.uint8, device=t.device)
    err = torch.empty_like(t)
    for i in range(t.shape[1]):
        s, z = s1[:, i], z1[:, i]
        q = torch.clamp(torch.round(t[:, i] / s) + z, 0, maxq)
        codes[:, i] = q.to(torch.uint8)
        e = w1[:, i] - (q - z) * s
        t[:, i + 1:] += e[:, None] * c1[i, i + 1:][None, :]
        err[:, i] = e
    return codes, err


def hessian_of(inputs: InputSet) -> Hessian:
    """An empty H for the input the set's linears share."""
    weight = inputs.linears[0].weight
    return Hessian(weight.shape[1], weight.device)


def _take_hessian(stats: Hessian | None, weight: torch.Tensor) -> torch.Tensor:
    """The accumulated H, handed over (gptq() damps it in place and frees it early)."""
    if stats is None or stats.tokens == 0:
        # an expert the router never chose: with H = I no error is passed on, which is plain rounding
        return torch.eye(weight.shape[1], device=weight.device, dtype=torch.float32)
    hessian, stats.matrix = stats.matrix, None
    return hessian


def warm_up_solver(device: torch.device, cols: int, damp: float) -> None:
    """cuBLAS's and cuSOLVER's handles, made by a Hessian update and its factorization on a tiny input."""
    h = Hessian(cols, device)
    h.update(torch.randn(2 * cols, cols, device=device, dtype=torch.bfloat16))
    inverse_cholesky([h.matrix], damp)


@register(GPTQConfig)
class GPTQ(Algorithm):
    repeatable = False  # quantize() takes its Hessian (freeing it is what keeps the peak low)
    divides_work = True

    def __init__(self, config: GPTQConfig, arch):
        super().__init__(config, arch)
        self.sequential = config.true_sequential

    def warm_ups(self, device):
        # 16 groups: triton specializes a kernel on whether each stride divides by 16, and the scales' row
        # stride is the group count (32 to 112 in real layers)
        cols = 16 * (self.config.group_size if self.config.group_size > 0 else 128)

        def sweep():  # the Triton kernel (loaded from its cache or compiled) and gptq()'s other kernels
            for rows in (64, gptq_kernel.THIN):  # its variants for few rows and for many
                # the engine's weights on a GPU are bfloat16; dtypes spelled out: building the model sets
                # torch's default dtype meanwhile
                gptq(torch.randn(rows, cols, device=device, dtype=torch.bfloat16),
                     [torch.eye(cols, device=device, dtype=torch.float32)], self.config, torch.bfloat16)

        return [partial(warm_up_solver, device, cols, self.config.damp), sweep]

    def statistics(self, inputs: InputSet) -> Hessian:
        return hessian_of(inputs)

    def quantize(self, inputs, stats, scale_dtype):
        """The linears of one input set are swept as one matrix: they share H and its inverse."""
        name = ", ".join(inputs.names)
        weights = [lin.weight for lin in inputs.linears]
        w = torch.cat(weights)
        ranks = distributed.current()
        # rows are independent given H: among several ranks each sweeps its share (each factorizes H)
        divided = ranks.active and w.shape[0] >= ranks.world
        qt = gptq(w[ranks.row_share(w.shape[0])] if divided else w, [_take_hessian(stats, w)], self.config,
                  scale_dtype, name)
        if divided:
            whole = lambda t: ranks.stack_rows(t, w.shape[0])  # noqa: E731
            qt = QuantizedTensor(whole(qt.codes), whole(qt.scale), None if qt.zero is None else whole(qt.zero),
                                 qt.bits, qt.group_size, qt.g_idx)
        if len(weights) == 1:
            return [qt]
        rows = [w.shape[0] for w in weights]
        zeros = qt.zero.split(rows) if qt.zero is not None else [None] * len(rows)
        return [QuantizedTensor(c, s, z, qt.bits, qt.group_size, qt.g_idx)
                for c, s, z in zip(qt.codes.split(rows), qt.scale.split(rows), zeros)]
