"""GPTQ: lower output error than RTN for a known Hessian, act-order with and without static groups,
dead columns, dampening that grows with a warning, and the command on every architecture."""

import logging

import pytest
import torch

from qconvert.algorithms.gptq import GPTQConfig, Hessian, gptq, inverse_cholesky, plane_factor
from qconvert.algorithms.rtn import RTNConfig, rtn
from qconvert.errors import QConvertError
from qconvert.testing.tiny_models import ARCHITECTURES


def _layer(rows=48, cols=256, tokens=2048, seed=0):
    """Correlated inputs with a few loud channels, as in real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix
    x[:, :8] *= 10
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, x


def _output_error(x, w, q):
    return float((x @ (w - q).T).pow(2).sum())


def _hessian(x):
    h = Hessian(x.shape[1], x.device)
    for part in x.split(500):  # running mean over uneven batches equals the one-shot 2/n XᵀX
        h.update(part)
    torch.testing.assert_close(h.matrix, 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-3)
    return h.matrix


@pytest.mark.parametrize("bits,group,sym", [(4, 128, True), (4, 32, False), (8, -1, True), (3, 64, True), (2, 128, False)])
def test_output_error_below_rtn(bits, group, sym):
    w, x = _layer()
    h = _hessian(x)
    qt = gptq(w, [h.clone()], GPTQConfig(bits, group, sym), torch.float16)
    assert int(qt.codes.max()) < 2**bits and qt.g_idx is None
    ref = rtn(w, RTNConfig(8 if bits == 8 else 4, group, sym), scale_dtype=torch.float16) if bits in (4, 8) else None
    err = _output_error(x, w, qt.dequantize().float())
    if ref is not None:
        assert err < 0.8 * _output_error(x, w, ref.dequantize().float())
    # against GPTQ's own rounding without error feedback (H = I)
    plain = gptq(w, [torch.eye(w.shape[1])], GPTQConfig(bits, group, sym), torch.float16)
    assert err < 0.8 * _output_error(x, w, plain.dequantize().float())


@pytest.mark.parametrize("static", [False, True])
def test_act_order(static):
    w, x = _layer(seed=1)
    x[:, 100:110] *= 30  # loud channels away from the start, so the order really changes
    h = _hessian(x)
    cfg = GPTQConfig(4, 64, True, act_order=True, static_groups=static)
    qt = gptq(w, [h.clone()], cfg, torch.float16)
    plain = gptq(w, [h.clone()], GPTQConfig(4, 64, True, act_order=False), torch.float16)
    if static:
        assert qt.g_idx is None  # groups stay the contiguous column ranges
    else:
        assert qt.g_idx is not None and qt.g_idx.dtype == torch.int32
        assert torch.bincount(qt.g_idx.long()).tolist() == [64] * 4  # every group holds group_size columns
        assert not torch.equal(qt.g_idx.long(), torch.arange(256) // 64)
        loud = torch.argsort(torch.diag(h), descending=True)[:64]
        assert (qt.g_idx[loud] == 0).all()  # the loudest columns were quantized first, in group 0
    err = _output_error(x, w, qt.dequantize().float())
    assert err < 1.05 * _output_error(x, w, plain.dequantize().float())


def test_shared_input_linears_swept_together_equal_alone():
    """q/k/v share H; sweeping them as one matrix must equal sweeping each alone (rows are independent)."""
    w, x = _layer(rows=96)
    h = _hessian(x)
    together = gptq(w, [h.clone()], GPTQConfig(4, 128, False), torch.bfloat16)
    alone = gptq(w[:40], [h.clone()], GPTQConfig(4, 128, False), torch.bfloat16)
    assert torch.equal(together.codes[:40], alone.codes) and torch.equal(together.scale[:40], alone.scale)


def test_dead_columns():
    w, x = _layer()
    x[:, 5] = 0
    qt = gptq(w, [_hessian(x)], GPTQConfig(4, 128, True), torch.float16)
    dq = qt.dequantize().float()
    assert torch.isfinite(dq).all()
    # the dead column is still rounded from its own weights, not zeroed
    assert (dq[:, 5] - w[:, 5]).abs().max() <= qt.scale[:, 0].float().max()


def test_indefinite_hessian_raises_damp_with_warning(caplog):
    h = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    with caplog.at_level(logging.WARNING):
        factor = inverse_cholesky([h.flip(0, 1)], 0.01, "layer.x")
    assert torch.isfinite(factor).all() and "used damp" in caplog.text and "layer.x" in caplog.text
    with pytest.raises(QConvertError, match="stays singular"):
        inverse_cholesky([torch.tensor([[-1e9, 0.0], [0.0, 1.0]])], 0.01, "layer.y")


def test_inverse_cholesky_is_the_upper_factor_of_the_inverse():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=g, dtype=torch.float64)
    h = a @ a.T / 64
    damped = h + 0.01 * torch.diag(h).mean() * torch.eye(64, dtype=torch.float64)
    want = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    got = inverse_cholesky([h.flip(0, 1).clone()], 0.01)
    torch.testing.assert_close(got, want)


def test_nearest_plane_sweep_equals_error_feedback_through_the_inverse():
    """gptq()'s sweep (targets from plane_factor's C and the rounding errors so far) makes the codes of GPTQ's
    own loop (errors fed forward through U, the Cholesky factor of the inverse), in float64 where rounding
    noise cannot move a value across a boundary."""
    w, x = _layer(rows=32, cols=96, seed=2)
    w, h = w.double(), (2 / x.shape[0] * x.T @ x).double()
    u = inverse_cholesky([h.flip(0, 1).clone()], 0.01)
    c = plane_factor([h.flip(0, 1).clone()], 0.01)
    assert torch.equal(c, c.triu()) and torch.allclose(c.diagonal(), torch.ones(96, dtype=torch.float64))
    step = 0.02
    fed, codes_u = w.clone(), torch.empty_like(w)
    for i in range(96):
        codes_u[:, i] = torch.round(fed[:, i] / step)
        e = (fed[:, i] - codes_u[:, i] * step) / u[i, i]
        fed[:, i:] -= e[:, None] * u[i, i:][None, :]
    target, codes_c = w.clone(), torch.empty_like(w)
    for i in range(96):
        codes_c[:, i] = torch.round(target[:, i] / step)
        target[:, i + 1:] += (w[:, i] - codes_c[:, i] * step)[:, None] * c[i, i + 1:][None, :]
    assert torch.equal(codes_c, codes_u)
    assert not torch.equal(codes_c, torch.round(w / step))  # the feedback changed some codes


@pytest.mark.parametrize("kwargs", [dict(bits=5), dict(group_size=48), dict(damp=0), dict(damp=1.5), dict(block_size=0)])
def test_invalid_configs_are_refused(kwargs):
    with pytest.raises(QConvertError):
        GPTQConfig(**kwargs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_runs(tiny, qconvert, tmp_path, arch):
    out = tmp_path / "out"
    res = qconvert("gptq", tiny(arch), "-o", out, "--format", "compressed-tensors", "--group", "64",
                   "--samples", "4", "--seq-len", "32", "--json")
    assert res.code == 0, res.err
    summary = res.json()
    assert summary["method"] == "gptq" and all(layer["output_error"] < 0.1 for layer in summary["layers"])
    assert (out / "config.json").exists()


@pytest.mark.parametrize("n", [1, 37, 300, 1031])
def test_invert_lower_by_halves(n):
    """The recursive inverse (leaves small enough to recurse several levels) equals a triangular solve."""
    from qconvert.algorithms.gptq import invert_lower

    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    m = torch.linalg.cholesky(x.T @ x / n + 0.1 * torch.eye(n, dtype=torch.float64))
    want = torch.linalg.solve_triangular(m, torch.eye(n, dtype=torch.float64), upper=False)
    got = m.clone()
    invert_lower(got, leaf=16)
    assert torch.allclose(got, want, rtol=0, atol=1e-10 * float(want.abs().max()))
    assert torch.equal(got.triu(1), torch.zeros_like(got))


def test_gpu_warm_up_runs_on_any_device():
    """The engine's warm-up (run in a thread on GPUs) goes through the same calls as a conversion."""
    from qconvert.algorithms import algorithm_for
    from qconvert.engine import EngineOptions, _warm_up

    _warm_up(EngineOptions(device=torch.device("cpu"), dtype=torch.bfloat16))
    for job in algorithm_for(GPTQConfig(), None).warm_ups(torch.device("cpu")):
        job()
