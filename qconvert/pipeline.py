"""One conversion, start to end: resolve the model, calibrate, run the engine, write the output."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qconvert import __version__
from qconvert.calibration.datasets import load_texts
from qconvert.calibration.tokens import calibration_windows
from qconvert.engine import EngineOptions, LayerReport, convert
from qconvert.errors import QConvertError
from qconvert.formats import compressed_tensors
from qconvert.formats.shards import DEFAULT_SHARD_BYTES
from qconvert.model.architectures import architecture_for
from qconvert.model.checkpoint import Checkpoint, resolve_model
from qconvert.output import copy_aux_files, staged_output, write_config, write_model_card


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
        return device, torch.bfloat16
    if device.type != "cpu":
        raise QConvertError(f"--device {spec}: unsupported device type (use auto, cpu, cuda or cuda:N)")
    return device, torch.float32


# linears left unquantized, as compressed-tensors `ignore` entries (names as vLLM and transformers see them)
IGNORE = ["lm_head", r"re:.*(mlp|block_sparse_moe)\.gate$", r"re:.*shared_expert_gate$"]


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise QConvertError(f"{path}: cannot load the tokenizer needed for calibration ({exc})") from None


def calibration_tokens(model_dir: Path, cal: Calibration) -> torch.Tensor:
    """The calibration windows [samples, seq_len], tokenized with the model's own tokenizer."""
    tokenizer = load_tokenizer(model_dir)
    return calibration_windows(load_texts(cal.dataset, tokenizer), tokenizer, cal.samples, cal.seq_len, cal.seed)


def run(request: Request, on_layer=lambda r: None) -> dict:
    """Convert request.model into request.output; returns the summary that report.json holds."""
    start = time.perf_counter()
    source = resolve_model(request.model)
    ckpt = Checkpoint(source)
    arch = architecture_for(ckpt.model_type)
    device, dtype = resolve_device(request.device)
    tokens = None if request.calibration is None else calibration_tokens(source, request.calibration)
    options = EngineOptions(device=device, dtype=dtype, batch_size=request.batch_size)
    with staged_output(request.output, request.overwrite, source) as stage:
        writer = compressed_tensors.Writer(stage, request.max_shard_bytes)
        layers = convert(ckpt, arch, request.config, writer, tokens, options, on_layer)
        write_config(ckpt.config_dict, stage, writer.finish(IGNORE))
        copy_aux_files(source, stage)
        summary = _summary(request, ckpt, layers, stage, time.perf_counter() - start)
        (stage / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_model_card(stage, request.output.name, request.model, _card_facts(summary), request.command)
    return summary


def _summary(request: Request, ckpt: Checkpoint, layers: list[LayerReport], stage: Path, seconds: float) -> dict:
    size = sum(f.stat().st_size for f in stage.glob("*.safetensors"))
    return {
        "tool": f"qconvert {__version__}",
        "command": request.command,
        "source": request.model,
        "output": str(request.output),
        "method": request.method,
        "format": compressed_tensors.QUANT_METHOD,
        "config": asdict(request.config),
        "calibration": asdict(request.calibration) if request.calibration else None,
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
        "size": f"{summary['output_bytes'] / 2**20:.1f} MiB (from {summary['source_bytes'] / 2**20:.1f} MiB)",
        "tool": summary["tool"],
    }
