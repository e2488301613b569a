"""Oracle check of qconvert's Marlin packer (qconvert/formats/marlin.py) against independent packers.

Oracles, loaded at run time from an ignored folder (never vendored):
  ist     IST-DASLab/marlin `Layer.pack` (marlin/__init__.py; the `marlin_cuda` import is stubbed)
          .marlin/IST-DASLab-marlin/   <- git archive of github:IST-DASLab/marlin
  autogptq AutoGPTQ 0.7.1 `QuantLinear.pack` (auto_gptq/nn_modules/qlinear/qlinear_marlin.py; its CUDA
          import fails and is caught, the device-capability check is stubbed)
          .marlin/autogptq/x/          <- `pip download --no-deps auto-gptq==0.7.1`, the .py files unzipped

Both packers quantize a fake-quantized fp16 weight themselves (round(w / s) + 8), so each layer is fed
w = fp16((q - 8) * s) with our codes q and fp16 scales s; the script first checks that this gives back
exactly our codes, then compares B and s bit for bit.

Layers: random ones (per channel and group 128, several shapes, k = 128 included) and the real
q/k/v/gate/up projections of Gemma-3-270M (hidden 640: in 640, out 1024/256/2048; o_proj and
down_proj, out 640, are not multiples of 256 and are skipped), quantized by qconvert's RTN.

  python scripts/verify_marlin_packer.py [--model ~/.cache/qconvert/models/gemma3-270m] [--layers 0,8,17]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qconvert.algorithms.rtn import RTNConfig, rtn  # noqa: E402
from qconvert.formats import marlin  # noqa: E402
from qconvert.quantized import QuantizedTensor  # noqa: E402

IST = ROOT / ".marlin/IST-DASLab-marlin/marlin/__init__.py"
AUTOGPTQ = ROOT / ".marlin/autogptq/x/auto_gptq/nn_modules/qlinear/qlinear_marlin.py"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_oracles() -> dict:
    oracles = {}
    if IST.exists():
        sys.modules.setdefault("marlin_cuda", types.ModuleType("marlin_cuda"))  # the CUDA op is never called
        ist = _load(IST, "ist_marlin")
        oracles["ist"] = lambda k, n, g: ist.Layer(k, n, groupsize=g)
    else:
        print(f"ist: MISSING {IST}")
    if AUTOGPTQ.exists():
        ag = _load(AUTOGPTQ, "autogptq_qlinear_marlin")

        def make(k, n, g):
            real = torch.cuda.get_device_capability
            torch.cuda.get_device_capability = lambda *a: (8, 0)  # its constructor asks the GPU; pack does not
            try:
                # per channel is group_size = in there (its buffer shapes divide by the group size)
                return ag.QuantLinear(4, k if g == -1 else g, k, n, bias=False)
            finally:
                torch.cuda.get_device_capability = real

        oracles["autogptq"] = make
    else:
        print(f"autogptq: MISSING {AUTOGPTQ}")
    return oracles


def oracle_pack(make, qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = qt.shape
    layer = make(k, n, qt.group_size)
    g = qt.column_groups()
    w = ((qt.codes.float() - marlin.ZERO) * qt.scale.float()[:, g]).half()
    linear = nn.Linear(k, n, bias=False).half()
    linear.weight.data = w
    # the oracle's own quantization of w must give back our codes, or the comparison means nothing
    again = torch.clamp(torch.round(w / qt.scale[:, g]).int() + marlin.ZERO, 0, 15)
    assert torch.equal(again, qt.codes.int()), "fake-quantized weight does not reproduce the codes"
    layer.pack(linear, qt.scale.clone())
    return layer.B, layer.s


def compare(label: str, qt: QuantizedTensor, oracles: dict) -> bool:
    B, s = marlin.pack_weight(qt.codes), marlin.pack_scale(qt.scale)
    back_codes, back_scale = marlin.unpack_weight(B), marlin.unpack_scale(s)
    ok = torch.equal(back_codes, qt.codes) and torch.equal(back_scale, qt.scale)
    parts = [f"round-trip {'ok' if ok else 'FAIL'}"]
    for name, make in oracles.items():
        oB, os_ = oracle_pack(make, qt)
        same = torch.equal(B, oB) and torch.equal(s.view(torch.int16), os_.view(torch.int16))
        parts.append(f"{name} B {'==' if torch.equal(B, oB) else '!='} s "
                     f"{'==' if torch.equal(s.view(torch.int16), os_.view(torch.int16)) else '!='}")
        ok &= same
    print(f"{'MATCH' if ok else 'DIFFER'}  {label:58s} B {tuple(B.shape)} s {tuple(s.shape)}  {'; '.join(parts)}")
    return ok


def random_layers(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for n, k in [(256, 128), (256, 256), (512, 384), (768, 1024), (1024, 640), (2048, 4096)]:
        for group in (128, -1):
            groups = 1 if group == -1 else k // group
            codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
            scale = (torch.rand(n, groups, generator=gen) * 0.05 + 1e-3).half()
            yield f"random [{n}, {k}] group {group}", QuantizedTensor(codes, scale, None, 4, group)


def gemma_layers(model: Path, layers: list[int]):
    from safetensors import safe_open

    with safe_open(model / "model.safetensors", "pt") as f:
        names = set(f.keys())
        for i in layers:
            for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                         "mlp.up_proj", "self_attn.o_proj", "mlp.down_proj"):
                name = next(n for n in (f"model.layers.{i}.{proj}.weight", f"model.language_model.layers.{i}.{proj}.weight")
                            if n in names)
                w = f.get_tensor(name)
                problem = marlin.shape_problem(*w.shape)
                if problem:
                    print(f"skip   {name} {tuple(w.shape)}: {problem}")
                    continue
                for group in (128, -1):
                    yield f"{name.removesuffix('.weight')} g{group}", rtn(w, RTNConfig(4, group, True), scale_dtype=torch.float16)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("~/.cache/qconvert/models/gemma3-270m").expanduser())
    ap.add_argument("--layers", default="0,8,17")
    args = ap.parse_args()
    oracles = load_oracles()
    if not oracles:
        print("no oracle found: see the docstring")
        return 1
    print(f"oracles: {', '.join(oracles)}")
    results = [compare(label, qt, oracles) for label, qt in random_layers()]
    if args.model.exists():
        results += [compare(label, qt, oracles) for label, qt in
                    gemma_layers(args.model, [int(x) for x in args.layers.split(",")])]
    else:
        print(f"real layers: MISSING {args.model}")
    print(f"{sum(results)}/{len(results)} layers identical to every oracle")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
