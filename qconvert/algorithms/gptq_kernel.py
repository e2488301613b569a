"""One Triton launch for GPTQ's inner loop over the columns of one block (see `gptq()` in gptq.py), in the
nearest-plane form of `plane_factor`. For column i of the block, for every row:
    q = clamp(round(t[:, i] / s[:, i]) + z[:, i], 0, maxq)        round half to even, like torch.round
    e = w[:, i] - (q - z[:, i]) * s[:, i]                         w, s, z gathered from their columns / groups
    t[:, i+1:] += e[:, None] * c1[i, i+1:]
    codes[:, i], err[:, i] = q, e
Rows are independent, so each program owns BLOCK_R rows and keeps their [BLOCK_R, B] tile of targets t in
registers for the whole block: column i is taken out with a masked sum over the tile, the row c1[i, :] is
read from memory (L1/L2-resident: the block's c1 is at most 64 KiB) as is the column's own weight w[:, i],
and the tile is updated with a masked outer product. Once a column is done its slot in the tile holds e, so
the tile ends as err.

BLOCK_R: the tile is BLOCK_R x B fp32 spread over num_warps * 32 threads; default BLOCK_R * B = 4096 (32 rows
at B = 128) with 4 warps: 32 values a thread for the tile and 32 for the codes tile, no spills (triton 3.6,
sm_90); rows = 28672 (Llama-3-8B's up/gate) makes 896 programs, about 7 per SM. Each program runs B dependent
steps, so many programs in flight hide latency. scripts/gptq_kernel_bench.py sweeps BLOCK_R and warps.

Works compiled on CUDA and in the Triton interpreter (CPU tensors; tests), checked with triton 3.6.0, the
version torch 2.11 pins. In the interpreter the results equal the torch loop bit for bit. Compiled, a
multiply and add may be fused into one rounding where torch runs two kernels, so a value within rounding
noise of a .5 boundary may round the other way and that row then continues from a slightly different error.
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


THIN = 4096  # fewer rows than this (a rank's share of a linear on several GPUs) leave SMs idle at 32 a program


def default_block_r(b: int, rows: int = THIN) -> int:
    """Rows per program for a block of b columns: BLOCK_R * B = 4096, between 16 and 64 rows; a quarter of
    that for fewer than THIN rows (1024 rows on an H200: 0.078 ms at 8 a program against 0.098 at 32)."""
    full = max(16, min(64, 4096 // triton.next_power_of_2(b)))
    return full if rows >= THIN else max(4, full // 4)


def quantize_block(w: torch.Tensor, cols: torch.Tensor, t1: torch.Tensor, c1: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor, groups: torch.Tensor, maxq: int, block_r: int | None = None,
                   num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [rows, B] uint8 and err [rows, B] float32 of GPTQ's column loop over one block (see
    gptq.sweep_block for the arguments); nothing passed in is modified. Column i's weights are w[:, cols[i]]
    and its scale and zero point scale[:, groups[i]] and zero[:, groups[i]], gathered by the kernel (a
    block's gathers in torch would be four more launches, which cost more than the sweep on a rank's few
    rows). c1 is upper triangular: only c1[i, i+1:] is read."""
    rows, b = t1.shape
    if not 0 < b <= MAX_B:
        raise ValueError(f"quantize_block: {b} columns, at most {MAX_B}")
    for name, x in (("t1", t1), ("c1", c1), ("zero", zero)):
        if x.dtype != torch.float32:
            raise TypeError(f"quantize_block: {name} is {x.dtype}, expected float32")
    if (w.shape[0] != rows or c1.shape != (b, b) or cols.shape != (b,) or groups.shape != (b,)
            or scale.shape[0] != rows or zero.shape != scale.shape):
        raise ValueError("quantize_block: shapes of w, cols, c1, scale, zero, groups do not match t1")
    w, t1, c1, scale, zero = (x if x.stride(-1) == 1 else x.contiguous() for x in (w, t1, c1, scale, zero))
    codes = torch.empty(rows, b, dtype=torch.uint8, device=t1.device)
    err = torch.empty(rows, b, dtype=torch.float32, device=t1.device)
    if rows == 0:
        return codes, err
    block_r = block_r or default_block_r(b, rows)
    _gptq_block[(triton.cdiv(rows, block_r),)](
        w, cols.contiguous(), t1, c1, scale, zero, groups.contiguous(), codes, err, rows, float(maxq),
        w.stride(0), t1.stride(0), c1.stride(0), scale.stride(0), zero.stride(0),
        n=b, BLOCK_R=block_r, B=triton.next_power_of_2(b), num_warps=num_warps)
    return codes, err


if triton is not None:

    def _jit(fn):  # @triton.jit, in the mode triton's library is in even if TRITON_INTERPRET changed since
        return InterpretedFunction(fn) if INTERPRETED else JITFunction(fn)

    @_jit
    def _gptq_block(W, P, T, C, S, Z, G, Q, E, rows, maxq, stride_w, stride_t, stride_c, stride_s, stride_z,
                    n: tl.constexpr, BLOCK_R: tl.constexpr, B: tl.constexpr):
        # W [rows, *] (any float dtype), T [rows, n], C [n, n], S and Z [rows, groups], all with column stride
        # 1; P and G [n] integer column and group indices; Q and E [rows, n] contiguous. B = n padded to a
        # power of 2. n is a compile-time constant: blocks are almost always 128 wide (one compile, plus one
        # for a partial last block), and triton 3.6's interpreter cannot range() over a runtime argument with
        # numpy 2.4 (it calls int() on a 1-element array, an error there).
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, B)
        row_ok = r < rows
        col_ok = c < n
        r64 = r.to(tl.int64)  # rows * stride can pass 2**31
        tile_ok = row_ok[:, None] & col_ok[None, :]
        t = tl.load(T + r64[:, None] * stride_t + c[None, :], mask=tile_ok, other=0.0)
        codes = tl.zeros([BLOCK_R, B], dtype=tl.float32)
        for i in range(n):
            p = tl.load(P + i)
            g = tl.load(G + i)
            s = tl.load(S + r64 * stride_s + g, mask=row_ok, other=1.0).to(tl.float32)
            z = tl.load(Z + r64 * stride_z + g, mask=row_ok, other=0.0)
            w = tl.load(W + r64 * stride_w + p, mask=row_ok, other=0.0).to(tl.float32)
            k = tl.load(C + i * stride_c + c, mask=col_ok & (c > i), other=0.0)  # c1[i, i+1:], zero elsewhere
            this = c[None, :] == i
            col = tl.sum(tl.where(this, t, 0.0), axis=1)  # t[:, i]; exact: one term, the rest zeros
            x = tl.math.div_rn(col, s)  # IEEE division like torch's; a plain / may be approximate on GPU
            # round half to even (torch.round) from floor: libdevice.rint does not run in the interpreter
            f = tl.floor(x)
            frac = x - f  # exact
            odd = f - 2.0 * tl.floor(0.5 * f)  # 1 where f is odd
            f = tl.where((frac > 0.5) | ((frac == 0.5) & (odd == 1.0)), f + 1.0, f)
            q = tl.minimum(tl.maximum(f + z, 0.0), maxq)
            e = w - (q - z) * s
            # columns > i get the error, column i now keeps e (the tile becomes err), columns < i keep theirs
            t = tl.where(this, e[:, None], t + e[:, None] * k[None, :])
            codes = tl.where(this, q[:, None], codes)
        out = r64[:, None] * n + c[None, :]
        tl.store(E + out, t, mask=tile_ok)
        tl.store(Q + out, codes.to(tl.uint8), mask=tile_ok)
