"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"): per input channel, move a scale s from the op that writes a linear's input into the
linear (W·diag(s), previous op ÷ s), which leaves the float model unchanged but lets the channels
that carry large activations keep more precision; s is searched per block on its own calibration
activations. Then each group's weight range is clipped where that lowers the output error, and the
weights are rounded (min-max, with a zero point by default).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from itertools import zip_longest

import torch
from torch import nn

from qconvert import distributed
from qconvert.algorithms import Algorithm, InputSet, register
from qconvert.algorithms.rtn import BITS, RTNConfig, check_bits_and_group, fake_quantize_groups, rtn
from qconvert.errors import QConvertError
from qconvert.model.architectures import ScaleGroup

SCALE_SEARCHES = ("duo", "activation", "both")
NO_CLIP = re.compile(r"(^|\.)(q_proj|k_proj|qkv_proj)$")  # clipping q/k hurts the attention scores


@dataclass(frozen=True)
class AWQConfig:
    """scale_search: "duo" s = mean|x|^α / mean|ŵ|^(1-α) (ŵ: weights normalised per group),
    "activation" s = mean|x|^α, or "both"; α on a `grid`-point grid in [0, 1). clip: search a
    per-group range shrink of up to `max_shrink` on `clip_tokens` sampled tokens. The activation
    statistics use every calibration token; the search's output error is measured on the first
    `search_tokens` of them (a 20-point grid needs far fewer than the statistics, and the search
    dominates AWQ's run time and memory)."""

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    scale_search: str = "duo"
    grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    clip_tokens: int = 512
    search_tokens: int = 16384

    def __post_init__(self):
        check_bits_and_group(self.bits, self.group_size, BITS)
        if self.scale_search not in SCALE_SEARCHES:
            raise QConvertError(f"--scale-search {self.scale_search}: choose from {', '.join(SCALE_SEARCHES)}")

    calibrated = True  # needs calibration data (its activation statistics and search)

    @property
    def rounding(self) -> RTNConfig:
        return RTNConfig(self.bits, self.group_size, symmetric=not self.zero_point)


@dataclass
class _Group:
    """One ScaleGroup resolved in a block, with what the reference pass recorded for it."""

    prev: nn.Module
    prev_names: list[str]  # parameters of prev that the fold changes
    prev_rows: str
    names: list[str]
    linears: list[nn.Linear]
    inspect: nn.Module
    also: list[nn.Module]
    calls: list[tuple[tuple, dict]] = field(default_factory=list)  # the inspect module's first calls
    stored_tokens: int = 0
    abs_sum: torch.Tensor | float = 0.0  # Σ|x| per input channel over every token
    abs_max: torch.Tensor | float = 0.0  # max |x| per input channel (SmoothQuant)
    # Σx² per input channel, summed only when a caller starts it at 0 (GGUF AWQ's importance): a second pass
    # over every calibration token that int4 AWQ does not need
    square_sum: torch.Tensor | float | None = None
    tokens: int = 0
    scale: torch.Tensor | None = None

    def record(self, args: tuple, kwargs: dict, limit: int) -> None:
        x = _input_of(args, kwargs)
        n = x.numel() // x.shape[-1]
        a = x.reshape(n, -1).abs().float()
        self.abs_sum = self.abs_sum + a.sum(0)
        if self.square_sum is not None:
            self.square_sum = self.square_sum + a.square().sum(0)
        self.abs_max = torch.maximum(torch.as_tensor(self.abs_max, device=a.device), a.amax(0))
        self.tokens += n
        if self.stored_tokens < limit:
            self.calls.append((args, kwargs))
            self.stored_tokens += n

    def reduce(self, ranks) -> None:
        """The statistics of every rank's tokens."""
        if not ranks.active:
            return
        width, device = self.linears[0].in_features, self.linears[0].weight.device
        vector = lambda v: v if isinstance(v, torch.Tensor) else torch.full((width,), float(v), device=device)  # noqa: E731
        self.abs_sum = ranks.sum_(vector(self.abs_sum))
        if self.square_sum is not None:
            self.square_sum = ranks.sum_(vector(self.square_sum))
        self.abs_max = ranks.max_(vector(self.abs_max))
        (tokens,) = ranks.add([self.tokens])
        self.tokens = int(tokens)


def _expand(spec: ScaleGroup, names: list[str]) -> list[ScaleGroup]:
    """A `*` group becomes one group per expert index found among the block's linears."""
    if "*" not in spec.prev:
        return [spec]
    pattern = re.compile(re.escape(spec.linears[0]).replace(r"\*", r"(\d+)"))
    experts = sorted({m.group(1) for n in names if (m := pattern.fullmatch(n))}, key=int)
    return [ScaleGroup(spec.prev.replace("*", e), tuple(p.replace("*", e) for p in spec.linears),
                       spec.inspect.replace("*", e), spec.also, spec.prev_rows) for e in experts]


def resolve_groups(block: nn.Module, specs, sets: list[InputSet]) -> list[_Group]:
    linears = {n: lin for s in sets for n, lin in zip(s.names, s.linears)}
    modules = dict(block.named_modules())
    groups = []
    for spec in (g for spec in specs for g in _expand(spec, list(linears))):
        names = [n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in spec.linears)]
        prev = modules.get(spec.prev)
        if not names or prev is None or spec.inspect not in modules:
            continue  # e.g. the dense-MLP groups in a MoE layer
        rows = prev.weight.shape[0] // (2 if spec.prev_rows == "second_half" else 1)
        if isinstance(prev, nn.Linear) and rows != linears[names[0]].in_features:
            continue  # grouped-query attention: v's rows are not o's columns
        prev_names = [f"{spec.prev}.{p}" for p, _ in prev.named_parameters()]
        groups.append(_Group(prev, prev_names, spec.prev_rows, names, [linears[n] for n in names],
                             modules[spec.inspect], [modules[a] for a in spec.also if a in modules]))
    return groups


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output_of(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _TokenSample:
    """Every `stride`-th token of each calibration window a linear reads, for the clipping search."""

    def __init__(self, stride: int = 16):
        self.stride, self.parts = stride, []

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.dim() == 3:  # [windows, tokens, in]: one part per window
            self.parts.extend(x[:, :: self.stride].unbind(0))
        else:
            self.parts.append(x.reshape(-1, x.shape[-1])[:: self.stride])

    def take(self, n: int, ranks: distributed.Ranks = distributed.Ranks()) -> torch.Tensor | None:
        parts = self.parts
        if ranks.active:  # rank r's window j is window r + j·world: every window, in the single-process order
            sizes = [p.shape[0] for p in parts]
            every = ranks.gather((torch.cat(parts) if parts else None, sizes))
            split = [list(x.split(s)) if x is not None else [] for x, s in every]
            parts = [p for row in zip_longest(*split) for p in row if p is not None]
        if not parts:
            return None
        x = torch.cat(parts)
        return x[torch.linspace(0, x.shape[0] - 1, min(n, x.shape[0]), device=x.device).round().long()]


@register(AWQConfig)
class AWQ(Algorithm):
    divides_work = True  # the search and clipping are divided among ranks; the rounding itself is cheap
    tries_no_scale = False  # s = 1 among the candidates (AWQ's grid does not hold it)

    def __init__(self, config: AWQConfig, arch):
        super().__init__(config, arch)
        if not arch.scale_groups:
            raise QConvertError(f"AWQ: no scale groups are known for architecture '{arch.name}'")
        self.groups: list[_Group] = []
        self.samples: dict[tuple, _TokenSample] = {}

    def observe(self, block, sets):
        self.groups = resolve_groups(block, self.arch.scale_groups, sets)
        handles = []
        # each rank keeps its share of the search tokens: together, the windows one process would keep
        limit = self.config.search_tokens // distributed.current().world
        for g in self.groups:
            record = lambda _m, args, kwargs, g=g: g.record(args, kwargs, limit)  # noqa: E731
            handles.append(g.inspect.register_forward_pre_hook(record, with_kwargs=True))
        self.samples = {}
        if self.config.clip:
            for s in sets:
                sample = self.samples[s.key] = _TokenSample()
                handles.append(s.linears[0].register_forward_pre_hook(lambda _m, args, t=sample: t.update(args[0])))
        return handles

    @torch.no_grad()
    def transform(self, block, sets):
        ranks = distributed.current()
        for g in self.groups:
            g.reduce(ranks)
            g.scale = self._search(g, ranks) if g.tokens else None
        changed = set()
        for g in self.groups:
            if g.scale is not None:
                changed |= self._fold(block, g)
            g.calls.clear()
        if self.config.clip:
            for s in sets:
                x = self.samples[s.key].take(self.config.clip_tokens, ranks)
                if x is None:
                    continue
                for name, lin in zip(s.names, s.linears):
                    if not NO_CLIP.search(name):
                        lin.weight.data = _clip_rows(lin.weight, x / self._scale_of(lin, x), self.config, ranks)
        self.samples = {}
        return changed

    def _scale_of(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor | float:
        for g in self.groups:
            if g.scale is not None and any(linear is lin for lin in g.linears):
                return g.scale.to(x.dtype)
        return 1.0

    def _search(self, g: _Group, ranks: distributed.Ranks) -> torch.Tensor:
        """The per-channel scale with the lowest output error of g.inspect after quantization, over every
        rank's search windows. Among several ranks each gathers all the windows and tries its share of
        the candidates: the weights are rounded once per candidate, not once per candidate on every rank."""
        cfg = self.config
        x_mean = g.abs_sum / max(g.tokens, 1)
        originals = [lin.weight.data.clone() for lin in g.linears]
        w_mean = _normalised_weight_mean(torch.cat(originals), cfg.group_size)
        variants = {"duo": [True], "activation": [False], "both": [True, False]}[cfg.scale_search]
        candidates = [torch.ones_like(x_mean)] if self.tries_no_scale else []
        for duo in variants:
            for step in range(cfg.grid):
                alpha = step / cfg.grid
                s = x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4) if duo else x_mean.pow(alpha)
                s = s.clamp(min=1e-4)
                candidates.append(s / (s.max() * s.min()).sqrt())
        calls = [c for part in ranks.gather(g.calls) for c in part] if ranks.active else g.calls
        reference = [_output_of(g.inspect(*a, **k)) for a, k in calls]
        losses = torch.zeros(len(candidates), dtype=torch.float64, device=x_mean.device)
        for i in range(ranks.rank, len(candidates), ranks.world):
            s = candidates[i]
            for lin, w in zip(g.linears, originals):
                lin.weight.data = (self._fake_quantize(lin, w.float() * s, s, g) / s).to(w.dtype)
            for (a, k), r in zip(calls, reference):
                losses[i] += (_output_of(g.inspect(*a, **k)).float() - r.float()).pow(2).sum()
        for lin, w in zip(g.linears, originals):
            lin.weight.data = w
        losses = ranks.sum_(losses).nan_to_num(nan=float("inf"))
        best = int(torch.argmin(losses))  # the first of equal losses, as a sequential search keeps it
        return candidates[best] if bool(losses[best].isfinite()) else torch.ones_like(x_mean)

    def _fake_quantize(self, linear: nn.Linear, w: torch.Tensor, s: torch.Tensor, g: _Group) -> torch.Tensor:
        """w (linear's weights × s) rounded as the output will round it."""
        return _fake_quantize(w, self.config)

    def _fold(self, block: nn.Module, g: _Group) -> set[str]:
        return fold_scale(block, g, g.scale, self.arch.norm_offset)

    def quantize(self, inputs, stats, scale_dtype):
        return [rtn(lin.weight, self.config.rounding, scale_dtype=scale_dtype) for lin in inputs.linears]


def fold_scale(block: nn.Module, g: _Group, s: torch.Tensor, norm_offset: float) -> set[str]:
    """prev's output ÷ s, the linears' (and routers') input columns × s: the float block is unchanged.
    Returns the names of the non-linear parameters changed."""
    prev = g.prev
    if isinstance(prev, nn.Linear):
        rows = slice(prev.weight.shape[0] // 2, None) if g.prev_rows == "second_half" else slice(None)
        prev.weight.data[rows] = (prev.weight.data[rows].float() / s[:, None]).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias.data[rows] = (prev.bias.data[rows].float() / s).to(prev.bias.dtype)
    else:  # a norm: y = x̂ · (offset + w)
        w = prev.weight.data
        prev.weight.data = ((norm_offset + w.float()) / s - norm_offset).to(w.dtype)
    for lin in [*g.linears, *g.also]:
        lin.weight.data = (lin.weight.data.float() * s).to(lin.weight.dtype)
    names = {n for n in g.prev_names if not isinstance(prev, nn.Linear) or n.endswith(".bias")}
    modules = {id(m): n for n, m in block.named_modules()}
    names |= {f"{modules[id(m)]}.weight" for m in g.also}
    return names


def _fake_quantize(w: torch.Tensor, cfg: AWQConfig) -> torch.Tensor:
    g = w.shape[1] if cfg.group_size == -1 else cfg.group_size
    return fake_quantize_groups(w.reshape(w.shape[0], -1, g), cfg.bits, not cfg.zero_point).reshape(w.shape)


def _normalised_weight_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| / max|w| of its group: how large each input column's weights are."""
    g = w.shape[1] if group_size == -1 else group_size
    wg = w.float().abs().reshape(w.shape[0], -1, g)
    wg = wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)
    return wg.reshape(w.shape).mean(0)


def _clip_rows(w: torch.Tensor, x: torch.Tensor, cfg: AWQConfig, ranks: distributed.Ranks) -> torch.Tensor:
    """clip_range, its rows shared out among the ranks (each row's search is its own)."""
    if not ranks.active or w.shape[0] < ranks.world:
        return clip_range(w, x, cfg)
    return ranks.stack_rows(clip_range(w[ranks.row_share(w.shape[0])], x, cfg), w.shape[0])


@torch.no_grad()
def clip_range(w: torch.Tensor, x: torch.Tensor, cfg: AWQConfig) -> torch.Tensor:
    """w [out, in] with each group clamped to ±m, m = max|w| · (1 − i/grid) chosen per group for the
    lowest error of that group's partial output Σ_k x_k w_k on the sampled tokens x [n, in]."""
    out, cols = w.shape
    g = cols if cfg.group_size == -1 else cfg.group_size
    groups = cols // g
    xg = x.float().reshape(-1, groups, g).permute(1, 2, 0)  # [groups, g, n]
    chunk = max(1, 2**26 // (groups * x.shape[0]))  # rows per step: bounds the [rows, groups, n] products
    clipped = torch.empty_like(w)
    for r0 in range(0, out, chunk):
        wg = w[r0:r0 + chunk].float().reshape(-1, groups, g)
        reference = torch.einsum("rgk,gkn->rgn", wg, xg)
        top = wg.abs().amax(dim=-1, keepdim=True)
        best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)
        best_top = top.clone()
        for i in range(int(cfg.max_shrink * cfg.grid)):
            m = top * (1 - i / cfg.grid)
            q = fake_quantize_groups(torch.clamp(wg, -m, m), cfg.bits, not cfg.zero_point)
            err = (torch.einsum("rgk,gkn->rgn", q, xg) - reference).pow(2).mean(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_top = torch.where(better[..., None], m, best_top)
        clipped[r0:r0 + chunk] = torch.clamp(wg, -best_top, best_top).reshape(-1, cols).to(w.dtype)
    return clipped
