"""FP8 KV cache: one k scale and one v scale per attention layer, calibrated on the keys and values the
cache stores (keys after any k-norm and RoPE), written the way vLLM and compressed-tensors read them:
`<layer>.self_attn.k_scale` / `v_scale` (shape [1], multipliers: cache = round(k / k_scale)) and
compressed-tensors' `kv_cache_scheme`.

Both calibration and evaluation reach those tensors through the one call every transformers attention
layer makes, `past_key_values.update(k, v, layer_idx)`: a stand-in cache handed to the decoder layer
sees them (and, in evaluation, returns them rounded as the engine would store them) whatever the
attention implementation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qconvert.algorithms.fp8 import to_fp8
from qconvert.quantized import FP8_MAX

CHOICES = ("fp8",)
ATTENTION = "self_attn"  # the attention module's name in every supported decoder layer
SCALES = ("k_scale", "v_scale")
# compressed-tensors QuantizationArgs: static per-tensor e4m3
SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True,
          "group_size": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {}}


class _CacheStandIn:
    """What an attention layer takes for its KV cache: keys and values pass through `fn`, nothing is kept."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        self.fn = fn

    def update(self, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        return self.fn(key, value)


class KVObserver:
    """The largest |k| and |v| one attention layer stores over the calibration data."""

    def __init__(self):
        self.amax: list[torch.Tensor] | None = None

    def cache(self) -> _CacheStandIn:
        def record(key, value):
            seen = [key.detach().abs().amax().float(), value.detach().abs().amax().float()]
            self.amax = seen if self.amax is None else [torch.maximum(a, b) for a, b in zip(self.amax, seen)]
            return key, value

        return _CacheStandIn(record)

    def reduce(self, ranks) -> None:
        """The largest over every rank's windows."""
        if ranks.active:
            self.amax = list(ranks.max_(torch.stack(self.amax)).unbind())

    def scales(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """{"k_scale", "v_scale"}: amax / 448 in `dtype`, rounded up so no calibrated value overflows
        the e4m3 range (an all-zero tensor gets 1)."""
        if self.amax is None:
            raise ValueError("no key or value was observed")
        return {name: _scale_up(a, dtype) for name, a in zip(SCALES, self.amax)}


def _scale_up(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    exact = amax.float().cpu() / FP8_MAX if amax > 0 else torch.tensor(1.0)
    scale = exact.to(dtype)
    if scale.float() < exact:
        scale = torch.nextafter(scale, torch.tensor(float("inf"), dtype=dtype))
    return scale.reshape(1)


def round_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x as the cache holds it: x / scale saturated to ±448, rounded to e4m3, times scale."""
    s = scale.float().to(x.device)
    return (to_fp8(x, s).float() * s).to(x.dtype)


def add_kv_rounding(layers: nn.ModuleList, scales: dict[int, dict[str, torch.Tensor]]) -> None:
    """Round what each listed decoder layer's attention stores in its KV cache to FP8 with its scales."""
    for index, s in scales.items():
        k_scale, v_scale = s["k_scale"], s["v_scale"]
        cache = _CacheStandIn(lambda k, v, ks=k_scale, vs=v_scale: (round_fp8(k, ks), round_fp8(v, vs)))
        layers[index].register_forward_pre_hook(
            lambda _m, args, kwargs, c=cache: (args, {**kwargs, "past_key_values": c}), with_kwargs=True)


def scale_names(layers_path: str, index: int) -> dict[str, str]:
    """Module-path names of layer `index`'s two scales (before the architecture's file renaming)."""
    return {s: f"{layers_path}.{index}.{ATTENTION}.{s}" for s in SCALES}
