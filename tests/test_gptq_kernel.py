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


def reference(w, cols, t1, c1, scale, zero, groups, maxq):
    """The loop of gptq() in plain torch; also returns the pre-rounding values t / s."""
    w1, s1, z1 = w[:, cols].float(), scale[:, groups].float(), zero[:, groups]
    t = t1.clone()
    codes = torch.empty(t.shape, dtype=torch.uint8, device=t.device)
    err, ratio = torch.empty_like(t), torch.empty_like(t)
    for i in range(t.shape[1]):
        s, z = s1[:, i], z1[:, i]
        ratio[:, i] = t[:, i] / s
        q = torch.clamp(torch.round(t[:, i] / s) + z, 0, maxq)
        codes[:, i] = q.to(torch.uint8)
        e = w1[:, i] - (q - z) * s
        t[:, i + 1:] += e[:, None] * c1[i, i + 1:][None, :]
        err[:, i] = e
    return codes, err, ratio


def problem(rows, b, per_column, seed, bits=4, device="cpu", groups=1):
    """Random bf16 weights whose columns the block takes in a shuffled order, their targets (the weights plus
    earlier blocks' errors), the nearest-plane factor of random inputs' Hessian, 4-bit asymmetric min-max
    parameters: one scale and zero per row, or a different one per column (as many groups as columns)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, b, generator=g).to(torch.bfloat16)
    cols = torch.randperm(b, generator=g)
    t = w[:, cols].float() + 0.05 * torch.randn(rows, b, generator=g)
    x = torch.randn(4 * b, b, generator=g) + 0.3 * torch.randn(4 * b, 1, generator=g)  # correlated inputs
    h = x.T @ x / (4 * b) + 0.01 * torch.eye(b)
    r = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)  # H = R Rᵀ, R upper
    c1 = r / r.diagonal()[None, :]
    maxq = (1 << bits) - 1
    lo, hi = w.float().amin(1).clamp(max=0), w.float().amax(1).clamp(min=0)
    scale = ((hi - lo) / maxq)[:, None].to(torch.float16)
    zero = torch.round(-lo[:, None] / scale.float())
    groups = torch.zeros(b, dtype=torch.long)
    if per_column:
        scale = (scale.float() * (0.75 + 0.5 * torch.rand(rows, b, generator=g))).to(torch.float16)
        zero = (zero + torch.randint(-2, 3, (rows, b), generator=g)).clamp(0, maxq)
        groups = torch.randperm(b, generator=g)
    return (*(x.to(device) for x in (w, cols, t, c1, scale, zero, groups)), maxq)


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
@pytest.mark.parametrize("per_column", [False, True], ids=["per-row", "per-column"])
def test_matches_torch_loop(device, rows, b, per_column):
    args = problem(rows, b, per_column, seed=rows * b, device=device)
    assert gptq_kernel.available(device)
    before = [a.clone() for a in args[:-1]]
    got = gptq_kernel.quantize_block(*args)
    assert all(torch.equal(a, c) for a, c in zip(args, before))  # the inputs are left alone
    assert got[0].dtype == torch.uint8 and got[1].dtype == torch.float32
    compare(got, reference(*args))


@pytest.mark.parametrize("device", DEVICES)
def test_view_of_larger_matrices(device):
    """t1 and c1 as gptq() slices them: column blocks of wider matrices (row strides > B)."""
    w, cols, t, c1, scale, zero, groups, maxq = problem(60, 96, True, seed=3, device=device)
    part = (w, cols[16:80], t[:, 16:80], c1[16:80, 16:80], scale, zero, groups[16:80], maxq)
    compare(gptq_kernel.quantize_block(*part), reference(*part))


@pytest.mark.parametrize("device", DEVICES)
def test_rounds_half_to_even(device):
    """Exact .5 ratios round like torch.round (to even), and clamping to [0, maxq] holds at both ends."""
    b = 64
    halves = torch.arange(-12, 12, dtype=torch.float32) + 0.5  # -11.5 .. 11.5, past both clamps
    w = torch.stack([halves * s for s in (1.0, 0.5, 0.25, 2.0)])[:, :, None].expand(4, 24, b // 24 + 1)
    w = w.reshape(4, -1)[:, :b].contiguous().to(device)  # every row holds exact .5 multiples of its scale
    scale = torch.tensor([[1.0], [0.5], [0.25], [2.0]], device=device)
    zero = torch.full((4, 1), 8.0, device=device)
    c1 = torch.eye(b, device=device)  # no error feedback: each column is rounded on its own
    cols, groups = torch.arange(b, device=device), torch.zeros(b, dtype=torch.long, device=device)
    codes, err = gptq_kernel.quantize_block(w, cols, w, c1, scale, zero, groups, 15)
    want = torch.clamp(torch.round(w / scale) + zero, 0, 15)
    assert torch.equal(codes, want.to(torch.uint8))
    assert torch.equal(err, w - (want - zero) * scale)
    assert set(torch.floor(w / scale).remainder(2).flatten().tolist()) == {0.0, 1.0}  # even and odd floors


def test_available():
    assert gptq_kernel.available("cpu") == gptq_kernel.INTERPRETED
    assert gptq_kernel.available("cuda") == torch.cuda.is_available()
    assert not gptq_kernel.available("meta")


def test_rejects_wide_blocks():
    w, cols, t, c1, scale, zero, groups, maxq = problem(4, 129, False, seed=0)
    with pytest.raises(ValueError, match="at most 128"):
        gptq_kernel.quantize_block(w, cols, t, c1, scale, zero, groups, maxq)
