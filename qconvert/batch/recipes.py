"""A recipe: method + parameters + calibration + output format + quality gates, read from YAML.

    name: w4a16-gptq
    description: ...
    method: gptq                      # rtn, gptq, awq, fp8, int8 or gguf
    params: {bits: 4, group_size: 128} # the method's settings (its config's fields; gguf: type, imatrix, method)
    calibration: {dataset: mixed, samples: 128, seq_len: 512, seed: 0}
    format: gptq                      # the method's output layout (default: its first); a list writes
                                      # several from one pass, each in OUT/<format>
    kv_cache: fp8                     # optional
    gates: {max_ppl_increase_pct: 30, max_kl: 0.3}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qconvert.errors import QConvertError
from qconvert.pipeline import FORMATS, Calibration

KEYS = ("name", "description", "method", "params", "calibration", "format", "kv_cache", "gates")
GATES = ("max_ppl_increase_pct", "max_kl")
GGUF_PARAMS = {"type": str, "imatrix": bool, "method": str}


@dataclass(frozen=True)
class Gates:
    max_ppl_increase_pct: float | None = None
    max_kl: float | None = None

    def check(self, evaluation: dict) -> list[dict]:
        """One verdict per gate set: the limit, the measured value, and whether it held."""
        measured = {"max_ppl_increase_pct": 100 * (evaluation["perplexity"] / evaluation["base_perplexity"] - 1),
                    "max_kl": evaluation["kl_divergence"]}
        return [{"gate": g, "limit": limit, "value": measured[g], "passed": measured[g] <= limit}
                for g in GATES if (limit := getattr(self, g)) is not None]

    @property
    def any(self) -> bool:
        return any(getattr(self, g) is not None for g in GATES)


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str
    params: dict
    format: tuple[str, ...] = ()  # empty: the method's default layout
    calibration: Calibration | None = None
    kv_cache: str | None = None
    gates: Gates = field(default_factory=Gates)
    description: str = ""

    @property
    def output_is_file(self) -> bool:
        return self.method == "gguf"

    def config(self):
        """The method's config dataclass built from params (gguf: None)."""
        if self.method == "gguf":
            return None
        return _config_type(self.method)(**self.params)


def _config_type(method: str):
    from qconvert.algorithms.awq import AWQConfig
    from qconvert.algorithms.fp8 import FP8Config
    from qconvert.algorithms.gptq import GPTQConfig
    from qconvert.algorithms.int8 import INT8Config
    from qconvert.algorithms.rtn import RTNConfig

    return {"rtn": RTNConfig, "gptq": GPTQConfig, "awq": AWQConfig, "fp8": FP8Config, "int8": INT8Config}[method]


def bundled_dir() -> Path:
    pkg = Path(__file__).resolve().parent.parent
    for candidate in (pkg / "recipes", pkg.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise QConvertError("the bundled recipes folder is missing from this installation")


def bundled() -> list[Recipe]:
    return [load(p) for p in sorted(bundled_dir().glob("*.yaml"))]


def resolve(spec: str) -> Path:
    """A recipe file path, or the name of a bundled recipe."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    named = bundled_dir() / f"{spec}.yaml"
    if named.is_file():
        return named
    names = ", ".join(p.stem for p in sorted(bundled_dir().glob("*.yaml")))
    raise QConvertError(f"recipe '{spec}': no such file and no bundled recipe of that name (bundled: {names})")


def load(spec: str | Path) -> Recipe:
    path = resolve(str(spec))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise QConvertError(f"{path}: not valid YAML ({exc})") from None
    return parse(data, str(path))


def parse(data, where: str) -> Recipe:
    if not isinstance(data, dict):
        raise QConvertError(f"{where}: a recipe is a mapping with keys {', '.join(KEYS)}")
    _only(data, KEYS, where)
    method = _required(data, "method", where)
    methods = (*FORMATS, "gguf")
    if method not in methods:
        raise QConvertError(f"{where}: method '{method}' is not one of {', '.join(methods)}")
    params = _mapping(data.get("params", {}), f"{where}: params")
    _check_params(method, params, where)
    fmt = data.get("format")
    if method == "gguf" and fmt is not None:
        raise QConvertError(f"{where}: format: gguf recipes write a .gguf file, leave format out")
    fmt = tuple(fmt) if isinstance(fmt, list) else (fmt,) if fmt is not None else ()
    for f in fmt:
        if f not in FORMATS[method]:
            raise QConvertError(f"{where}: format '{f}' is not one of {', '.join(FORMATS[method])} (for {method})")
    cal = data.get("calibration")
    if cal is not None:
        cal = _mapping(cal, f"{where}: calibration")
        _only(cal, [f.name for f in dataclasses.fields(Calibration)], f"{where}: calibration")
        cal = Calibration(**cal)
    gates = _mapping(data.get("gates", {}), f"{where}: gates")
    _only(gates, GATES, f"{where}: gates")
    for key, value in gates.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise QConvertError(f"{where}: gates.{key}: a number >= 0, not {value!r}")
    recipe = Recipe(name=str(data.get("name") or Path(where).stem), method=method, params=params, format=fmt,
                    calibration=cal, kv_cache=data.get("kv_cache"), gates=Gates(**gates),
                    description=str(data.get("description", "")))
    try:
        recipe.config()  # the config's own checks (bits, group, scheme ...)
    except QConvertError as exc:
        raise QConvertError(f"{where}: params: {exc}") from None
    return recipe


def _check_params(method: str, params: dict, where: str) -> None:
    if method == "gguf":
        types = GGUF_PARAMS
        if "type" not in params:
            raise QConvertError(f"{where}: params.type is required for gguf (e.g. Q4_K_M)")
        from qconvert.gguf_pipeline import parse_type

        try:
            parse_type(str(params["type"]))
        except QConvertError as exc:
            raise QConvertError(f"{where}: params.type: {exc}") from None
        from qconvert.gguf_pipeline import METHODS

        if params.get("method", "plain") not in METHODS:
            raise QConvertError(f"{where}: params.method: '{params['method']}' is not one of {', '.join(METHODS)}")
    else:
        types = {f.name: f.type for f in dataclasses.fields(_config_type(method)) if f.name != "zero_floor"}
    _only(params, types, f"{where}: params (for {method})")
    for key, value in params.items():
        expected = types[key] if isinstance(types[key], type) else _type_of(types[key])
        if value is not None and not _matches(value, expected):
            raise QConvertError(f"{where}: params.{key}: expected {expected}, got {value!r}")


def _type_of(annotation: str) -> str:
    return annotation.replace(" | None", "")


def _matches(value, expected) -> bool:
    name = expected if isinstance(expected, str) else expected.__name__
    if name == "bool":
        return isinstance(value, bool)
    if name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "str":
        return isinstance(value, str)
    return True


def _only(data: dict, allowed, where: str) -> None:
    for key in data:
        if key not in allowed:
            raise QConvertError(f"{where}: unknown key '{key}' (allowed: {', '.join(allowed)})")


def _required(data: dict, key: str, where: str):
    if key not in data:
        raise QConvertError(f"{where}: '{key}' is required")
    return data[key]


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise QConvertError(f"{where}: expected a mapping, got {value!r}")
    return value
