"""One conversion, start to end: resolve the model, calibrate, run the engine, write the output."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qconvert import __version__, distributed, kv_cache
from qconvert.algorithms.fp8 import check_block_shapes
from qconvert.calibration.datasets import load_texts
from qconvert.calibration.tokens import calibration_windows, saved_windows
from qconvert.errors import QConvertError
from qconvert.formats import awq, compressed_tensors, fp8, gptq, marlin
from qconvert.formats.fanout import FanOut, scale_dtypes
from qconvert.formats.shards import DEFAULT_SHARD_BYTES
from qconvert.model.architectures import architecture_for
from qconvert.model.checkpoint import Checkpoint, resolve_model
from qconvert.output import copy_aux_files, staged_output, write_config, write_model_card

if TYPE_CHECKING:
    from qconvert.engine import LayerReport


@dataclass(frozen=True)
class Calibration:
    dataset: str
    samples: int = 128
    seq_len: int = 512
    seed: int = 0


@dataclass(frozen=True)
class Request:
    model: str
    output: Path
    method: str  # the algorithm's name, for the model card and report
    config: object  # the algorithm's config dataclass
    calibration: Calibration | None
    device: str = "auto"
    overwrite: bool = False
    command: str = ""
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    batch_size: int = 8
    format: str = "compressed-tensors"
    kv_cache: str | None = None  # "fp8": calibrated per-tensor k/v scales
    more_formats: tuple[str, ...] = ()  # further layouts written from the same pass, each in OUTPUT/<format>

    @property
    def formats(self) -> tuple[str, ...]:
        return (self.format, *self.more_formats)

    def as_format(self, fmt: str, output: Path) -> "Request":
        return replace(self, format=fmt, more_formats=(), output=output)


def resolve_device(spec: str) -> tuple[torch.device, torch.dtype]:
    """The device to process blocks on and the compute dtype that suits it."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise QConvertError(f"--device {spec}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise QConvertError(f"--device {spec}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise QConvertError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
        return distributed.local_device(device), torch.bfloat16
    if device.type != "cpu":
        raise QConvertError(f"--device {spec}: unsupported device type (use auto, cpu, cuda or cuda:N)")
    return device, torch.float32


# linears left unquantized, as compressed-tensors `ignore` entries (names as vLLM and transformers see them)
IGNORE = ["lm_head", r"re:.*(mlp|block_sparse_moe)\.gate$", r"re:.*shared_expert_gate$"]

# the layouts each method can write, the first one its default
FORMATS = {"rtn": ("compressed-tensors", "marlin"), "gptq": ("gptq", "compressed-tensors", "marlin"),
           "awq": ("awq", "compressed-tensors", "marlin"),
           "fp8": ("compressed-tensors", "fp8"), "int8": ("compressed-tensors",)}


# W8A8 methods and their compressed-tensors format (weights stored as 8-bit values, not packed)
DENSE = {"fp8": "float-quantized", "int8": "int-quantized"}

# the layouts whose readers in vLLM load k_scale / v_scale (its gptq, awq and marlin loaders have none)
KV_CACHE_FORMATS = ("compressed-tensors", "fp8")


def check_kv_cache(request: "Request") -> None:
    if request.kv_cache is None:
        return
    if request.kv_cache not in kv_cache.CHOICES:
        raise QConvertError(f"--kv-cache {request.kv_cache}: choose one of {', '.join(kv_cache.CHOICES)}")
    if request.format not in KV_CACHE_FORMATS:
        raise QConvertError(f"--kv-cache {request.kv_cache}: --format {request.format} has no place for KV-cache "
                            f"scales that vLLM reads; use --format {' or '.join(f for f in KV_CACHE_FORMATS if f in FORMATS[request.method])}")
    if request.calibration is None:
        raise QConvertError(f"--kv-cache {request.kv_cache}: the scales are calibrated, give --dataset")


def check_format(method: str, fmt: str, config) -> object:
    """Refuse a format the method or its settings cannot be written in; returns the config adapted to it."""
    allowed = FORMATS[method]
    if fmt not in allowed:
        raise QConvertError(f"--format {fmt}: {method} writes {' or '.join(allowed)}")
    if method == "fp8":
        if fmt == "fp8" and config.scheme != "block":
            raise QConvertError(f"--format fp8 holds 128x128-block weights: use --scheme block (not {config.scheme}), "
                                "or --format compressed-tensors")
        return config
    if method == "int8":
        return config
    bits, group = config.bits, config.group_size
    if fmt == "compressed-tensors" and bits not in (4, 8):
        raise QConvertError(f"--w-bit {bits}: compressed-tensors pack-quantized takes 4 or 8 bits (--format gptq takes 2 and 3)")
    if fmt == "awq" and (bits != 4 or group == -1):
        raise QConvertError("--format awq stores 4-bit codes in groups of 32, 64 or 128 (use --format compressed-tensors)")
    if fmt == "gptq" and not config.symmetric:
        config = replace(config, zero_floor=1)  # v1 stores zero - 1
    if fmt == "marlin":
        _check_marlin(method, config)
    return config


def _check_marlin(method: str, config) -> None:
    """Marlin's kernel: symmetric 4-bit (fixed zero 8), groups of 128 or per channel, no g_idx."""
    if config.bits != 4 or config.group_size not in marlin.GROUP_SIZES:
        raise QConvertError(f"--format marlin stores 4-bit codes in groups of 128 or per channel (--w-bit 4, --group 128 "
                            f"or -1), not --w-bit {config.bits} --group {config.group_size}")
    if method == "awq" and config.zero_point:
        raise QConvertError("--format marlin is symmetric (zero point fixed at 8): use --no-zero-point")
    if method != "awq" and not config.symmetric:
        raise QConvertError("--format marlin is symmetric (zero point fixed at 8): use --sym")
    if method == "gptq" and config.act_order and not config.static_groups:
        raise QConvertError("--format marlin has no act-order g_idx: use --static-groups (or --no-act-order)")


def _not_converted(arch) -> list[str]:
    """lm_head and the routers, as module-name pieces in the names the files use (vLLM matches them as
    substrings, so nothing else may contain them)."""
    return ["lm_head", *(arch.to_file(f".{s}.")[1:-1] for s in arch.skip)]


def _writer(request: Request, arch, stage: Path):
    """The format's writer and a function that closes it and returns config.json's quantization_config."""
    cfg = request.config
    if request.format == "awq":
        w = awq.Writer(stage, cfg.group_size, cfg.zero_point, max_shard_bytes=request.max_shard_bytes)
        return w, lambda: w.finish(_not_converted(arch))
    if request.format == "gptq":
        w = gptq.Writer(stage, cfg.bits, cfg.group_size, cfg.symmetric, cfg.act_order, cfg.damp, cfg.static_groups,
                        cfg.true_sequential, max_shard_bytes=request.max_shard_bytes)
        return w, w.finish
    if request.format == "marlin":
        w = marlin.Writer(stage, cfg.group_size, max_shard_bytes=request.max_shard_bytes)
        return w, w.finish
    if request.format == "fp8":
        w = fp8.Writer(stage, max_shard_bytes=request.max_shard_bytes)
        return w, lambda: w.finish(_not_converted(arch))
    if request.method in DENSE:
        w = compressed_tensors.DenseWriter(stage, DENSE[request.method], request.max_shard_bytes)
        return w, lambda: w.finish(IGNORE)
    w = compressed_tensors.Writer(stage, request.max_shard_bytes)
    return w, lambda: w.finish(IGNORE)


def _scale_dtype(fmt: str) -> torch.dtype | None:
    """The scale dtype a layout's writer stores (None: the model's own)."""
    writer = {"awq": awq.Writer, "gptq": gptq.Writer, "marlin": marlin.Writer, "fp8": fp8.Writer}.get(fmt)
    return getattr(writer, "scale_dtype", None)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise QConvertError(f"{path}: cannot load the tokenizer needed for calibration ({exc})") from None


def calibration_tokens(model_dir: Path, cal: Calibration) -> torch.Tensor:
    """The calibration windows [samples, seq_len], tokenized with the model's own tokenizer (or read
    as they are from a .pt file of token ids)."""
    if cal.dataset.endswith(".pt"):
        return saved_windows(Path(cal.dataset).expanduser(), cal.samples, cal.seq_len)
    tokenizer = load_tokenizer(model_dir)
    return calibration_windows(load_texts(cal.dataset, tokenizer), tokenizer, cal.samples, cal.seq_len, cal.seed)


def check_formats(request: Request) -> object:
    """The config every requested layout takes (one pass writes them all, so they must agree)."""
    if len(set(request.formats)) != len(request.formats):
        raise QConvertError(f"--format {','.join(request.formats)}: a layout is named twice")
    configs = [check_format(request.method, f, request.config) for f in request.formats]
    if any(c != configs[0] for c in configs[1:]):
        raise QConvertError(f"--format {','.join(request.formats)}: these layouts store the weights differently "
                            "(e.g. GPTQ v1's zero point - 1); convert them separately")
    for f in request.formats:
        check_kv_cache(request.as_format(f, request.output))
    return configs[0]


def _check_repeatable(request: Request, arch, writers: list, default_dtype) -> None:
    """Layouts with different scale dtypes need one quantize() call each, which GPTQ cannot repeat."""
    from qconvert.algorithms import algorithm_for

    dtypes = set(scale_dtypes(writers, default_dtype))
    if len(dtypes) > 1 and not algorithm_for(request.config, arch).repeatable:
        raise QConvertError(f"--format {','.join(request.formats)}: these layouts store scales in different dtypes "
                            f"({', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))}) and {request.method} "
                            "quantizes once; convert them separately")


def run(request: Request, on_layer=lambda r: None) -> dict | None:
    """Convert request.model into request.output (one folder per layout under it when several are asked
    for); returns the summary that report.json holds (the first layout's), or None in a process of a
    distributed run that does not write."""
    from qconvert.engine import EngineOptions, convert  # transformers' modelling code: seconds to import

    start = time.perf_counter()
    config = check_formats(request)
    source = resolve_model(request.model)
    ckpt = Checkpoint(source)
    arch = architecture_for(ckpt.model_type)
    if "marlin" in request.formats:  # the kernel's shape limits, named per layer before anything is written
        marlin.check_shapes(ckpt, arch)
    if request.method == "fp8" and config.scheme == "block":
        check_block_shapes(ckpt, arch)
    device, dtype = resolve_device(request.device)
    ranks = distributed.start(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = None if request.calibration is None else calibration_tokens(source, request.calibration)
    options = EngineOptions(device=device, dtype=dtype, batch_size=request.batch_size,
                            kv_cache=request.kv_cache is not None)
    try:
        if not ranks.writes:  # another process writes; this one calibrates and quantizes its share
            if tokens is not None:  # (without calibration there is nothing to share)
                discard = FanOut([Discard(_scale_dtype(f)) for f in request.formats])
                convert(ckpt, arch, config, discard, tokens, options, on_layer)
            return None
        with staged_output(request.output, request.overwrite, source) as stage:
            several = len(request.formats) > 1
            parts = [(request.as_format(f, request.output / f if several else request.output), stage / f if several
                      else stage) for f in request.formats]
            writers = []
            for part, folder in parts:
                folder.mkdir(exist_ok=True)
                writers.append(_writer(part, arch, folder))
            if several:
                _check_repeatable(request, arch, [w for w, _ in writers], _weight_dtype(ckpt, arch))
            writer = FanOut([w for w, _ in writers]) if several else writers[0][0]
            layers = convert(ckpt, arch, config, writer, tokens, options, on_layer)
            summaries = [_finish_layout(part, folder, finish, ckpt, source, layers, start, device, ranks.world)
                         for (part, folder), (_, finish) in zip(parts, writers)]
        return summaries[0]
    finally:
        distributed.stop()


class Discard:
    """The writer of a process that does not write (all but rank 0 of a distributed run); it quantizes with
    the scale dtype of the layout it stands for."""

    def __init__(self, scale_dtype: torch.dtype | None = None):
        self.scale_dtype = scale_dtype

    def add_tensor(self, name, tensor) -> None:
        pass

    def add_quantized(self, name, qt) -> None:
        pass

    def reserve_tensor(self, name, dtype, shape) -> None:
        pass


def _weight_dtype(ckpt: Checkpoint, arch) -> torch.dtype:
    """The dtype the engine rounds scales to for a writer without its own: the weights' (from a header)."""
    return ckpt.torch_dtype(next(iter(arch.quantized_weights(ckpt)))[0])


def _finish_layout(request: Request, folder: Path, finish, ckpt, source, layers, start, device, processes) -> dict:
    """Close one layout's writer and give its folder config.json, tokenizer files, report.json and model card."""
    qc = finish()
    if request.kv_cache is not None and qc.get("quant_method") == compressed_tensors.QUANT_METHOD:
        qc["kv_cache_scheme"] = dict(kv_cache.SCHEME)
    write_config(ckpt.config_dict, folder, qc)
    copy_aux_files(source, folder)
    summary = _summary(request, ckpt, layers, folder, time.perf_counter() - start)
    summary["peak_memory"] = peak_memory(device)
    summary["processes"] = processes  # data-parallel calibration ranks (peak memory is rank 0's)
    (folder / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(folder, request.output.name, request.model, _card_facts(summary), request.command)
    return summary


def peak_memory(device: torch.device) -> dict:
    """This process's peak resident memory, and the peak GPU memory torch allocated since the start."""
    import resource

    peak = {"host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        peak["gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


def _summary(request: Request, ckpt: Checkpoint, layers: list[LayerReport], stage: Path, seconds: float) -> dict:
    size = sum(f.stat().st_size for f in stage.glob("*.safetensors"))
    return {
        "tool": f"qconvert {__version__}",
        "command": request.command,
        "source": request.model,
        "output": str(request.output),
        "method": request.method,
        "format": request.format,
        "config": asdict(request.config),
        "calibration": asdict(request.calibration) if request.calibration else None,
        "kv_cache": request.kv_cache,
        "source_bytes": ckpt.nbytes(),
        "output_bytes": size,
        "seconds": round(seconds, 3),
        "mean_weight_error": sum(r.weight_error for r in layers) / len(layers),
        "layers": [
            {
                "index": r.index,
                "seconds": round(r.seconds, 3),
                "weight_error": r.weight_error,
                "output_error": r.output_error,
                "uncalibrated": r.uncalibrated,
                "linears": {n: asdict(lr) for n, lr in r.linears.items()},
            }
            for r in layers
        ],
    }


def _card_facts(summary: dict) -> dict:
    cfg = summary["config"]
    cal = summary["calibration"]
    return {
        "method": summary["method"],
        "format": summary["format"],
        "bits": cfg.get("bits"),
        "group size": cfg.get("group_size"),
        "symmetric": cfg.get("symmetric"),
        "calibration": f"{cal['dataset']} ({cal['samples']} x {cal['seq_len']} tokens, seed {cal['seed']})" if cal else "none",
        "KV cache": summary["kv_cache"] or "model dtype",
        "size": f"{summary['output_bytes'] / 2**20:.1f} MiB (from {summary['source_bytes'] / 2**20:.1f} MiB)",
        "tool": summary["tool"],
    }
