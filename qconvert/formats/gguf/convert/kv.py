"""An ordered GGUF key/value list with the same semantics as gguf.GGUFWriter's KV store: setting a key
again replaces its value but keeps its first position; empty strings and empty arrays are not written."""

from __future__ import annotations

from typing import Any

from gguf import GGUFValueType as T

KVItem = tuple[str, Any, T]


class KVList:
    def __init__(self) -> None:
        self._d: dict[str, tuple[Any, T]] = {}

    def set(self, key: str, value: Any, vtype: T) -> None:
        if vtype == T.STRING and not value:
            return
        if vtype == T.ARRAY and len(value) == 0:
            return
        self._d[key] = (value, vtype)

    def u32(self, key: str, value: int) -> None:
        self.set(key, int(value), T.UINT32)

    def f32(self, key: str, value: float) -> None:
        self.set(key, float(value), T.FLOAT32)

    def boolean(self, key: str, value: bool) -> None:
        self.set(key, bool(value), T.BOOL)

    def string(self, key: str, value: str) -> None:
        self.set(key, value, T.STRING)

    def array(self, key: str, value: list) -> None:
        self.set(key, value, T.ARRAY)

    def remove(self, key: str) -> None:
        self._d.pop(key, None)

    def extend(self, items: list[KVItem]) -> None:
        for key, value, vtype in items:
            self.set(key, value, vtype)

    def __contains__(self, key: str) -> bool:
        return key in self._d

    def get(self, key: str, default: Any = None) -> Any:
        return self._d[key][0] if key in self._d else default

    def items(self) -> list[KVItem]:
        return [(k, v, t) for k, (v, t) in self._d.items()]
