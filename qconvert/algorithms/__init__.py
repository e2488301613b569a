"""Quantization algorithms: pure functions from a weight (and its statistics) to a QuantizedTensor.

Each algorithm's config dataclass is registered with its function here, the one place the engine
looks them up.
"""

from __future__ import annotations

from collections.abc import Callable

_QUANTIZERS: dict[type, Callable] = {}


def register(config_type: type):
    def wrap(fn: Callable) -> Callable:
        if config_type in _QUANTIZERS:
            raise ValueError(f"{config_type.__name__} registered twice")
        _QUANTIZERS[config_type] = fn
        return fn

    return wrap


def quantizer_for(config) -> Callable:
    # importing the modules registers them
    from qconvert.algorithms import rtn  # noqa: F401

    try:
        return _QUANTIZERS[type(config)]
    except KeyError:
        raise ValueError(f"no quantizer registered for {type(config).__name__}") from None
