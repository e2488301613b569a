"""Round-to-nearest: codes in range, error within half a step, extremes representable, bad configs refused."""

import pytest
import torch

from qconvert.algorithms.rtn import RTNConfig, rtn
from qconvert.errors import QConvertError


@pytest.mark.parametrize("bits,group,sym", [(4, 128, True), (4, 64, False), (8, -1, True), (8, 32, False)])
def test_error_is_at_most_half_a_step(bits, group, sym):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-2, 0, 256)  # columns of very different range
    qt = rtn(w, RTNConfig(bits, group, sym), scale_dtype=torch.float32)
    assert qt.codes.max() <= (1 << bits) - 1
    step = qt.scale[:, qt.column_groups()]
    assert ((qt.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_symmetric_represents_both_extremes():
    w = torch.tensor([[-8.0, 7.0, 0.5, -0.25] * 8])
    qt = rtn(w, RTNConfig(4, 32, True), scale_dtype=torch.float32)
    assert qt.dequantize()[0, 0] == -8.0 and qt.dequantize()[0, 1] == 7.0


def test_scale_is_rounded_to_storage_dtype_before_coding():
    """Codes must be computed with the stored (bf16) scale, or the file disagrees with the reference."""
    w = torch.randn(32, 128)
    qt = rtn(w, RTNConfig(4, 128, False), scale_dtype=torch.bfloat16)
    assert qt.scale.dtype == torch.bfloat16
    q = torch.round(w / qt.scale.float()) + qt.zero.float()
    assert torch.equal(q.clamp(0, 15).to(torch.uint8), qt.codes)


@pytest.mark.parametrize("kwargs", [dict(bits=3), dict(bits=16), dict(group_size=100), dict(group_size=0)])
def test_invalid_configs_are_refused(kwargs):
    with pytest.raises(QConvertError):
        RTNConfig(**kwargs)


def test_zero_rows_do_not_divide_by_zero():
    qt = rtn(torch.zeros(4, 128), RTNConfig(4, 128, True), scale_dtype=torch.float16)
    assert torch.isfinite(qt.dequantize()).all() and (qt.dequantize() == 0).all()
