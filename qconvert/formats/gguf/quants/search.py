"""ggml's per-block scale searches, vectorised across blocks.

Each function reproduces one routine of ggml-quants.c for many blocks at once: x is [n, *blocks]
(the in-block index first), per-block results have shape [*blocks]. Data-dependent branches become
masks; loops whose trip count depends on the data run until no block changes any more (an
iteration that changes nothing leaves the state as it was, so running on is harmless). Sums are
sequential in C order.

  make_qx_quants  -- symmetric, candidate scales -(nmax + 0.1*is)/max, is = -9..9   (rmse_type 1)
  make_q3_quants  -- symmetric, per-element coordinate refinement                   (do_rmse)
  make_qkx        -- asymmetric scale + min search (make_qkx2_quants / make_qkx3_quants with weights)
  make_qp_quants  -- non-negative values (sub-block scales) with weights
"""

from __future__ import annotations

import numpy as np
import torch

from .common import (
    F32, GROUP_MAX_EPS, ROUND_SAFE, _MAGIC, bits, div, eq, first_absmax, first_min, gt, iselect, le, lt,
    nan_to_zero, ne, nearest_int, recip, select, seq_sum, seq_sum_dim1, seq_sum_from_first,
)


def _consts(values, like: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.tensor(np.asarray(values, dtype=np.float32), device=like.device).view((len(values),) + (1,) * rank)


def _round_(v: torch.Tensor) -> torch.Tensor:
    """In place: nearest_int for |v| <= 4194303 (adding 1.5*2^23 rounds half to even)."""
    return v.add_(_MAGIC).sub_(_MAGIC)


# ---------------------------------------------------------------------------------------------
# make_qx_quants (rmse_type == 1): L in [0, 2*nmax), returns scale
# ---------------------------------------------------------------------------------------------

def _qx_numerators(nmax: int) -> list:
    # the initial iscale = -nmax / max, then -(nmax + 0.1f*is) / max for is = -9..9, is != 0
    nums = [np.float32(-nmax)]
    for step in range(-9, 10):
        if step:
            nums.append(-(np.float32(nmax) + np.float32(0.1) * np.float32(step)))
    return nums


def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) with weights w (C uses x*x when qw is NULL).

    Returns (scale [*B] float32, L [n, *B] int32 in 0..2*nmax-1). The 19 candidate scales do not
    depend on each other, so they are evaluated together; the choice is then made in C order."""
    n = x.shape[0]
    has_nan = bool(torch.isnan(x).any())       # only sub-block scales whose sums overflowed
    amax, mx = first_absmax(nan_to_zero(x) if has_nan else x)
    nums = _qx_numerators(nmax)
    k = len(nums)
    iscales = torch.div(_consts(nums, x, mx.dim()), mx)            # [k, *B]
    # |iscale * x| <= nmax + 1 since |x| <= |max|: clamping, then rounding half to even, is
    # ggml's MAX(-nmax, MIN(nmax-1, nearest_int(iscale*x)))
    l = x.unsqueeze(1) * iscales                                    # [n, k, *B]
    l.clamp_(-nmax, nmax - 1).round_()
    if has_nan:
        l = nan_to_zero(l)                                          # nearest_int(NaN) == 0
    terms = torch.empty((n, 2) + iscales.shape, dtype=F32, device=x.device)   # [n, 2, k, *B]
    torch.mul((w * x).unsqueeze(1), l, out=terms[:, 0])     # w*x[i]*l
    torch.mul(w.unsqueeze(1), l, out=terms[:, 1])           # w*l*l
    terms[:, 1].mul_(l)
    sums = seq_sum(terms)                                   # [2, k, *B]
    sumlx, suml2 = sums[0], sums[1]

    scale = select(bits(ne(suml2[0], 0.0)), div(sumlx[0], suml2[0]), 0.0)
    best = scale * sumlx[0]
    sel = torch.zeros(mx.shape, dtype=F32, device=x.device)
    for j in range(1, k):
        slx, sl2 = sumlx[j], suml2[j]
        cond = gt(sl2, 0.0).mul_(gt(slx * slx, best * sl2))
        m = bits(cond)
        new_scale = div(slx, sl2)
        scale = select(m, new_scale, scale)
        best = select(m, new_scale * slx, best)
        sel = torch.maximum(sel, cond.mul_(float(j)))
    idx = sel.to(torch.int64).unsqueeze(0).unsqueeze(0).expand((n, 1) + tuple(mx.shape))
    L = l.gather(1, idx)[:, 0].to(torch.int32).add_(nmax)
    keep = bits(1.0 - lt(amax, GROUP_MAX_EPS))               # C: amax < eps -> all zero
    return select(keep, scale, 0.0), iselect(keep.unsqueeze(0), L, 0)


# ---------------------------------------------------------------------------------------------
# make_q3_quants (do_rmse = true): L in [0, 2*nmax), returns scale
# ---------------------------------------------------------------------------------------------

def _sweep(x, w, wx, L, sums, lo, hi, need_sl2_pos):
    """One C sweep `for (i = 0; i < n; ++i)` over blocks [n, A]; L and sums [2, A] updated in place.
    Returns the float mask of blocks where something changed."""
    Li32 = L.view(torch.int32)
    sums32 = sums.view(torch.int32)
    changed = None
    for i in range(x.shape[0]):
        wi, wxi, Li = w[i], wx[i], L[i]
        sumlx, suml2 = sums[0], sums[1]
        slx = sumlx - wxi * Li
        sl2 = suml2 - (wi * Li).mul_(Li)
        nl = nearest_int(div(x[i] * sl2, slx))
        nl = nl.clamp_(lo, hi) if lo is not None else nl.clamp_(max=hi)
        nlf = nl.to(F32)
        cand = torch.stack((slx + wxi * nlf, sl2 + (wi * nlf).mul_(nlf)))     # slx, sl2 after the change
        slx2, sl22 = cand[0], cand[1]
        cond = gt(slx, 0.0).mul_(ne(nlf, Li))
        cond.mul_(gt(sl2 if need_sl2_pos else sl22, 0.0))
        cond.mul_(gt((slx2 * slx2).mul_(suml2), (sumlx * sumlx).mul_(sl22)))
        m = bits(cond)
        stored = nlf if lo is not None else nl.bitwise_and_(0xFF).to(F32)   # uint8_t L[] in make_qp_quants
        Li32[i].bitwise_xor_(torch.bitwise_xor(stored.view(torch.int32), Li32[i]).bitwise_and_(m))
        sums32.bitwise_xor_(torch.bitwise_xor(cand.view(torch.int32), sums32).bitwise_and_(m))
        changed = cond if changed is None else changed.add_(cond)
    return changed


def _refine(x, w, wx, L, sumlx, suml2, lo, hi, need_sl2_pos):
    """The (at most) 5 coordinate-refinement sweeps shared by make_q3_quants and make_qp_quants.

    L: float [n, *B] holding the stored L values; `lo`/`hi` clamp new_l (lo None: no lower clamp);
    make_qp_quants stores new_l as uint8_t (wrap) and tests sl2 > 0 before trying, make_q3_quants
    after. A block whose sweep changed nothing is final (another sweep would repeat it exactly),
    so each sweep runs only on the blocks the previous one changed.
    Returns (L, sumlx, suml2)."""
    n = x.shape[0]
    bshape = sumlx.shape
    xf, wf, wxf = x.reshape(n, -1), w.reshape(n, -1), wx.reshape(n, -1)
    L_all = L.reshape(n, -1).clone()
    sums_all = torch.stack((sumlx.reshape(-1), suml2.reshape(-1)))
    cur = None                                   # indices of the blocks still active
    xs, ws, wxs, Ls, sums = xf, wf, wxf, L_all.clone(), sums_all.clone()
    for sweep in range(5):
        changed = _sweep(xs, ws, wxs, Ls, sums, lo, hi, need_sl2_pos)
        if cur is None:
            L_all, sums_all = Ls, sums
        else:
            L_all.index_copy_(1, cur, Ls)
            sums_all.index_copy_(1, cur, sums)
        keep = changed.nonzero().squeeze(1)
        if sweep == 4 or keep.numel() == 0:
            break
        cur = keep if cur is None else cur.index_select(0, keep)
        xs, ws, wxs = xf.index_select(1, cur), wf.index_select(1, cur), wxf.index_select(1, cur)
        Ls, sums = Ls.index_select(1, keep), sums.index_select(1, keep)
    return L_all.reshape(L.shape), sums_all[0].reshape(bshape), sums_all[1].reshape(bshape)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    amax, mx = first_absmax(x)
    iscale = div(float(-nmax), mx)
    L = _round_(iscale * x).clamp_(-nmax, nmax - 1)   # float, values -nmax..nmax-1
    w = x * x
    wx = w * x
    sumlx = seq_sum(wx * L)
    suml2 = seq_sum((w * L).mul_(L))
    L, sumlx, suml2 = _refine(x, w, wx, L, sumlx, suml2, -nmax, nmax - 1, False)
    scale = select(bits(gt(suml2, 0.0)), div(sumlx, suml2), 0.0)
    Li = L.to(torch.int32).add_(nmax)
    keep = bits(1.0 - lt(amax, GROUP_MAX_EPS))
    return select(keep, scale, 0.0), iselect(keep.unsqueeze(0), Li, 0)


# ---------------------------------------------------------------------------------------------
# make_qkx2_quants / make_qkx3_quants (weights given): L in [0, nmax], returns (scale, -min)
# ---------------------------------------------------------------------------------------------

def make_qkx(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
             use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (scale [*B], the_min [*B] (= -min >= 0), L [n, *B] int32 in 0..nmax).

    The steps depend on each other (each uses the min found so far), so they run one by one.
    Rounding clamps first and then rounds to nearest even, which equals ggml's clamped nearest_int
    while |iscale*(x - min)| <= 4194303; if any candidate of any block could leave that range (a
    min that moved next to max, overflow), the whole call is redone with the exact nearest_int."""
    out = _make_qkx(x, w, nmax, rmin, rdelta, nstep, use_mad, exact=False)
    if out is None:
        out = _make_qkx(x, w, nmax, rmin, rdelta, nstep, use_mad, exact=True)
    return out


def _make_qkx(x, w, nmax, rmin, rdelta, nstep, use_mad, exact):
    n = x.shape[0]
    bshape = x.shape[1:]
    dev = x.device
    xmin = first_min(x)
    mx = x.amax(0)
    sw = seq_sum_from_first(torch.stack((w, w * x), 1))      # [n, 2, *B] -> [2, *B]: sum_w, sum_x
    mn = select(bits(gt(xmin, 0.0)), 0.0, xmin)             # if (min > 0) min = 0
    degenerate = eq(mx, mn)

    xm = torch.empty_like(x)
    la = torch.empty_like(x)
    diff = torch.empty_like(x)
    terms = torch.empty((n, 3) + tuple(bshape), dtype=F32, device=dev)
    t_wl, t_wll, t_wlx = terms[:, 0], terms[:, 1], terms[:, 2]

    def quantize_into(isc, m):
        torch.sub(x, m, out=xm)
        torch.mul(xm, isc, out=la)
        if exact:
            la.copy_(nearest_int(la).clamp_(0, nmax))
        else:
            la.clamp_(0, nmax).round_()   # clamping first is equivalent; then |v| <= nmax
        return la

    def error_of(scale, m):
        torch.mul(la, scale, out=diff)
        diff.add_(m).sub_(x)
        if use_mad:
            diff.abs_()
        else:
            diff.mul_(diff)
        diff.mul_(w)
        return seq_sum(diff)

    iscale = div(float(nmax), mx - mn)
    scale = recip(iscale)
    quantize_into(iscale, mn)
    best = error_of(scale, mn)

    hist_is = torch.empty((nstep + 2,) + tuple(bshape), dtype=F32, device=dev)   # iscale, min of
    hist_mn = torch.empty_like(hist_is)                                           # each candidate
    hist_is[0] = iscale
    hist_mn[0] = mn
    sel = torch.zeros(bshape, dtype=F32, device=dev)
    state = torch.stack((best, scale, mn))                     # best_error, scale, min
    zeros = torch.zeros(bshape, dtype=F32, device=dev)
    cs = [np.float32(rmin) + np.float32(rdelta) * np.float32(k) + np.float32(nmax) for k in range(nstep + 1)]
    cs = torch.tensor(np.asarray(cs, dtype=np.float32), device=dev).unbind(0)
    # sums = [sum_w, sum_x, sum_l, sum_l2, sum_xl]; products for D, this_scale and this_min numerators
    ia = torch.tensor([0, 2, 0, 1, 3, 2], device=dev)
    ib = torch.tensor([3, 2, 4, 2, 1, 4], device=dev)
    for step in range(nstep + 1):
        mn = state[2]
        hist_mn[step + 1] = mn
        isc = torch.div(cs[step], mx - mn, out=hist_is[step + 1])   # (rmin + rdelta*is + nmax)/(max - min)
        quantize_into(isc, mn)
        torch.mul(w, la, out=t_wl)         # w*l
        torch.mul(t_wl, la, out=t_wll)     # w*l*l
        torch.mul(t_wl, x, out=t_wlx)      # w*l*x[i]
        sums = torch.cat((sw, seq_sum(terms)))
        p = sums.index_select(0, ia).mul_(sums.index_select(0, ib))
        q = p[0::2] - p[1::2]              # D, sum_w*sum_xl - sum_x*sum_l, sum_l2*sum_x - sum_l*sum_xl
        tsm = q[1:] / q[0]                 # this_scale, this_min
        pos = bits(gt(tsm[1], 0.0))        # this_min > 0: this_min = 0, this_scale = sum_xl/sum_l2
        tsm = select(pos, torch.stack((div(sums[4], sums[3]), zeros)), tsm)
        cur = error_of(tsm[0], tsm[1])
        upd = gt(q[0], 0.0).mul_(lt(cur, state[0]))
        state = select(bits(upd), torch.stack((cur, tsm[0], tsm[1])), state)
        sel = torch.maximum(sel, upd.mul_(float(step + 1)))
    scale, mn = state[1], state[2]
    if not exact:
        # every |iscale*(x - min)| is <= |iscale| * max(|max - min|, |xmin - min|) (rounding is monotone);
        # all candidates of non-degenerate blocks must stay where the rounding shortcut is exact
        span = torch.maximum((mx - hist_mn).abs_(), (xmin - hist_mn).abs_())
        ok = le(span.mul_(hist_is.abs()), ROUND_SAFE).amin(0)
        if bool(torch.maximum(ok, degenerate).lt(1.0).any()):
            return None
    idx = sel.to(torch.int64).unsqueeze(0)
    quantize_into(hist_is.gather(0, idx), hist_mn.gather(0, idx))
    keep = bits(1.0 - degenerate)
    L = iselect(keep.unsqueeze(0), la.to(torch.int32), 0)
    return select(keep, scale, 0.0), -mn, L


# ---------------------------------------------------------------------------------------------
# make_qp_quants: x >= 0 (normally), weights qw; L stored as uint8_t; returns scale
# ---------------------------------------------------------------------------------------------

def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (scale [*B], L [n, *B] int32 holding the uint8_t values)."""
    mx = torch.zeros(x.shape[1:], dtype=F32, device=x.device)
    for xi in x.unbind(0):                                  # max = MAX(max, x[i]): a NaN restarts the scan
        mx = select(bits(gt(mx, xi)), mx, xi)
    keep = bits(1.0 - lt(mx, GROUP_MAX_EPS))
    iscale = div(float(nmax), mx)
    L0 = nearest_int(iscale * x).bitwise_and_(0xFF).to(F32)
    scale = recip(iscale)
    diff = x - scale * L0
    best = seq_sum((qw * diff).mul_(diff))
    steps = [s for s in range(-4, 5) if s]
    nums = [np.float32(0.1) * np.float32(s) + np.float32(nmax) for s in steps]
    isc = torch.div(_consts(nums, x, mx.dim()), mx)            # [8, *B]
    scl = recip(isc)
    l = nearest_int(isc.unsqueeze(1) * x).clamp_(max=nmax).to(F32)   # [8, n, *B]
    diff = x - scl.unsqueeze(1) * l
    mse = seq_sum_dim1((qw * diff).mul_(diff))                 # [8, *B]
    for j in range(len(steps)):
        m = bits(lt(mse[j], best))
        best = select(m, mse[j], best)
        iscale = select(m, isc[j], iscale)
    li = nearest_int(iscale * x).clamp_(max=nmax)
    l = li.to(F32)
    wx = qw * x
    sumlx = seq_sum(wx * l)
    suml2 = seq_sum((qw * l).mul_(l))
    L = li.bitwise_and_(0xFF).to(F32)
    L, sumlx, suml2 = _refine(x, qw, wx, L, sumlx, suml2, None, nmax, True)
    scale = select(bits(gt(suml2, 0.0)), div(sumlx, suml2), 0.0)
    return select(keep, scale, 0.0), iselect(keep.unsqueeze(0), L.to(torch.int32), 0)
