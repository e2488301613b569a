"""One Triton launch for GPTQ's inner loop over the columns of one block (see `gptq()` in gptq.py).

For column i of the block, for every row:
    q = clamp(round(w[:, i] / s[:, i]) + z[:, i], 0, maxq)          round half to even, like torch.round
    e = (w[:, i] - (q - z[:, i]) * s[:, i]) / h1[i, i]
    w[:, i:] -= e[:, None] * h1[i, i:]
    codes[:, i], err[:, i] = q, e
Rows are independent, so each program owns BLOCK_R rows and keeps their [BLOCK_R, B] tile of weights in
registers for the whole block: column i is taken out with a masked sum over the tile, the row h1[i, :] is
read from memory (L1/L2-resident: the block's h1 is at most 64 KiB), and the tile is updated with a masked
outer product. Once a column is done its slot in the tile holds e, so the tile ends as err.

BLOCK_R: the tile is BLOCK_R x B fp32 spread over num_warps * 32 threads; default BLOCK_R * B = 4096 (32 rows
at B = 128) with 4 warps: 32 values a thread for the weights tile and 32 for the codes tile, 140 registers
in all and no spills (triton 3.6, sm_90); rows = 28672 (Llama-3-8B's up/gate) makes 896 programs, about 7
per SM. Each program runs B dependent steps, so many programs in flight hide latency; 64 rows need 228
registers at 4 warps and spill at 2. Measured on an H200 (rows 28672, B 128): 0.29 ms against 16 ms for the
torch loop; 16 rows or 64 rows at 4 warps 0.34 to 0.40 ms. scripts/gptq_kernel_bench.py sweeps both.

Works compiled on CUDA and in the Triton interpreter (CPU tensors; tests), checked with triton 3.6.0, the
version torch 2.11 pins. In the interpreter the results equal the torch loop bit for bit. Compiled, a
multiply and subtract may be fused into one rounding where torch runs two kernels, so a value within rounding
noise of a .5 boundary may round the other way (3 codes of 3.7 million in the bench) and that row then
continues from a slightly different error.
"""

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
except ImportError:  # the torch loop in gptq.py is used instead
    triton = None
# Interpreter or compiler is fixed when triton is imported: it decorates its own library (tl.sum, tl.zeros)
# by TRITON_INTERPRET then. The kernel follows what triton's library was set up for.
INTERPRETED = triton is not None and isinstance(tl.zeros, InterpretedFunction)

MAX_B = 128  # wider blocks would spill the tile out of registers


def available(device) -> bool:
    """Triton can run quantize_block on `device`: CUDA, or the CPU in the Triton interpreter (tests), which
    needs TRITON_INTERPRET=1 set before triton is first imported."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and INTERPRETED


def default_block_r(b: int) -> int:
    """Rows per program for a block of b columns: BLOCK_R * B = 4096, between 16 and 64 rows."""
    return max(16, min(64, 4096 // triton.next_power_of_2(b)))


def quantize_block(w1: torch.Tensor, h1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                   block_r: int | None = None, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [rows, B] uint8 and err [rows, B] float32 of GPTQ's column loop over one block; w1 is not
    modified. w1 [rows, B], h1 [B, B] (upper triangular: only h1[i, i:] is read), scale and zero [rows, B]
    float32, per row and column (expanded views with stride 0 are fine)."""
    rows, b = w1.shape
    if not 0 < b <= MAX_B:
        raise ValueError(f"quantize_block: {b} columns, at most {MAX_B}")
    for name, t in (("w1", w1), ("h1", h1), ("scale", scale), ("zero", zero)):
        if t.dtype != torch.float32:
            raise TypeError(f"quantize_block: {name} is {t.dtype}, expected float32")
    if h1.shape != (b, b) or scale.shape != (rows, b) or zero.shape != (rows, b):
        raise ValueError("quantize_block: shapes of h1, scale, zero do not match w1")
    if w1.stride(1) != 1:
        w1 = w1.contiguous()
    if h1.stride(1) != 1:
        h1 = h1.contiguous()
    codes = torch.empty(rows, b, dtype=torch.uint8, device=w1.device)
    err = torch.empty(rows, b, dtype=torch.float32, device=w1.device)
    if rows == 0:
        return codes, err
    block_r = block_r or default_block_r(b)
    _gptq_block[(triton.cdiv(rows, block_r),)](
        w1, h1, scale, zero, codes, err, rows, float(maxq),
        w1.stride(0), h1.stride(0), scale.stride(0), scale.stride(1), zero.stride(0), zero.stride(1),
        n=b, BLOCK_R=block_r, B=triton.next_power_of_2(b), num_warps=num_warps)
    return codes, err


if triton is not None:

    def _jit(fn):  # @triton.jit, in the mode triton's library is in even if TRITON_INTERPRET changed since
        return InterpretedFunction(fn) if INTERPRETED else JITFunction(fn)

    @_jit
    def _gptq_block(W, H, S, Z, Q, E, rows, maxq,
                    stride_w, stride_h, stride_s_r, stride_s_c, stride_z_r, stride_z_c,
                    n: tl.constexpr, BLOCK_R: tl.constexpr, B: tl.constexpr):
        # W [rows, n] (column stride 1), H [n, n] (column stride 1), S and Z [rows, n] with any strides
        # (0 along columns for one value per row); Q and E [rows, n] contiguous. B = n padded to a power of 2.
        # n is a compile-time constant: blocks are almost always 128 wide (one compile, plus one for a partial
        # last block), and triton 3.6's interpreter cannot range() over a runtime argument with numpy 2.4
        # (it calls int() on a 1-element array, an error there).
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, B)
        row_ok = r < rows
        col_ok = c < n
        r64 = r.to(tl.int64)  # rows * stride can pass 2**31
        tile_ok = row_ok[:, None] & col_ok[None, :]
        w = tl.load(W + r64[:, None] * stride_w + c[None, :], mask=tile_ok, other=0.0)
        codes = tl.zeros([BLOCK_R, B], dtype=tl.float32)
        for i in range(n):
            s = tl.load(S + r64 * stride_s_r + i * stride_s_c, mask=row_ok, other=1.0)
            z = tl.load(Z + r64 * stride_z_r + i * stride_z_c, mask=row_ok, other=0.0)
            h = tl.load(H + i * stride_h + c, mask=col_ok & (c > i), other=0.0)  # h1[i, i+1:], zero elsewhere
            d = tl.load(H + i * stride_h + i)
            this = c[None, :] == i
            col = tl.sum(tl.where(this, w, 0.0), axis=1)  # w[:, i]; exact: one term, the rest zeros
            x = tl.math.div_rn(col, s)  # IEEE division like torch's; a plain / may be approximate on GPU
            # round half to even (torch.round) from floor: libdevice.rint does not run in the interpreter
            f = tl.floor(x)
            frac = x - f  # exact
            odd = f - 2.0 * tl.floor(0.5 * f)  # 1 where f is odd
            f = tl.where((frac > 0.5) | ((frac == 0.5) & (odd == 1.0)), f + 1.0, f)
            q = tl.minimum(tl.maximum(f + z, 0.0), maxq)
            e = tl.math.div_rn(col - (q - z) * s, d)
            # columns > i get the error, column i now keeps e (the tile becomes err), columns < i keep theirs
            w = tl.where(this, e[:, None], w - e[:, None] * h[None, :])
            codes = tl.where(this, q[:, None], codes)
        out = r64[:, None] * n + c[None, :]
        tl.store(E + out, w, mask=tile_ok)
        tl.store(Q + out, codes.to(tl.uint8), mask=tile_ok)
