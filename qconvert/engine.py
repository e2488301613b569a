"""The layer-by-layer loop: one decoder block in memory at a time.

For each block: load its weights; if there is calibration data, run the block's inputs through it
(hooks count what each linear sees); quantize its linears in sequential order and hand each result
to the writer at once; pass the other tensors through; run the quantized block to get the next
block's inputs; free it. Tensors outside the blocks (embeddings, final norm, lm_head) are streamed
through unquantized.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch

from qconvert import distributed
from qconvert.algorithms import Algorithm, InputSet, algorithm_for
from qconvert.errors import QConvertError
from qconvert.formats.fanout import scale_dtypes
from qconvert.kv_cache import KVObserver, scale_names
from qconvert.model.architectures import Architecture
from qconvert.model.blocks import (
    block_file_names,
    build_skeleton,
    capture_block_inputs,
    decoder_blocks,
    final_norm,
    load_block,
    read_block,
    run_block,
    set_param,
    unload_block,
)
from qconvert.model.checkpoint import Checkpoint
from qconvert.model.moe import unfuse_experts
from qconvert.quantized import FP8Tensor, QuantizedTensor

log = logging.getLogger(__name__)

ERROR_BATCHES = 4  # mini-batches whose block outputs measure each layer's output error
SAMPLE_TOKENS = 1024  # calibration tokens of each linear's input kept to measure its output error


@dataclass(frozen=True)
class EngineOptions:
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # compute dtype of blocks and activations
    batch_size: int = 8
    kv_cache: bool = False  # calibrate FP8 KV-cache scales on the quantized blocks' keys and values


@dataclass
class LinearReport:
    weight_error: float  # ||W - Q||^2 / ||W||^2
    tokens: int | None  # calibration tokens the linear saw (None without calibration)
    output_error: float | None = None  # ||X(W - Q)^T||^2 / ||XW^T||^2 on a sample X of its calibration inputs
    bits: int | None = None
    group: str | None = None  # "g128", "channel", "tensor", "block128x128"
    seconds: float = 0.0  # its input set's quantization time, shared equally among the set's linears


@dataclass
class LayerReport:
    index: int
    seconds: float
    linears: dict[str, LinearReport] = field(default_factory=dict)
    output_error: float | None = None  # ||Y_q - Y||^2 / ||Y||^2 of the block on the first calibration batches
    uncalibrated: list[str] = field(default_factory=list)  # linears that saw no calibration token

    @property
    def weight_error(self) -> float:
        errs = [r.weight_error for r in self.linears.values()]
        return sum(errs) / max(len(errs), 1)


def group_size_of(config) -> int:
    return getattr(config, "group_size", -1)


def preflight(ckpt: Checkpoint, arch: Architecture, config) -> int:
    """Check every linear to quantize before anything is written; returns how many there are."""
    group = group_size_of(config)
    count = 0
    for name, (_, cols) in arch.quantized_weights(ckpt):
        count += 1
        if group > 0 and cols % group:
            divisors = [g for g in (32, 64, 128) if cols % g == 0]
            hint = f"; group sizes that divide it: {', '.join(map(str, divisors))}" if divisors else ""
            raise QConvertError(
                f"{name}: input size {cols} is not a multiple of group size {group}"
                f" (compressed-tensors requires it){hint}, or use --group -1"
            )
    if count == 0:
        raise QConvertError(f"{ckpt.path}: no linear layer to quantize was found under '{arch.layers}'")
    return count


def _weight_error(qt, w: torch.Tensor, chunk: int = 1 << 22) -> float:
    """_relative_error of the dequantized result, `chunk` values at a time where the result can be sliced
    by rows (a 28672-row linear's dequantized float32 copy is a gigabyte, and dequantizing makes several)."""
    if not isinstance(qt, QuantizedTensor):
        return _relative_error(qt.dequantize().to(w.device), w)
    num = den = 0.0
    rows = max(1, chunk // w.shape[1])
    for r in range(0, w.shape[0], rows):
        part, ref = qt.rows(slice(r, r + rows)).dequantize().to(w.device).float(), w[r:r + rows].float()
        num += float((part - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / max(den, 1e-30)


def _reduce(stats, ranks: distributed.Ranks) -> None:
    """Combine a statistic over the ranks (each saw its own share of the calibration windows)."""
    if ranks.active and stats is not None:
        stats.reduce(ranks)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    num, den = _error_terms(a, b).tolist()
    return num / max(den, 1e-30)


def _error_terms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[||a - b||², ||b||²] in float64 on a's device, not waited for: row shares of it add up."""
    return torch.stack([(a.float() - b.float()).pow(2).sum(), b.float().pow(2).sum()]).double()


@dataclass
class Observation:
    """What one linear saw of the calibration data: its token count, and the algorithm's statistics."""

    tokens: int = 0
    stats: object | None = None  # anything with update(x: Tensor[..., in])


def _observe(groups, make_stats: Callable[[str, torch.nn.Linear], object | None]):
    """Forward pre-hooks on every linear of `groups`; returns (name -> Observation, handles)."""
    seen: dict[str, Observation] = {}

    def hook(obs: Observation):
        def fn(_module, args):
            x = args[0]
            obs.tokens += x.numel() // x.shape[-1]
            if obs.stats is not None:
                obs.stats.update(x)

        return fn

    handles = []
    for group in groups:
        for name, linear in group:
            seen[name] = Observation(stats=make_stats(name, linear))
            handles.append(linear.register_forward_pre_hook(hook(seen[name])))
    return seen, handles


def input_sets(groups, file_name: Callable[[str], str] = lambda name: name) -> list[InputSet]:
    """Split each sequential group into the linears that read one input (same parent module);
    file_name: a linear's name in the block -> its weight's name in the checkpoint."""
    sets: dict[tuple[int, str], InputSet] = {}
    for gi, group in enumerate(groups):
        for name, linear in group:
            parent = name.rpartition(".")[0]
            s = sets.setdefault((gi, parent), InputSet(gi, parent, [], []))
            s.names.append(name)
            s.linears.append(linear)
            s.files.append(file_name(name))
    return list(sets.values())


class InputSample:
    """The first SAMPLE_TOKENS input rows a linear reads."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        if self.count < SAMPLE_TOKENS:
            rows = x.detach().reshape(-1, x.shape[-1])[: SAMPLE_TOKENS - self.count]
            self.rows.append(rows.clone())
            self.count += rows.shape[0]

    def output_error_terms(self, weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        """_error_terms of the linear's outputs on the sample (weight and quantized: all rows or some); zeros
        when the sample is empty."""
        if not self.count:
            return torch.zeros(2, dtype=torch.float64, device=weight.device)
        x = torch.cat(self.rows).to(weight.dtype)
        return _error_terms(torch.nn.functional.linear(x, quantized), torch.nn.functional.linear(x, weight))


def _feed(sets: list[InputSet], algorithm: Algorithm, samples: dict) -> tuple[dict[str, object], list]:
    """Hook each set's first linear so its input feeds the algorithm's statistics and an input sample
    (replacing the set's entry in `samples`)."""
    stats, handles = {}, []
    for s in sets:
        acc = algorithm.statistics(s)
        sample = samples[s.key] = InputSample()

        def feed(_m, args, acc=acc, sample=sample):
            sample.update(args[0])
            if acc is not None:
                acc.update(args[0])

        if acc is not None:
            stats[s.key] = acc
        handles.append(s.linears[0].register_forward_pre_hook(feed))
    return stats, handles


def _stop_before(group: list[tuple[str, torch.nn.Linear]] | None) -> torch.nn.Module | None:
    """A linear of the next group that every token reaches (not a routed expert): the forward pass
    that collects one group's statistics can stop there."""
    for name, linear in group or []:
        if ".experts." not in f".{name}":
            return linear
    return None


def convert(
    ckpt: Checkpoint,
    arch: Architecture,
    config,
    writer,
    tokens: torch.Tensor | None,
    options: EngineOptions,
    on_layer: Callable[[LayerReport], None] = lambda r: None,
) -> list[LayerReport]:
    """Quantize every block of `ckpt` with `config`'s algorithm into `writer`."""
    preflight(ckpt, arch, config)
    algorithm = algorithm_for(config, arch)
    on_gpu = options.device.type == "cuda"
    ranks = distributed.current()
    tokens = _share_of(tokens, ranks)
    reports = []
    with ThreadPoolExecutor(max_workers=3) as pool:
        # the GPU libraries and kernels load while the CPU builds the model and embeds the calibration
        # tokens; the tensors outside the blocks (embeddings, lm_head: 2 GB for an 8B model) are written
        # meanwhile, and each block is read while the one before it computes
        background = []
        outside = _reserve_outside_blocks(ckpt, arch, writer) if ranks.writes else []
        if tokens is not None:
            background.append(pool.submit(_write_outside_blocks, ckpt, arch, writer, outside))
        if on_gpu and tokens is not None:
            background += _warm_up_all(options, algorithm)
        upcoming = pool.submit(_read_ahead, ckpt, arch, 0, options) if tokens is not None else None
        model = build_skeleton(ckpt, arch, options.dtype)
        blocks = decoder_blocks(model, arch)
        inputs = None
        if tokens is not None:
            inputs = capture_block_inputs(model, ckpt, arch, tokens, options.batch_size, options.device, options.dtype)
        for index, block in enumerate(blocks):
            start = time.perf_counter()
            if inputs is None:
                report = _stream_block(block, index, ckpt, arch, algorithm, writer, options.device)
            else:
                ahead = upcoming.result()
                if index + 1 < len(blocks):
                    upcoming = pool.submit(_read_ahead, ckpt, arch, index + 1, options)
                originals = load_block(block, ckpt, arch, index, options.device, options.dtype, ahead)
                del ahead
                step = _BlockStep(block, index, arch, algorithm, writer, inputs, options.kv_cache, ranks)
                report = step.run(originals)
            unload_block(block)
            report.seconds = time.perf_counter() - start
            if report.uncalibrated:
                log.warning("layer %d: %d linear(s) saw no calibration token: %s", index,
                            len(report.uncalibrated), ", ".join(report.uncalibrated[:4]))
            reports.append(report)
            on_layer(report)
        if tokens is None:  # nothing to overlap them with: after the blocks, so as not to add to a block's peak
            _write_outside_blocks(ckpt, arch, writer, outside)
        for job in background:
            job.result()
    return reports


def _warm_up_all(options: EngineOptions, algorithm: Algorithm) -> list[Future]:
    """Start the model's and the algorithm's warm-ups, each in a thread of its own (each takes up to a
    second, mostly waiting in a library's start-up). The threads end when done: a thread's cuBLAS and
    cuSOLVER handles then go back to torch's pool, and the main thread takes them over instead of making
    its own (another third of a second)."""
    jobs = [partial(_warm_up, options), *algorithm.warm_ups(options.device)]
    warm = ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="warm-up")
    started = [warm.submit(_on, options.device, job) for job in jobs]
    warm.shutdown(wait=False)
    return started


def _on(device: torch.device, fn, *args):
    """fn(*args) in a pool thread with `device` as its current GPU: CUDA's current device belongs to a
    thread, and another rank's thread would otherwise launch on GPU 0."""
    if device.type != "cuda":
        return fn(*args)
    with torch.cuda.device(device):
        return fn(*args)


def _read_ahead(ckpt: Checkpoint, arch: Architecture, index: int, options: EngineOptions):
    return _on(options.device, read_block, ckpt, arch, index, options.device, options.dtype)


def _share_of(tokens: torch.Tensor | None, ranks: distributed.Ranks) -> torch.Tensor | None:
    """This rank's calibration windows (all of them in a single process)."""
    if tokens is None or not ranks.active:
        return tokens
    if tokens.shape[0] < ranks.world:
        raise QConvertError(f"{tokens.shape[0]} calibration window(s) for {ranks.world} processes: give each "
                            "at least one (--samples)")
    return ranks.samples(tokens)


def _stream_block(block, index: int, ckpt: Checkpoint, arch: Architecture, algorithm: Algorithm, writer,
                  device: torch.device) -> LayerReport:
    """Without calibration nothing runs through a block: each linear is read, quantized, written and
    dropped in turn, in the checkpoint's dtype, so memory holds one linear at a time (a checkpoint larger
    than RAM converts). No algorithm that runs without calibration needs a set's linears together."""
    if arch.moe:
        unfuse_experts(block, arch.moe)
    files = block_file_names(ckpt, arch, index)
    step = _BlockStep(block, index, arch, algorithm, writer, None)
    weights = [f"{n}.weight" for s in step.sets for n in s.names]
    missing = [arch.to_file(f"{step.prefix}{n}") for n in weights if n not in files]
    if missing:
        raise QConvertError(f"{ckpt.path}: layer {index} lacks {', '.join(missing[:3])}")
    dtypes = scale_dtypes(getattr(writer, "writers", [writer]), ckpt.torch_dtype(files[weights[0]]))
    alone = [InputSet(s.group, s.parent, [n], [lin], [f])
             for s in step.sets for n, lin, f in zip(s.names, s.linears, s.files)]
    for s in alone:
        (name,), (lin,) = s.names, s.linears
        weight = files[f"{name}.weight"]
        set_param(block, f"{name}.weight", ckpt.load([weight])[weight].to(device))
        step._apply(s, dtypes, *step._quantize([s], {}, dtypes)[s.key], keep=False)
        lin.to("meta")
    for name in sorted(set(files) - set(weights)):
        writer.add_tensor(files[name], ckpt.get(files[name]))
    return step.report


def _warm_up(options: EngineOptions) -> None:
    """The first matrix product and attention call in a process load cuBLAS and the attention kernels:
    done while the CPU embeds the calibration tokens."""
    x = torch.randn(1, 2, 128, 64, device=options.device, dtype=options.dtype)
    torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(128, 128, dtype=torch.bool,
                                                                                    device=x.device).tril())
    x = torch.randn(256, 256, device=options.device, dtype=options.dtype)
    torch.nn.functional.linear(x, x)


def _reserve_outside_blocks(ckpt: Checkpoint, arch: Architecture, writer) -> list[str]:
    """Place the tensors outside the blocks first in the output, in sorted order, from their headers: the
    files are the same bytes every run, whenever the background thread gets to read them."""
    names = sorted(n for n in ckpt.names() if not arch.in_blocks(n))
    for name in names:
        writer.reserve_tensor(name, ckpt.torch_dtype(name), ckpt.shape(name))
    return names


def _write_outside_blocks(ckpt: Checkpoint, arch: Architecture, writer, names: list[str]) -> None:
    for name in names:
        writer.add_tensor(name, ckpt.get(name))


def bits_and_group(qt) -> tuple[int, str]:
    if isinstance(qt, FP8Tensor):
        if qt.block is not None:
            return 8, f"block{qt.block[0]}x{qt.block[1]}"
        return 8, "tensor" if qt.scale.numel() == 1 else "channel"
    if isinstance(qt, QuantizedTensor):
        return qt.bits, "channel" if qt.group_size == -1 else f"g{qt.group_size}"
    return qt.bits, qt.group  # a GGUF tensor: bits per weight, its block type(s)


class _BlockStep:
    """One loaded block through the algorithm: reference pass, rewrite, quantization group by group,
    writing, and the pass that yields the next block's inputs."""

    def __init__(self, block, index: int, arch: Architecture, algorithm: Algorithm, writer, inputs, kv_cache=False,
                 ranks: distributed.Ranks = distributed.Ranks()):
        self.block, self.index, self.arch, self.algorithm = block, index, arch, algorithm
        self.writer, self.inputs, self.kv_cache, self.ranks = writer, inputs, kv_cache, ranks
        self.prefix = f"{arch.layers}.{index}."
        self.groups = arch.linear_groups(block)
        self.sets = input_sets(self.groups, lambda name: arch.to_file(f"{self.prefix}{name}.weight"))
        self.report = LayerReport(index, 0.0)
        self.seen: dict[str, Observation] | None = None
        self.samples: dict[tuple[int, str], InputSample] = {}
        # error terms of the linears put back in the block, added up over the ranks once, with the block's
        self.terms: list[tuple[LinearReport, str, torch.Tensor]] = []

    def run(self, originals: dict[str, torch.Tensor]) -> LayerReport:
        calibrated = self.inputs is not None
        stats, reference = self._reference_pass() if calibrated else ({}, None)
        changed = self.algorithm.transform(self.block, self.sets) if calibrated else set()
        if changed:  # the statistics of the reference pass describe the block before its rewrite
            stats = self._group_statistics(0 if self.algorithm.sequential else None)
        # the scale dtype of each layout written (one quantize() per distinct one)
        dtypes = scale_dtypes(getattr(self.writer, "writers", [self.writer]),
                              originals[f"{self.sets[0].names[0]}.weight"].dtype)
        for gi in range(len(self.groups)):
            if calibrated and self.algorithm.sequential and gi > 0:
                stats = self._group_statistics(gi)
            sets = [s for s in self.sets if s.group == gi]
            for s in sets:  # the same order on every rank: each reduction is a collective
                _reduce(stats.get(s.key), self.ranks)
            results = self._quantize(sets, stats, dtypes)
            for s in sets:
                self._apply(s, dtypes, *results[s.key])
        self._write_rest(originals, changed)
        if calibrated:
            self._advance(reference, originals)
        self._settle_errors()
        return self.report

    def _reference_pass(self):
        """The unquantized block's outputs (first batches), with token counts, the algorithm's hooks, and
        the statistics of the first group (of every group, unless the algorithm is sequential)."""
        first = [s for s in self.sets if s.group == 0 or not self.algorithm.sequential]
        self.seen, handles = _observe(self.groups, lambda n, l: None)
        stats, feed = _feed(first, self.algorithm, self.samples)
        handles += feed + self.algorithm.observe(self.block, self.sets)
        # the output error is measured on the first mini-batches: keeping every reference output
        # would hold a second copy of the calibration activations through the whole block
        reference = run_block(self.block, self.index, self.inputs, keep=ERROR_BATCHES)
        for h in handles:
            h.remove()
        _reduce_observations(self.seen.values(), self.ranks)  # token counts (these carry no statistics)
        return stats, reference

    def _group_statistics(self, gi: int | None) -> dict:
        """Group gi's statistics (every group's for None) on the outputs of the groups already
        quantized before it."""
        sets = [s for s in self.sets if gi is None or s.group == gi]
        stats, handles = _feed(sets, self.algorithm, self.samples)
        if sets:
            following = self.groups[gi + 1] if gi is not None and gi + 1 < len(self.groups) else None
            # the last group: when one linear's input feeds it all, the pass can end right there
            # (its statistics hook runs before the stop, being registered first)
            stop = _stop_before(following) if following else sets[0].linears[0] if len(sets) == 1 else None
            # without statistics the pass only fills the input samples: their first mini-batches do
            enough = None if stats else lambda: all(self.samples[s.key].count >= SAMPLE_TOKENS for s in sets)
            run_block(self.block, self.index, self.inputs, stop_at=stop, enough=enough)
        for h in handles:
            h.remove()
        return stats

    def _quantize(self, sets: list[InputSet], stats: dict, dtypes: list[torch.dtype]) -> dict:
        """Quantize one group's input sets: {key: ({scale dtype: results}, seconds per linear)}. Among several
        ranks each set is quantized by one of them and shared, unless the algorithm divides its own work."""

        def quantize(s: InputSet):
            start = time.perf_counter()
            set_stats = stats.pop(s.key, None)
            results = {d: self.algorithm.quantize(s, set_stats, d) for d in dict.fromkeys(dtypes)}
            return results, (time.perf_counter() - start) / len(s.names) / len(results)

        if not self.ranks.active or self.algorithm.divides_work:
            return {s.key: quantize(s) for s in sets}
        owners = self.ranks.owners([sum(lin.weight.numel() for lin in s.linears) for s in sets])
        mine = {s.key: quantize(s) for s, r in zip(sets, owners) if r == self.ranks.rank}
        return {s.key: self.ranks.share(mine.get(s.key), r) for s, r in zip(sets, owners)}

    def _apply(self, s: InputSet, dtypes: list[torch.dtype], results: dict, seconds: float, keep=True) -> None:
        """Write one input set's results and put its dequantized weights back into the block (those of the
        first writer, when one pass is written in several layouts; keep=False: nothing runs the block
        again, so nothing is put back)."""
        writers = getattr(self.writer, "writers", [self.writer])
        sample = self.samples.get(s.key)
        for i, (name, lin) in enumerate(zip(s.names, s.linears)):
            for w, d in zip(writers, dtypes):
                w.add_quantized(s.files[i], results[d][i])
            qt = results[dtypes[0]][i]
            tokens_seen = None if self.seen is None else self.seen[name].tokens
            if tokens_seen == 0:
                self.report.uncalibrated.append(name)
            report = self.report.linears[name] = LinearReport(0.0, tokens_seen, None, *bits_and_group(qt),
                                                              round(seconds, 4))
            if not keep:
                report.weight_error = _weight_error(qt, lin.weight)
                continue
            dq = qt.dequantize().to(device=lin.weight.device, dtype=lin.weight.dtype)
            # each rank measures its share of the rows; not waited for here (a wait per linear kept the GPU idle)
            rows = self.ranks.row_share(dq.shape[0]) if self.ranks.active else slice(None)
            self.terms.append((report, "weight_error", _error_terms(dq[rows], lin.weight[rows])))
            if sample is not None:  # on every rank, its own sample empty or not: the ranks' lists must match
                self.terms.append((report, "output_error", sample.output_error_terms(lin.weight[rows], dq[rows])))
            lin.weight.data = dq

    def _write_rest(self, originals: dict[str, torch.Tensor], changed: set[str]) -> None:
        """The block's other tensors: as stored, or from the block where the algorithm rewrote them."""
        quantized = {f"{n}.weight" for s in self.sets for n in s.names}
        params = dict(self.block.named_parameters())
        for name, tensor in originals.items():
            if name in quantized:
                continue
            if name in changed:
                tensor = params[name].detach().to(device="cpu", dtype=tensor.dtype)
            self.writer.add_tensor(self.arch.to_file(self.prefix + name), tensor)

    def _advance(self, reference: list[torch.Tensor], originals: dict[str, torch.Tensor]) -> None:
        """Run the quantized block: its outputs are the next block's inputs and measure its error; the
        keys and values its attention stores calibrate the KV-cache scales (as the engine will see them,
        from quantized weights)."""
        observer = KVObserver() if self.kv_cache else None
        outputs = run_block(self.block, self.index, self.inputs, cache=observer and observer.cache())
        if observer is not None:
            observer.reduce(self.ranks)
            dtype = originals[f"{self.sets[0].names[0]}.weight"].dtype  # the checkpoint's weight dtype
            names = scale_names(self.arch.layers, self.index)
            for key, scale in observer.scales(dtype).items():
                self.writer.add_tensor(self.arch.to_file(names[key]), scale)
        if reference:
            self.terms.append((self.report, "output_error", sum(_error_terms(o, r) for o, r in zip(outputs, reference))))
        self.inputs.hidden = outputs

    def _settle_errors(self) -> None:
        """The relative errors of the block and its linears, from every rank's terms in one reduction."""
        if not self.terms:
            return
        terms = torch.stack([t for _, _, t in self.terms])
        terms = self.ranks.sum_(terms) if self.ranks.active else terms
        for (report, field_name, _), (num, den) in zip(self.terms, terms.tolist()):
            # no sampled token on any rank: no output error (a weight error of all-zero weights is 0)
            setattr(report, field_name, None if den == 0 and field_name == "output_error" else num / max(den, 1e-30))
        self.terms = []


@torch.no_grad()
def calibrate(
    ckpt: Checkpoint,
    arch: Architecture,
    tokens: torch.Tensor,
    options: EngineOptions,
    make_stats: Callable[[str, torch.nn.Linear], object],
    on_layer: Callable[[LayerReport], None] = lambda r: None,
) -> dict[str, Observation]:
    """Run the calibration data through the unquantized model block by block and return what
    every linear saw, keyed by its checkpoint weight name (lm_head's input included); among several
    ranks, what all of them saw."""
    ranks = distributed.current()
    tokens = _share_of(tokens, ranks)
    model = build_skeleton(ckpt, arch, options.dtype)
    blocks = decoder_blocks(model, arch)
    inputs = capture_block_inputs(model, ckpt, arch, tokens, options.batch_size, options.device, options.dtype)
    observed: dict[str, Observation] = {}
    for index, block in enumerate(blocks):
        start = time.perf_counter()
        load_block(block, ckpt, arch, index, options.device, options.dtype)
        groups = arch.linear_groups(block)
        seen, handles = _observe(groups, make_stats)
        inputs.hidden = run_block(block, index, inputs)
        for h in handles:
            h.remove()
        unload_block(block)
        _reduce_observations(seen.values(), ranks)
        for name, obs in seen.items():
            observed[arch.to_file(f"{arch.layers}.{index}.{name}.weight")] = obs
        report = LayerReport(index, time.perf_counter() - start,
                             uncalibrated=[n for n, o in seen.items() if o.tokens == 0])
        on_layer(report)
    head = model.get_output_embeddings()
    obs = Observation(stats=make_stats("lm_head", head))
    norm = final_norm(model, ckpt, options)
    for hidden in inputs.hidden:
        x = norm(hidden)
        obs.tokens += x.numel() // x.shape[-1]
        obs.stats.update(x)
    _reduce_observations([obs], ranks)
    observed["lm_head.weight"] = obs
    return observed


def _reduce_observations(observations, ranks: distributed.Ranks) -> None:
    observations = list(observations)
    for obs, n in zip(observations, ranks.add([o.tokens for o in observations])):
        obs.tokens = int(n)
        _reduce(obs.stats, ranks)
