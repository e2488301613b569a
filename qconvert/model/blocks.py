"""transformers' own modules, built empty and filled one decoder block at a time.

The model is instantiated on the meta device (buffers such as rotary frequencies stay real), so
no weight is allocated until a block is loaded; the inputs of every block (hidden states and the
keyword arguments the model passes it: masks, rotary embeddings) are recorded once by running the
model with recorders standing in for its blocks.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from qconvert.errors import QConvertError
from qconvert.model.architectures import Architecture
from qconvert.model.checkpoint import Checkpoint, finite_flag
from qconvert.model.moe import unfuse_experts


def build_skeleton(ckpt: Checkpoint, arch: Architecture, dtype: torch.dtype) -> PreTrainedModel:
    """The model on the meta device; real buffers (rotary frequencies, embedding scales) in `dtype`."""
    config = AutoConfig.from_pretrained(ckpt.path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=arch.attn_implementation, dtype=dtype)
    return model.eval().requires_grad_(False)


def decoder_blocks(model: PreTrainedModel, arch: Architecture) -> nn.ModuleList:
    return model.get_submodule(arch.layers)


def set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    module = root.get_submodule(path) if path else root
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def block_file_names(ckpt: Checkpoint, arch: Architecture, index: int) -> dict[str, str]:
    """Memory name (inside the block) -> checkpoint tensor name, for block `index`."""
    prefix = f"{arch.layers}.{index}."
    return {arch.to_memory(n)[len(prefix):]: n for n in ckpt.names() if n.startswith(prefix)}


@dataclass
class ReadBlock:
    """A block read ahead of its turn (see read_block): its tensors as stored (file name -> CPU tensor)
    and, for a GPU, their copies there, made on a side stream while the block before it computes."""

    stored: dict[str, torch.Tensor]
    copies: dict[str, torch.Tensor] = field(default_factory=dict)  # file name -> on the GPU, in the compute dtype
    finite: torch.Tensor | None = None  # per floating copy, in copies' order: no NaN/Inf in it
    done: torch.cuda.Event | None = None


def read_block(ckpt: Checkpoint, arch: Architecture, index: int, device=None, dtype=None) -> ReadBlock:
    """Block `index`'s tensors as stored, not yet checked for NaN/Inf: the part of loading that runs in a
    background thread while the previous block computes. With a CUDA `device`, read into page-locked
    memory (a GPU copies from it three to four times faster) and copied to the GPU in `dtype` on a side
    stream, the NaN/Inf check queued there too: 9 ms per 8B layer that no longer wait in line."""
    device = None if device is None else torch.device(device)
    on_gpu = device is not None and device.type == "cuda"
    stored = ckpt.load(list(block_file_names(ckpt, arch, index).values()), check=False, pin=on_gpu)
    if not on_gpu:
        return ReadBlock(stored)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        copies = {n: t.to(device, non_blocking=True) for n, t in stored.items()}
        copies = {n: t.to(dtype) if t.is_floating_point() else t for n, t in copies.items()}
        ends = [finite_flag(t) for t in copies.values() if t.is_floating_point()]
        finite = torch.stack(ends) if ends else None
        done = torch.cuda.Event()
        done.record(side)
    return ReadBlock(stored, copies, finite, done)


def load_block(
    block: nn.Module, ckpt: Checkpoint, arch: Architecture, index: int, device, dtype,
    read: ReadBlock | None = None,
) -> dict[str, torch.Tensor]:
    """Fill block `index` with its weights (cast to `dtype` on `device`, checked for NaN/Inf there),
    from `read` when read_block already read them.

    Returns the tensors as stored (memory name -> tensor in the file's dtype, on CPU).
    """
    if arch.moe:
        unfuse_experts(block, arch.moe)
    files = block_file_names(ckpt, arch, index)
    params = [n for n, _ in block.named_parameters()]
    missing = [n for n in params if n not in files]
    if missing:
        names = ", ".join(arch.to_file(f"{arch.layers}.{index}.{m}") for m in missing[:3])
        raise QConvertError(f"{ckpt.path}: layer {index} lacks {names}")
    if read is None:
        read = read_block(ckpt, arch, index)
    if read.copies:
        _take_copies(read, ckpt)
    originals = {n: read.stored[files[n]] for n in params}
    for name, tensor in originals.items():
        if files[name] in read.copies:
            set_param(block, name, read.copies[files[name]])
            continue
        on_device = tensor.to(device=device, non_blocking=True)
        ckpt.check_finite(files[name], on_device)
        set_param(block, name, on_device.to(dtype))
    return originals


def _take_copies(read: ReadBlock, ckpt: Checkpoint) -> None:
    """Hand read_block's GPU copies over to this thread's stream, after their NaN/Inf check."""
    stream = torch.cuda.current_stream(read.done.device)
    stream.wait_event(read.done)
    for t in read.copies.values():
        t.record_stream(stream)  # their memory is not reused before this stream is done with them
    if read.finite is not None and not bool(read.finite.all()):
        floating = [n for n, t in read.copies.items() if t.is_floating_point()]
        raise ckpt.not_finite(floating[int((~read.finite).nonzero()[0])])


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS; glibc otherwise keeps each block's freed tensors
    as fragmented heap, and resident memory creeps up by about a block per layer."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def final_norm(model: PreTrainedModel, ckpt: Checkpoint, options) -> nn.Module:
    """The norm between the last block and lm_head, loaded (it is tiny)."""
    inner = getattr(model, model.base_model_prefix)
    prefix = f"{model.base_model_prefix}.norm."
    norm = inner.norm
    for name, _ in list(norm.named_parameters()):
        set_param(norm, name, ckpt.get(prefix + name).to(device=options.device, dtype=options.dtype))
    return norm


def unload_block(block: nn.Module) -> None:
    block.to("meta")
    _malloc_trim()


@dataclass
class BlockInputs:
    """Calibration activations entering the current block, in mini-batches."""

    hidden: list[torch.Tensor]
    # per block index, per mini-batch size: the positional args after hidden_states and the kwargs
    call_args: list[dict[int, tuple[tuple, dict]]] = field(default_factory=list)

    def args_for(self, index: int, batch: torch.Tensor) -> tuple[tuple, dict]:
        return self.call_args[index][batch.shape[0]]


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder block: notes what it is called with, passes hidden states through."""

    def __init__(self, block: nn.Module, index: int, last: bool, sink):
        super().__init__()
        self.__dict__["_block"] = block  # not a submodule: its meta weights must not be touched
        self.index, self.last, self.sink = index, last, sink

    def __getattr__(self, name):  # the model loop may read block attributes (attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.sink(self.index, hidden_states, args, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


def _to(obj, device, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _renumber(tokens: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct token ids in order, and tokens as indices into them (torch.unique's result, through a
    vocabulary-sized table: a sort of 64k ids took a fifth of a second)."""
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        raise QConvertError(f"calibration token id {low if low < 0 else high} is outside the model's "
                            f"vocabulary of {vocab}")
    present = torch.zeros(vocab, dtype=torch.bool)
    present[tokens] = True
    used = present.nonzero().squeeze(1)
    index = torch.empty(vocab, dtype=torch.long)
    index[used] = torch.arange(len(used))
    return used, index[tokens]


def _buffers_to(model: nn.Module, device) -> None:
    """The skeleton's real buffers (rotary frequencies, embedding scales) onto `device`; weights stay meta."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:
                module._buffers[name] = buf.to(device)


@torch.no_grad()
def capture_block_inputs(
    model: PreTrainedModel,
    ckpt: Checkpoint,
    arch: Architecture,
    tokens: torch.Tensor,
    batch_size: int,
    device,
    dtype,
) -> BlockInputs:
    """Embed the calibration tokens on `device` and record what every block is called with."""
    embed = model.get_input_embeddings()
    embed_name = next(n for n, p in model.named_parameters() if p is embed.weight)
    # only the rows the tokens use, renumbered: a 128k-token vocabulary is 1 GB that the blocks never
    # see (the rows are checked for NaN/Inf here; the whole table is checked when it is written)
    used, tokens = _renumber(tokens, embed.weight.shape[0])
    rows = ckpt.load_rows(embed_name, used)
    ckpt.check_finite(embed_name, rows)
    set_param(model, embed_name, rows.to(device=device, dtype=dtype))
    # on the GPU the embedding, rotary tables and masks cost milliseconds; on the host they were most of
    # a second for 128 x 512 tokens of an 8B model, plus copying 0.5 GB of hidden states over
    _buffers_to(model, device)
    blocks = decoder_blocks(model, arch)
    originals = list(blocks)
    inputs = BlockInputs(hidden=[], call_args=[{} for _ in originals])

    def sink(index, hidden, args, kwargs):
        if index == 0:
            inputs.hidden.append(hidden.to(device))
        b = hidden.shape[0]
        if b not in inputs.call_args[index]:
            inputs.call_args[index][b] = (_to(args, device, dtype), _to(kwargs, device, dtype))

    for i, block in enumerate(originals):
        blocks[i] = _Recorder(block, i, i == len(originals) - 1, sink)
    try:
        inner = getattr(model, model.base_model_prefix)
        for batch in tokens.split(batch_size):
            try:
                inner(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        embed.to("meta")
    return inputs


@torch.no_grad()
def run_block(block: nn.Module, index: int, inputs: BlockInputs, stop_at: nn.Module | None = None,
              keep: int | None = None, cache=None, enough=None) -> list[torch.Tensor]:
    """The block's outputs for every mini-batch (the first `keep` only, when given); with `stop_at`,
    each pass ends where that module would run (for hooks that only need the part before it) and
    nothing is returned; `cache` is handed to the attention as its KV cache; `enough()` true after a
    mini-batch ends the run there."""
    handle = None
    if stop_at is not None:
        def stop(_module, _args):
            raise _Stop

        handle = stop_at.register_forward_pre_hook(stop)
    outputs = []
    try:
        for hidden in inputs.hidden:
            args, kwargs = inputs.args_for(index, hidden)
            if cache is not None:
                kwargs = {**kwargs, "past_key_values": cache}
            try:
                out = block(hidden, *args, **kwargs)
                if keep is None or len(outputs) < keep:
                    outputs.append(out[0] if isinstance(out, tuple) else out)
            except _Stop:
                pass
            if enough is not None and enough():
                break
    finally:
        if handle is not None:
            handle.remove()
    return outputs
