"""`qconvert gguf`: a Hugging Face checkpoint to a GGUF file of any common type in one step."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from gguf import GGMLQuantizationType as Q

from qconvert import __version__, distributed
from qconvert.errors import QConvertError
from qconvert.formats.gguf import imatrix as imx
from qconvert.formats.gguf import quantized_file
from qconvert.formats.gguf.convert import GGUFPlan, plan, write_gguf
from qconvert.formats.gguf.mixtures import FILE_TYPES
from qconvert.model.checkpoint import Checkpoint, resolve_model
from qconvert.output import staged_file, write_json_atomically
from qconvert.pipeline import Calibration, Discard, calibration_tokens, resolve_device

# The calibrated methods import the engine (and transformers' modelling code, seconds of start-up) when
# they run: a plain conversion never needs them.

FLOAT_OUTPUTS = ("F32", "F16", "BF16")
# devices where the tensors outside the blocks are quantized while the engine runs (a CPU has no idle units)
BESIDE_ENGINE = ("cuda",)
TYPES = tuple(FILE_TYPES)
METHODS = ("plain", "imatrix", "gptq", "awq", "awq-gptq")
ENGINE_METHODS = ("gptq", "awq", "awq-gptq")  # codes and scales chosen in the layer-by-layer engine
_STORAGE = {"BF16": Q.BF16, "F16": Q.F16, "F32": Q.F32}


@dataclass(frozen=True)
class GGUFRequest:
    model: str
    output: Path
    type: str
    imatrix: bool = False  # compute one from the calibration data
    imatrix_file: Path | None = None  # or read llama.cpp's file
    save_imatrix: Path | None = None
    calibration: Calibration = Calibration("mixed")
    device: str = "auto"
    overwrite: bool = False
    command: str = ""
    method: str = "plain"  # plain | imatrix (llama.cpp's results) | gptq | awq | awq-gptq (in the engine)
    threads: int = 0  # CPU quantizer threads; 0: every core this process may use


def parse_type(name: str) -> str:
    upper = name.upper()
    if upper not in TYPES:
        raise QConvertError(f"unknown GGUF type '{name}' (choose from {', '.join(TYPES)})")
    return upper


def intermediate_type(ckpt: Checkpoint) -> Q:
    """The checkpoint's own float type: llama.cpp's lossless conversion target before quantizing."""
    weights = [n for n in ckpt.names() if len(ckpt.shape(n)) == 2]
    dtypes = Counter(ckpt.dtype(n) for n in weights)
    dtype = dtypes.most_common(1)[0][0] if dtypes else "F32"
    if dtype not in _STORAGE:
        raise QConvertError(f"{ckpt.path}: weights stored as {dtype}; GGUF conversion reads F32, F16 or BF16")
    return _STORAGE[dtype]


def collect_imatrix(ckpt: Checkpoint, gguf_plan: GGUFPlan, cal: Calibration, device: str, on_layer) -> imx.Imatrix:
    """llama.cpp's importance matrix from qconvert's layer-by-layer calibration pass."""
    from qconvert.engine import EngineOptions, calibrate
    from qconvert.model.architectures import architecture_for

    arch = architecture_for(ckpt.model_type)
    dev, dtype = resolve_device(device)
    tokens = calibration_tokens(ckpt.path, cal)
    observed = calibrate(ckpt, arch, tokens, EngineOptions(dev, dtype),
                         lambda name, linear: imx.SquaredSums(linear.in_features, dev), on_layer)
    sums = {}
    for spec in gguf_plan.tensors:
        mats = [observed[h] for h in spec.hf_names if h in observed]
        if mats:
            sums[spec.gguf_name] = [(o.stats.sums, o.tokens) for o in mats]
    if "output.weight" not in sums and "lm_head.weight" in observed:  # tied: lm_head multiplies by token_embd
        head = observed["lm_head.weight"]
        sums["token_embd.weight"] = [(head.stats.sums, head.tokens)]
    return imx.from_observations(sums, [cal.dataset], chunk_count=cal.samples, chunk_size=cal.seq_len)


def check_method(req: GGUFRequest, type_name: str) -> None:
    if req.method not in METHODS:
        raise QConvertError(f"unknown --method '{req.method}' (choose from {', '.join(METHODS)})")
    if type_name in FLOAT_OUTPUTS and (req.imatrix or req.imatrix_file or req.method != "plain"):
        raise QConvertError(f"calibration (--imatrix, --method) only applies to quantized types, not {type_name}")
    if req.imatrix and req.imatrix_file:
        raise QConvertError("give either --imatrix (compute one) or --imatrix-file, not both")
    if req.method in ENGINE_METHODS and (req.imatrix or req.imatrix_file):
        raise QConvertError(f"--method {req.method} computes its own importance from the calibration data: "
                            "drop --imatrix / --imatrix-file")


def run(req: GGUFRequest, on_layer=lambda r: None, on_tensor=lambda name, qtype: None) -> dict | None:
    if req.method != "plain" or req.imatrix:
        # transformers' modelling code, seconds to import: before the clock starts, as in `qconvert gptq`
        import qconvert.engine  # noqa: F401
    start = time.perf_counter()
    type_name = parse_type(req.type)
    if req.method == "imatrix" and not req.imatrix_file:
        req = replace(req, imatrix=True)
    check_method(req, type_name)
    importance = imx.read(req.imatrix_file) if req.imatrix_file else None  # cheap checks first
    source = resolve_model(req.model)
    ckpt = Checkpoint(source)
    gguf_plan = plan(source)
    ranks = distributed.start(resolve_device(req.device)[0])
    try:
        if req.imatrix:
            importance = collect_imatrix(ckpt, gguf_plan, req.calibration, req.device, on_layer)
        if not ranks.writes:  # another process writes; this one calibrated its share
            if req.method in ENGINE_METHODS:
                _write_calibrated(req, ckpt, gguf_plan, FILE_TYPES[type_name], None, on_layer, on_tensor)
            return None
        return _write(req, type_name, source, ckpt, gguf_plan, importance, on_layer, on_tensor, start)
    finally:
        distributed.stop()


def _write(req: GGUFRequest, type_name: str, source: Path, ckpt: Checkpoint, gguf_plan: GGUFPlan, importance,
           on_layer, on_tensor, start: float) -> dict:
    is_float = type_name in FLOAT_OUTPUTS
    if req.save_imatrix and importance is not None:
        imx.write(req.save_imatrix, importance)
    with staged_file(req.output, req.overwrite, source) as tmp:
        if is_float:
            write_gguf(gguf_plan, ckpt.get, tmp, type_name)
            records = _float_records(gguf_plan, _STORAGE[type_name])
        elif req.method in ENGINE_METHODS:
            records = _write_calibrated(req, ckpt, gguf_plan, FILE_TYPES[type_name], tmp, on_layer, on_tensor)
        else:
            dev, _ = resolve_device(req.device)
            recorded = req.imatrix_file or req.save_imatrix
            records = quantized_file.write(gguf_plan, ckpt.get, tmp, FILE_TYPES[type_name], intermediate_type(ckpt),
                                           importance, str(recorded) if recorded else None, dev, on_tensor,
                                           threads=req.threads or None)
    summary = _summary(req, type_name, gguf_plan, importance, ckpt, records, time.perf_counter() - start)
    write_json_atomically(report_path(req.output), summary)
    return summary


def _write_calibrated(req: GGUFRequest, ckpt: Checkpoint, gguf_plan: GGUFPlan, ftype, out: Path | None, on_layer,
                      on_tensor):
    """GPTQ, AWQ or both onto the mixture's GGUF types in the layer-by-layer engine, then the file in llama.cpp's
    layout (out None: a rank that does not write)."""
    from qconvert.algorithms.gguf_awq import GGUFAWQConfig, GGUFAWQGPTQConfig
    from qconvert.algorithms.gguf_gptq import GGUFGPTQConfig
    from qconvert.engine import EngineOptions, convert
    from qconvert.formats.gguf.calibrated import FLOATS, CalibratedTensors, row_types
    from qconvert.model.architectures import architecture_for

    intermediate = intermediate_type(ckpt)
    types = quantized_file.plan_types(gguf_plan, intermediate, ftype, has_imatrix=True)
    rows = row_types(gguf_plan, types, ckpt.shape)
    config = {"gptq": GGUFGPTQConfig, "awq": GGUFAWQConfig, "awq-gptq": GGUFAWQGPTQConfig}[req.method](types=rows)
    arch = architecture_for(ckpt.model_type)
    dev, dtype = resolve_device(req.device)
    store = CalibratedTensors() if out is not None else Discard()
    with ThreadPoolExecutor(1, thread_name_prefix="gguf-early") as early:
        # what does not depend on the engine is done beside it: the file's metadata, and on a GPU (which the
        # engine leaves mostly idle) the embeddings and the output matrix
        opened = early.submit(quantized_file.open_file, gguf_plan, out, ftype, intermediate,
                              types) if out is not None else None
        outside = [s for s in gguf_plan.tensors if s.hf_names and types[s.gguf_name] not in FLOATS
                   and not any(arch.in_blocks(n) for n in s.hf_names)]
        ahead = early.submit(quantized_file.encode_tensors, outside, ckpt.get, types, intermediate, dev,
                             req.threads or None) if out is not None and dev.type in BESIDE_ENGINE else None
        try:
            convert(ckpt, arch, config, store, calibration_tokens(ckpt.path, req.calibration),
                    EngineOptions(dev, dtype), on_layer)
        except BaseException:
            if opened is not None and opened.exception() is None:
                opened.result().close()
            raise
        made = ahead.result() if ahead is not None else {}
    if out is None:
        return None
    return quantized_file.write(gguf_plan, store.loader(ckpt.get), out, ftype, intermediate, device=dev,
                                on_tensor=on_tensor, types=types, threads=req.threads or None,
                                encoded=lambda spec: made.get(spec.gguf_name)
                                or store.bytes_for(spec, lambda n: ckpt.shape(n)[0]), writer=opened.result())


def report_path(gguf_file: Path) -> Path:
    """report.json of a GGUF output: beside the file, named after it."""
    return gguf_file.parent / f"{gguf_file.name}.report.json"


def _float_records(gguf_plan: GGUFPlan, storage: Q) -> dict[str, quantized_file.TensorRecord]:
    """Float outputs keep 1-D tensors in F32 and store the rest in the chosen type, without rounding error
    worth measuring."""
    records = {}
    for spec in gguf_plan.tensors:
        qtype = Q.F32 if len(spec.shape) == 1 else storage
        nbytes = spec.n_elements * (4 if qtype == Q.F32 else 2)
        records[spec.gguf_name] = quantized_file.TensorRecord(qtype.name, list(spec.shape), nbytes, None, 0.0)
    return records


def _summary(req: GGUFRequest, type_name: str, gguf_plan: GGUFPlan, importance, ckpt: Checkpoint, records: dict,
             seconds: float) -> dict:
    return {
        "tool": f"qconvert {__version__}",
        "command": req.command,
        "source": req.model,
        "output": str(req.output),
        "type": type_name,
        "method": req.method,
        "architecture": gguf_plan.arch,
        "tensor_types": dict(Counter(r.type for r in records.values())),
        "imatrix": None if importance is None else {
            "entries": len(importance.entries),
            "source": str(req.imatrix_file) if req.imatrix_file else asdict(req.calibration),
        },
        "source_bytes": ckpt.nbytes(),
        "output_bytes": req.output.stat().st_size,
        "seconds": round(seconds, 3),
        "quantize_seconds": round(sum(r.quantize_seconds for r in records.values()), 3),
        "tensors": {name: asdict(r) for name, r in records.items()},
    }
