"""quantize_block (the Triton kernel for GPTQ's column loop) against the loop in plain torch.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors; with CUDA it runs compiled on the GPU
(and on the CPU too if TRITON_INTERPRET=1 was set by hand). Without triton the module is skipped."""

import importlib.util
import os
import sys

import pytest
import torch

# The interpreter must be chosen before triton is first imported (triton decorates its own library then).
# Only where no GPU could run the compiled kernel: on a GPU machine the compiled kernel is what is tested.
if not torch.cuda.is_available() and "triton" not in sys.modules and importlib.util.find_spec("triton"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed (the GPTQ kernel needs it; gptq() "
                                              "uses its torch loop instead)")

from qconvert.algorithms import gptq_kernel  # noqa: E402

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(
               not gptq_kernel.available("cpu"),
               reason="the Triton interpreter is off: triton was imported before TRITON_INTERPRET=1 was set")),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
TIE = 1e-4  # a rounded value this close to a .5 boundary may round either way under another operation order


def reference(w1, h1, scale, zero, maxq):
    """The loop of gptq() in plain torch; also returns the pre-rounding values col / s."""
    W1 = w1.clone()
    codes = torch.empty(W1.shape, dtype=torch.uint8, device=W1.device)
    err, ratio = torch.empty_like(W1), torch.empty_like(W1)
    for i in range(W1.shape[1]):
        s, z = scale[:, i], zero[:, i]
        col = W1[:, i]
        ratio[:, i] = col / s
        q = torch.clamp(torch.round(col / s) + z, 0, maxq)
        codes[:, i] = q.to(torch.uint8)
        e = (col - (q - z) * s) / h1[i, i]
        W1[:, i:] -= e[:, None] * h1[i, i:][None, :]
        err[:, i] = e
    return codes, err, ratio


def problem(rows, b, per_column, seed, bits=4, device="cpu"):
    """Random weights, the inverse-Hessian factor of random inputs, 4-bit asymmetric min-max parameters:
    one scale and zero per row broadcast with stride 0, or a different one per column."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, b, generator=g)
    x = torch.randn(4 * b, b, generator=g) + 0.3 * torch.randn(4 * b, 1, generator=g)  # correlated inputs
    h = x.T @ x / (4 * b) + 0.01 * torch.eye(b)
    h1 = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    maxq = (1 << bits) - 1
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    scale = ((hi - lo) / maxq)[:, None]
    zero = torch.round(-lo[:, None] / scale)
    if per_column:
        scale = scale * (0.75 + 0.5 * torch.rand(rows, b, generator=g))
        zero = (zero + torch.randint(-2, 3, (rows, b), generator=g)).clamp(0, maxq)
    w, h1, scale, zero = (t.to(device) for t in (w, h1, scale, zero))
    return w, h1, scale.expand(rows, b), zero.expand(rows, b), maxq  # [rows, 1] → stride 0 along columns


def compare(got, want):
    """Codes equal and err close; in a row where some pre-rounding value lies within TIE of a .5 boundary
    only the columns before it are compared (from there the row may legitimately take another path)."""
    codes, err = got
    ref_codes, ref_err, ratio = want
    near = ((ratio - torch.floor(ratio)) - 0.5).abs() < TIE
    first = torch.where(near.any(1), near.float().argmax(1), torch.full_like(near[:, 0], ratio.shape[1],
                                                                             dtype=torch.long))
    assert (first < ratio.shape[1]).float().mean() < 0.2, "too many near-ties for a meaningful comparison"
    keep = torch.arange(ratio.shape[1], device=ratio.device)[None, :] < first[:, None]
    assert torch.equal(codes[keep], ref_codes[keep])
    torch.testing.assert_close(err[keep], ref_err[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,b", [(100, 128), (77, 64), (50, 40), (1, 128)])
@pytest.mark.parametrize("per_column", [False, True], ids=["broadcast", "per-column"])
def test_matches_torch_loop(device, rows, b, per_column):
    w, h1, scale, zero, maxq = problem(rows, b, per_column, seed=rows * b, device=device)
    assert gptq_kernel.available(device)
    if not per_column:
        assert scale.stride(1) == 0 and zero.stride(1) == 0
    w_before = w.clone()
    got = gptq_kernel.quantize_block(w, h1, scale, zero, maxq)
    assert torch.equal(w, w_before)  # the input is left alone
    assert got[0].dtype == torch.uint8 and got[1].dtype == torch.float32
    compare(got, reference(w, h1, scale, zero, maxq))


@pytest.mark.parametrize("device", DEVICES)
def test_view_of_larger_matrices(device):
    """w1 and h1 as gptq() slices them: column blocks of wider matrices (row strides > B)."""
    w, h1, scale, zero, maxq = problem(60, 96, True, seed=3, device=device)
    got = gptq_kernel.quantize_block(w[:, 16:80], h1[16:80, 16:80], scale[:, 16:80], zero[:, 16:80], maxq)
    compare(got, reference(w[:, 16:80], h1[16:80, 16:80], scale[:, 16:80], zero[:, 16:80], maxq))


@pytest.mark.parametrize("device", DEVICES)
def test_rounds_half_to_even(device):
    """Exact .5 ratios round like torch.round (to even), and clamping to [0, maxq] holds at both ends."""
    b = 64
    halves = torch.arange(-12, 12, dtype=torch.float32) + 0.5  # -11.5 .. 11.5, past both clamps
    w = torch.stack([halves * s for s in (1.0, 0.5, 0.25, 2.0)])[:, :, None].expand(4, 24, b // 24 + 1)
    w = w.reshape(4, -1)[:, :b].contiguous().to(device)  # every row holds exact .5 multiples of its scale
    scale = torch.tensor([1.0, 0.5, 0.25, 2.0], device=device)[:, None].expand(4, b)
    zero = torch.full((4, b), 8.0, device=device)
    h1 = torch.eye(b, device=device)  # no error feedback: each column is rounded on its own
    codes, err = gptq_kernel.quantize_block(w, h1, scale, zero, 15)
    want = torch.clamp(torch.round(w / scale) + zero, 0, 15)
    assert torch.equal(codes, want.to(torch.uint8))
    assert torch.equal(err, w - (want - zero) * scale)
    assert set(torch.floor(w / scale).remainder(2).flatten().tolist()) == {0.0, 1.0}  # even and odd floors


def test_available():
    assert gptq_kernel.available("cpu") == gptq_kernel.INTERPRETED
    assert gptq_kernel.available("cuda") == torch.cuda.is_available()
    assert not gptq_kernel.available("meta")


def test_rejects_wide_blocks():
    w, h1, scale, zero, maxq = problem(4, 129, False, seed=0)
    with pytest.raises(ValueError, match="at most 128"):
        gptq_kernel.quantize_block(w, h1, scale, zero, maxq)
