"""Command line: flags -> a request -> the library. No logic of its own."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from qconvert import __version__
from qconvert.errors import QConvertError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn a Hugging Face checkpoint into quantized checkpoints that real engines load.",
)
stdout = Console()
stderr = Console(stderr=True)

Model = Annotated[str, typer.Argument(help="Checkpoint directory or Hugging Face hub id.")]
Output = Annotated[Optional[Path], typer.Option("-o", "--output", help="Output directory (default: MODEL-METHOD-wBITSgGROUP in the current folder).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Samples = Annotated[int, typer.Option("--samples", help="Calibration / evaluation windows.")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per window.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for the calibration windows.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
Json = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]
Dataset = Annotated[str, typer.Option("--dataset", help="Calibration text: bundled set name, .txt/.jsonl/.parquet "
                                     "file, hf:NAME[:CONFIG][:SPLIT], or a .pt tensor of token ids [windows, seq_len].")]
Format = Annotated[str, typer.Option("--format", help="Output layout: gptq, compressed-tensors or marlin (4-bit "
                                     "symmetric, group 128 or -1, no act-order g_idx); a,b writes both from one pass.")]
Gpus = Annotated[int, typer.Option("--gpus", min=1, help="Processes for data-parallel calibration, one per GPU "
                                   "(gloo processes with --device cpu), started through torch.distributed.run.")]
KVCache = Annotated[Optional[str], typer.Option("--kv-cache", help="fp8: calibrate per-tensor FP8 key and value "
                                               "scales for the KV cache (compressed-tensors or fp8 layouts).")]


def _calibration(dataset: str | None, samples: int, seq_len: int, seed: int, needed: bool):
    """Calibration windows when the method or the KV-cache scales need them (the bundled set by default)."""
    from qconvert.pipeline import Calibration

    return Calibration(dataset or "mixed", samples, seq_len, seed) if needed else None


def _layouts(fmt: str) -> dict:
    """--format a,b: one pass written in both layouts (OUTPUT/a, OUTPUT/b)."""
    first, *more = [f.strip() for f in fmt.split(",") if f.strip()] or [fmt]
    return {"format": first, "more_formats": tuple(more)}


def _command_line(ctx: typer.Context) -> str:
    return shlex.join(["qconvert", *ctx.obj["argv"]])


def _default_output(model: str, suffix: str) -> Path:
    return Path(f"{Path(model).name or 'model'}-{suffix}")


def _spread(ctx: typer.Context, gpus: int, device: str) -> None:
    """--gpus N: run this same command as N torch.distributed processes (torchrun) and exit with their status."""
    import subprocess

    from qconvert import distributed

    if gpus == 1 or distributed.launched():
        return
    if device != "cpu":
        import torch

        if torch.cuda.device_count() < gpus:
            raise QConvertError(f"--gpus {gpus}: {torch.cuda.device_count()} CUDA device(s) here "
                                "(--device cpu runs that many CPU processes)")
    argv, args = ctx.obj["argv"], []
    skip = False
    for a in argv:  # the same command without --gpus
        if skip or a.startswith("--gpus="):
            skip = False
            continue
        skip = a == "--gpus"
        if not skip:
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           "-m", "qconvert", *args]
    # torchrun would give each process one CPU thread: reading and casting the checkpoint needs more
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // gpus)), **os.environ}
    raise typer.Exit(subprocess.run(cmd, env=env).returncode)


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        stdout.print_json(json.dumps(summary))
        return
    stdout.print(
        f"wrote [bold]{summary['output']}[/] ({summary['output_bytes'] / 2**20:.1f} MiB, "
        f"mean weight error {summary['mean_weight_error']:.3e}, {summary['seconds']:.1f} s)"
    )


@app.command()
def rtn(
    ctx: typer.Context,
    model: Model,
    output: Output = None,
    w_bit: Annotated[int, typer.Option("--w-bit", help="Weight bits: 4 or 8.")] = 4,
    group: Annotated[int, typer.Option("--group", help="Group size: 32, 64, 128, or -1 per channel.")] = 128,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric (no zero point) or asymmetric.")] = True,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Optional: calibration text to measure each layer's output error on.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Output layout: compressed-tensors or marlin (4-bit --sym, "
                                     "group 128 or -1).")] = "compressed-tensors",
    samples: Samples = 128,
    seq_len: SeqLen = 512,
    seed: Seed = 0,
    kv: KVCache = None,
    device: Device = "auto",
    gpus: Gpus = 1,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: Json = False,
):
    """Round-to-nearest weight-only int4/int8, written as compressed-tensors pack-quantized (or Marlin)."""
    _spread(ctx, gpus, device)
    from qconvert.algorithms.rtn import RTNConfig
    from qconvert.pipeline import Request

    config = RTNConfig(bits=w_bit, group_size=group, symmetric=sym)
    out = output or _default_output(model, f"rtn-w{w_bit}g{group}")
    calibration = _calibration(dataset, samples, seq_len, seed, dataset is not None or kv is not None)
    _convert(Request(model, out, "rtn", config, calibration, device, overwrite, _command_line(ctx), kv_cache=kv,
                     **_layouts(fmt)), quiet, json_out)


@app.command()
def gptq(
    ctx: typer.Context,
    model: Model,
    output: Output = None,
    w_bit: Annotated[int, typer.Option("--w-bit", help="Weight bits: 4 or 8 (2, 3 with --format gptq).")] = 4,
    group: Annotated[int, typer.Option("--group", help="Group size: 32, 64, 128, or -1 per channel.")] = 128,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric (no zero point) or asymmetric.")] = True,
    act_order: Annotated[bool, typer.Option("--act-order/--no-act-order",
                                            help="Quantize columns by descending Hessian diagonal.")] = True,
    static_groups: Annotated[bool, typer.Option("--static-groups/--dynamic-groups", help="With --act-order: groups "
                                                 "fixed up front in column order (no g_idx, so every kernel runs "
                                                 "it), or formed in quantization order (g_idx).")] = True,
    damp: Annotated[float, typer.Option("--damp", help="Dampening, a fraction of the mean Hessian diagonal.")] = 0.01,
    block_size: Annotated[int, typer.Option("--block-size", help="Columns per lazy-update block.")] = 128,
    true_sequential: Annotated[bool, typer.Option("--true-sequential/--no-true-sequential",
                                                  help="Each linear group sees the quantized groups before it.")] = True,
    fmt: Format = "gptq",
    dataset: Dataset = "mixed",
    samples: Samples = 128,
    seq_len: SeqLen = 512,
    seed: Seed = 0,
    kv: KVCache = None,
    device: Device = "auto",
    gpus: Gpus = 1,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: Json = False,
):
    """GPTQ: Hessian-based error compensation, written as GPTQ v1 or compressed-tensors."""
    _spread(ctx, gpus, device)
    from qconvert.algorithms.gptq import GPTQConfig
    from qconvert.pipeline import Calibration, Request

    config = GPTQConfig(w_bit, group, sym, act_order, static_groups, damp, block_size, true_sequential)
    out = output or _default_output(model, f"gptq-w{w_bit}g{group}")
    request = Request(model, out, "gptq", config, Calibration(dataset, samples, seq_len, seed), device, overwrite,
                      _command_line(ctx), kv_cache=kv, **_layouts(fmt))
    _convert(request, quiet, json_out)


@app.command()
def awq(
    ctx: typer.Context,
    model: Model,
    output: Output = None,
    w_bit: Annotated[int, typer.Option("--w-bit", help="Weight bits: 4 (8 with --format compressed-tensors).")] = 4,
    group: Annotated[int, typer.Option("--group", help="Group size: 32, 64, 128, or -1 per channel.")] = 128,
    zero_point: Annotated[bool, typer.Option("--zero-point/--no-zero-point", help="Asymmetric with a zero point, or symmetric.")] = True,
    scale_search: Annotated[str, typer.Option("--scale-search", help="duo (activations and weights), activation, or both.")] = "duo",
    clip: Annotated[bool, typer.Option("--clip/--no-clip", help="Search a per-group weight range clip after scaling.")] = True,
    fmt: Annotated[str, typer.Option("--format", help="Output layout: awq (AutoAWQ GEMM), compressed-tensors or "
                                     "marlin (with --no-zero-point, group 128 or -1); awq,compressed-tensors writes both from one pass.")] = "awq",
    dataset: Dataset = "mixed",
    samples: Samples = 128,
    seq_len: SeqLen = 512,
    seed: Seed = 0,
    kv: KVCache = None,
    device: Device = "auto",
    gpus: Gpus = 1,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: Json = False,
):
    """AWQ: activation-aware scales and clipping, written as AutoAWQ GEMM or compressed-tensors."""
    _spread(ctx, gpus, device)
    from qconvert.algorithms.awq import AWQConfig
    from qconvert.pipeline import Calibration, Request

    config = AWQConfig(w_bit, group, zero_point, scale_search, clip=clip)
    out = output or _default_output(model, f"awq-w{w_bit}g{group}")
    request = Request(model, out, "awq", config, Calibration(dataset, samples, seq_len, seed), device, overwrite,
                      _command_line(ctx), kv_cache=kv, **_layouts(fmt))
    _convert(request, quiet, json_out)


@app.command()
def fp8(
    ctx: typer.Context,
    model: Model,
    output: Output = None,
    scheme: Annotated[str, typer.Option("--scheme", help="dynamic (weights per channel, activations per token), "
                                        "static (per tensor, activation scales calibrated on --dataset) or "
                                        "block (128x128 weight blocks, activations per token group).")] = "dynamic",
    fmt: Annotated[str, typer.Option("--format", help="Output layout: compressed-tensors (float-quantized) or fp8 "
                                     "(vLLM's quant_method fp8, block scheme only).")] = "compressed-tensors",
    dataset: Dataset = "mixed",
    samples: Samples = 128,
    seq_len: SeqLen = 512,
    seed: Seed = 0,
    kv: KVCache = None,
    device: Device = "auto",
    gpus: Gpus = 1,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: Json = False,
):
    """FP8 (e4m3) weights and activations, W8A8, for Hopper/Ada GPUs (vLLM, SGLang)."""
    _spread(ctx, gpus, device)
    from qconvert.algorithms.fp8 import FP8Config
    from qconvert.pipeline import Request

    config = FP8Config(scheme)
    out = output or _default_output(model, f"fp8-{scheme}")
    calibration = _calibration(dataset, samples, seq_len, seed, config.calibrated or kv is not None)
    request = Request(model, out, "fp8", config, calibration, device, overwrite, _command_line(ctx), kv_cache=kv,
                      **_layouts(fmt))
    _convert(request, quiet, json_out)


@app.command()
def int8(
    ctx: typer.Context,
    model: Model,
    output: Output = None,
    smoothquant: Annotated[Optional[float], typer.Option(
        "--smoothquant", help="SmoothQuant migration strength α (0.5 is the paper's default); off when absent.")] = None,
    use_gptq: Annotated[bool, typer.Option("--gptq", help="GPTQ for the int8 weights instead of round-to-nearest.")] = False,
    damp: Annotated[float, typer.Option("--damp", help="With --gptq: dampening, a fraction of the mean Hessian diagonal.")] = 0.01,
    dataset: Dataset = "mixed",
    samples: Samples = 128,
    seq_len: SeqLen = 512,
    seed: Seed = 0,
    kv: KVCache = None,
    device: Device = "auto",
    gpus: Gpus = 1,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: Json = False,
):
    """INT8 W8A8: int8 weights per channel, int8 activations per token, as compressed-tensors int-quantized."""
    _spread(ctx, gpus, device)
    from qconvert.algorithms.int8 import INT8Config
    from qconvert.pipeline import Request

    config = INT8Config(smoothquant, use_gptq, damp)
    out = output or _default_output(model, "int8" + (f"-sq{smoothquant:g}" if smoothquant is not None else "")
                                    + ("-gptq" if use_gptq else ""))
    calibration = _calibration(dataset, samples, seq_len, seed, config.calibrated or kv is not None)
    _convert(Request(model, out, "int8", config, calibration, device, overwrite, _command_line(ctx), kv_cache=kv),
             quiet, json_out)


def _convert(request, quiet: bool, json_out: bool) -> None:
    from qconvert.model.checkpoint import Checkpoint, resolve_model
    from qconvert.output import check_output
    from qconvert.pipeline import run
    from qconvert.progress import layer_progress

    check_output(request.output, request.overwrite)  # fail before any loading
    layers = Checkpoint(resolve_model(request.model)).config_dict.get("num_hidden_layers", 0)
    with layer_progress(layers, f"{request.method} {request.model}", quiet or not _leads()) as on_layer:
        summary = run(request, on_layer)
    if summary is not None:  # None: a process of a distributed run that does not write
        _print_summary(summary, json_out)


def _leads() -> bool:
    """The process that reports: the only one, or rank 0 of a distributed run."""
    return os.environ.get("RANK", "0") == "0"


@app.command()
def gguf(
    ctx: typer.Context,
    model: Model,
    type_name: Annotated[str, typer.Argument(metavar="TYPE", help="F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, "
                                             "Q2_K, Q3_K_S/M/L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output file (default: MODEL-TYPE.gguf).")] = None,
    method: Annotated[str, typer.Option("--method", help="plain: llama.cpp's result; imatrix: llama.cpp's with an "
                                        "importance matrix from --dataset (= --imatrix); gptq: codes and scales "
                                        "chosen with GPTQ's error compensation on the same GGUF types; awq: AWQ's "
                                        "activation-aware scales folded in first, then the imatrix quantizers; awq-gptq: "
                                        "AWQ's scales, then GPTQ's compensation.")] = "plain",
    imatrix: Annotated[bool, typer.Option("--imatrix", help="Compute an importance matrix from --dataset.")] = False,
    imatrix_file: Annotated[Optional[Path], typer.Option("--imatrix-file", help="Use llama.cpp's imatrix file.")] = None,
    save_imatrix: Annotated[Optional[Path], typer.Option("--save-imatrix", help="Also write the imatrix used.")] = None,
    dataset: Annotated[str, typer.Option("--dataset", help="Calibration text for --imatrix / --method.")] = "mixed",
    samples: Samples = 128,
    seq_len: SeqLen = 512,
    seed: Seed = 0,
    device: Device = "auto",
    gpus: Gpus = 1,
    threads: Annotated[int, typer.Option("--threads", min=0, help="CPU quantizer threads (0: every core).")] = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: Json = False,
):
    """One step from a Hugging Face checkpoint to a GGUF file llama.cpp and Ollama run (byte-identical to
    llama.cpp's converter + llama-quantize)."""
    _spread(ctx, gpus, device)
    from qconvert.gguf_pipeline import GGUFRequest, parse_type, run
    from qconvert.model.checkpoint import Checkpoint, resolve_model
    from qconvert.output import check_output
    from qconvert.pipeline import Calibration
    from qconvert.progress import layer_progress, tensor_progress

    type_name = parse_type(type_name)
    out = output or Path(f"{Path(model).name or 'model'}-{type_name}.gguf")
    check_output(out, overwrite)
    request = GGUFRequest(model, out, type_name, imatrix, imatrix_file, save_imatrix,
                          Calibration(dataset, samples, seq_len, seed), device, overwrite, _command_line(ctx), method,
                          threads)
    config = Checkpoint(resolve_model(model)).config_dict
    calibrating = imatrix or method != "plain"
    quiet = quiet or not _leads()
    with layer_progress(config.get("num_hidden_layers", 0), method, quiet or not calibrating) as on_layer, \
            tensor_progress(None, f"gguf {type_name}", quiet) as on_tensor:
        summary = run(request, on_layer, on_tensor)
    if summary is None:
        return
    if json_out:
        stdout.print_json(json.dumps(summary))
        return
    types = ", ".join(f"{k} x{v}" for k, v in sorted(summary["tensor_types"].items()))
    stdout.print(f"wrote [bold]{summary['output']}[/] ({summary['output_bytes'] / 2**20:.1f} MiB, {types}, "
                 f"{summary['seconds']:.1f} s)")


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Argument(help="Checkpoint or qconvert output to score.")],
    base: Annotated[Optional[str], typer.Option("--base", help="Unquantized model for KL divergence and top-1 agreement.")] = None,
    dataset: Annotated[str, typer.Option("--dataset", help="Held-out text: bundled set name, file, or hf:NAME.")] = "heldout",
    samples: Samples = 40,
    seq_len: SeqLen = 512,
    device: Device = "auto",
    json_out: Json = False,
):
    """Perplexity on held-out text; with --base, KL divergence and top-1 agreement against it (also recorded
    in a qconvert output's report.json)."""
    from qconvert.eval.run import score
    from qconvert.report.data import record_evaluation

    result = score(model, base, dataset, samples, seq_len, device)
    record_evaluation(model, result)
    if json_out:
        stdout.print_json(json.dumps(result))
        return
    table = Table(title=f"{model} on {dataset} ({result['windows']} x {seq_len} tokens)", show_header=False)
    for key in ("perplexity", "base_perplexity", "kl_divergence", "top1_agreement", "tokens"):
        if result[key] is not None:
            table.add_row(key.replace("_", " "), f"{result[key]:.4f}" if isinstance(result[key], float) else str(result[key]))
    stdout.print(table)


@app.command()
def recipes(json_out: Json = False):
    """The bundled recipes: name, method, format and quality gates."""
    from dataclasses import asdict

    from qconvert.batch.recipes import bundled

    found = bundled()
    if json_out:
        stdout.print_json(json.dumps([{**asdict(r), "calibration": asdict(r.calibration) if r.calibration else None}
                                      for r in found]))
        return
    table = Table()
    for col in ("recipe", "method", "format", "gates", "description"):
        table.add_column(col)
    for r in found:
        gates = ", ".join(f"{k} {v:g}" for k, v in asdict(r.gates).items() if v is not None)
        layout = ",".join(r.format) or (f"gguf {r.params['type']}" if r.method == "gguf" else "default")
        table.add_row(r.name, r.method, layout, gates, r.description)
    stdout.print(table)


@app.command("run")
def run_recipe(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Argument(help="A bundled recipe's name (see `qconvert recipes`) or a YAML file.")],
    model: Model,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (a .gguf file for gguf recipes).")],
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Score the output against MODEL (always "
                                           "when the recipe has gates).")] = True,
    eval_dataset: Annotated[str, typer.Option("--eval-dataset", help="Held-out text for scoring.")] = "heldout",
    eval_samples: Annotated[int, typer.Option("--eval-samples", help="Held-out windows.")] = 40,
    eval_seq_len: Annotated[int, typer.Option("--eval-seq-len", help="Tokens per held-out window.")] = 512,
    imatrix_cache: Annotated[Optional[Path], typer.Option("--imatrix-cache", help="Folder where importance "
                             "matrices are shared between the GGUF recipes of a model.")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option("--push-to-hub", help="Upload the output to this hub repo "
                           "once it verified and passed its gates.")] = None,
    device: Device = "auto",
    gpus: Gpus = 1,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_out: Json = False,
):
    """Run one recipe: convert, read the output back and verify it, score it against MODEL, check the gates.
    Exit code 1 when a gate fails or the job does not finish. With --gpus the conversion is data-parallel;
    rank 0 alone verifies, scores and reports."""
    from qconvert.batch.jobs import JobOptions, run_job
    from qconvert.batch.recipes import load
    from qconvert.model.checkpoint import Checkpoint, resolve_model
    from qconvert.output import check_output
    from qconvert.progress import layer_progress

    _spread(ctx, gpus, device)
    check_output(output, overwrite)
    rec = load(recipe)
    options = JobOptions(device, eval_dataset, eval_samples, eval_seq_len, imatrix_cache, evaluate)
    layers = Checkpoint(resolve_model(model)).config_dict.get("num_hidden_layers", 0)
    with layer_progress(layers, f"{rec.name} {model}", quiet or not _leads()) as on_layer:
        result = run_job(rec, model, output, options, overwrite, _command_line(ctx), on_layer)
    if result is None or not _leads():  # a rank that helped convert; rank 0 reports
        raise typer.Exit(0 if result is None or result["status"] == "ok" else 1)
    if result["status"] == "ok" and push_to_hub:
        from qconvert.batch.run import push

        result["pushed_to"] = push(output, push_to_hub)
    if json_out:
        stdout.print_json(json.dumps(result))
    else:
        _print_job(result)
    if result["status"] != "ok":
        raise typer.Exit(1)


def _print_job(r: dict) -> None:
    line = f"{r['recipe']} {r['model']}: [bold]{r['status']}[/]"
    if r.get("perplexity"):
        line += f" (ppl {r['perplexity']:.3f} vs {r['base_perplexity']:.3f}, KL {r['kl_divergence']:.4f})"
    for g in r.get("gates", []):
        line += f"\n  {g['gate']}: {g['value']:.4g} (limit {g['limit']:g}) {'ok' if g['passed'] else 'FAILED'}"
    if r.get("error"):
        line += f"\n  {r['error']}"
    stdout.print(line)


@app.command()
def batch(
    manifest: Annotated[Path, typer.Argument(help="Manifest YAML: models x recipes (see docs/ci.md).")],
    jobs: Annotated[int, typer.Option("--jobs", help="Jobs run at once, each in its own process.")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Skip jobs whose outputs exist and verify.")] = False,
    report_json: Annotated[Optional[Path], typer.Option("--report-json", help="Write every job's result here.")] = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Write a JUnit XML report here.")] = None,
    gpus: Annotated[Optional[int], typer.Option("--gpus", min=1, help="Processes per job for data-parallel "
                                                "calibration, one per GPU (default: the manifest's `gpus`, "
                                                "else 1); jobs run at once get GPUs of their own.")] = None,
    quiet: Quiet = False,
):
    """Convert, verify, evaluate and gate every model x recipe of MANIFEST; exit code 1 if any job failed
    or breached a gate. Writes OUTPUT_DIR/index.html linking each job's report page."""
    from qconvert.batch.manifest import load_manifest
    from qconvert.batch.run import failed, run_batch, write_index, write_junit
    from qconvert.output import write_json_atomically

    if jobs < 1:
        raise QConvertError(f"--jobs {jobs}: at least 1")
    plan = load_manifest(manifest)
    if gpus is not None:
        plan = dataclasses.replace(plan, gpus=gpus)
    results = run_batch(plan, jobs, resume, on_result=lambda job, r: quiet or _print_job({**r, "model": job.id}))
    if report_json:
        write_json_atomically(report_json.resolve(), {"manifest": str(plan.path), "jobs": results})
    if junit:
        write_junit(results, junit)
    page = write_index(results, plan)
    if not quiet:
        ok = sum(r["status"] == "ok" for r in results)
        stdout.print(f"{ok}/{len(results)} jobs ok; index: {page}")
    if failed(results):
        raise typer.Exit(1)


@app.command()
def report(
    output: Annotated[Path, typer.Argument(help="A qconvert output: folder, or .gguf file.")],
    base: Annotated[Optional[str], typer.Option("--base", help="Unquantized model to score perplexity and KL against "
                                                "(evaluations already in report.json are reused).")] = None,
    compare: Annotated[Optional[list[Path]], typer.Option("--compare", help="Other outputs of the same model, shown "
                                                          "side by side (repeatable).")] = None,
    html_file: Annotated[Optional[Path], typer.Option("--html", help="Page to write (default: report.html beside "
                                                      "report.json).")] = None,
    dataset: Annotated[str, typer.Option("--dataset", help="Held-out text for --base.")] = "heldout",
    samples: Samples = 40,
    seq_len: SeqLen = 512,
    device: Device = "auto",
):
    """A self-contained HTML page of a conversion: error heat map, size by tensor kind, quality table, provenance."""
    from qconvert.report.build import build

    page, outputs = build(output, compare or [], base, html_file, dataset, samples, seq_len, device)
    table = Table(title=f"wrote {page}")
    for col in ("output", "MiB", "perplexity", "KL vs base"):
        table.add_column(col)
    for o in outputs:
        e = o.evaluation or {}
        table.add_row(o.path.name, f"{o.report['output_bytes'] / 2**20:.1f}",
                      f"{e['perplexity']:.3f}" if e else "-", f"{e['kl_divergence']:.4f}" if e else "-")
    stdout.print(table)


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="Checkpoint directory or hub id.")],
    json_out: Json = False,
):
    """What a checkpoint is: architecture, layers, dtype, size, quantization per module."""
    from qconvert.inspect import describe
    from qconvert.model.checkpoint import resolve_model

    info = describe(resolve_model(path))
    if json_out:
        stdout.print_json(json.dumps(info))
        return
    table = Table(title=info["path"], show_header=False)
    table.add_row("model type", str(info["model_type"]))
    table.add_row("architectures", ", ".join(info["architectures"] or []))
    for key, value in info["config"].items():
        table.add_row(key.replace("_", " "), str(value))
    table.add_row("dtype", str(info["dtype"]))
    table.add_row("tensor dtypes", ", ".join(f"{k} x{v}" for k, v in info["tensor_dtypes"].items()))
    table.add_row("parameters", f"{info['parameters'] / 1e6:.1f} M")
    table.add_row("size on disk", f"{info['size_bytes'] / 2**20:.1f} MiB")
    q = info["quantization"]
    table.add_row("quantization", "none" if q is None else f"{q['quant_method']} ({q['format']})")
    stdout.print(table)
    if q and q["by_type"]:
        modules = Table("modules", "scheme", "count", title="quantized modules")
        for row in q["by_type"]:
            modules.add_row(row["modules"], row["scheme"], str(row["count"]))
        stdout.print(modules)
        stdout.print(f"not quantized: {', '.join(q['ignore'] or []) or '-'}")


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False):
    if version:
        stdout.print(f"qconvert {__version__}")
        raise typer.Exit()


def run(argv: list[str]) -> int:
    """Run the command line on argv; returns the exit code (2 for a user error, one line on stderr)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        code = app(args=argv, prog_name="qconvert", standalone_mode=False, obj={"argv": argv})
        return code if isinstance(code, int) else 0  # a command's typer.Exit(code) comes back as its value
    except QConvertError as exc:
        stderr.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        stderr.print("[bold red]aborted[/]")
        return 1
    except typer.TyperException as exc:  # usage errors: typer prints them with the usage line
        exc.show()
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        stderr.print("[bold red]interrupted[/]")
        return 130


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=stderr, show_time=False, show_path=False)])
    sys.exit(run(sys.argv[1:]))
