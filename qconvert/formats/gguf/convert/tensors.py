"""Which GGUF tensors a checkpoint becomes, in llama.cpp's order, and how each is computed.

Order: generated tensors first (rope_freqs / Phi-3 rope factors), then the checkpoint's tensors in the
order llama.cpp reads them — shard files in sorted order (or the index's files, sorted), names sorted
within a file — with each layer's stacked expert tensors emitted where its last expert tensor is read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from qconvert.model.checkpoint import safetensors_header

from .architectures import GLOBAL as GLOBAL_NAMES
from .architectures import ExpertLayout, Family, HParams, UnsupportedModel, phi3_rope_dims
from .tokenizer import vocab_rows

Loader = Callable[[str], torch.Tensor]

# GGUF tensors that llama.cpp keeps in F32 whatever the output type (besides 1-D tensors, *_norm.weight
# and anything not named *.weight)
F32_TENSORS = ("ffn_gate_inp", "ffn_gate_inp_shexp")
# skipped by llama.cpp's converter
IGNORED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
# tensors of other modalities, dropped from a text model (llama.cpp's TextModel filter)
_MM_PREFIXES = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
                "sound_projection.", "speech_embeddings.")
_MM_PARTS = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.", "projector.",
             "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed", "patch_embedding",
             "patch_merger.", "patch_merge_mlp.", "model.connector.")


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor.

    gguf_name  — its name in the GGUF file
    hf_names   — the checkpoint tensors it is made of (several: experts stacked along a new dim 0;
                 none: generated, see transform "const")
    shape      — GGUF order (ne[0] first: the reverse of the torch shape)
    transform  — ops applied in order to the loaded tensor(s), each a tuple:
                   ("stack",)                 stack hf_names along a new dim 0
                   ("slice", dim, start, stop) keep [start:stop) of dim
                   ("permute", n_head)        llama rope row order: (n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...)
                   ("add", value)             + value (Gemma norms store w - 1)
                   ("const", values)          generated float32 1-D tensor
    is_1d_f32  — llama.cpp keeps it F32 whatever the output type: 1-D tensors, *_norm.weight, biases
                 and MoE router weights (ffn_gate_inp*, which are 2-D)
    """
    gguf_name: str
    hf_names: tuple[str, ...]
    shape: tuple[int, ...]
    transform: tuple[tuple, ...]
    is_1d_f32: bool

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def moves_only(self) -> bool:
        """Its transforms only move the checkpoint's values (stack, slice, permute): no arithmetic."""
        return all(op[0] in ("stack", "slice", "permute") for op in self.transform)


# ---------------------------------------------------------------------------------------------------
# checkpoint index

@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]


def index_checkpoint(model_dir: Path) -> list[SourceTensor]:
    """The checkpoint's tensors in llama.cpp's reading order."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UnsupportedModel(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(p.name for p in model_dir.iterdir()
                       if p.name.startswith("model") and p.name.endswith(".safetensors"))
    if not files:
        raise UnsupportedModel(f"no model*.safetensors in {model_dir} (GGUF conversion reads safetensors only)")
    out: list[SourceTensor] = []
    for file in files:
        header, _ = safetensors_header(model_dir / file)
        for name in sorted(k for k in header if k != "__metadata__"):
            meta = header[name]
            out.append(SourceTensor(name, file, meta["dtype"], tuple(meta["shape"])))
    if weight_map is not None and set(weight_map) != {t.name for t in out}:
        missing = sorted(set(weight_map) - {t.name for t in out})
        extra = sorted({t.name for t in out} - set(weight_map))
        raise UnsupportedModel(f"weight map and shards disagree: missing {missing[:5]}, extra {extra[:5]}")
    return out


class SafetensorsLoader:
    """loader(name) -> tensor for a local checkpoint (safetensors, possibly sharded)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open
        self._open = safe_open
        self.model_dir = Path(model_dir)
        self.files = {t.name: t.file for t in index_checkpoint(self.model_dir)}
        self._handles: dict[str, object] = {}

    def __call__(self, name: str) -> torch.Tensor:
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = self._open(str(self.model_dir / file), framework="pt")
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


# ---------------------------------------------------------------------------------------------------
# planning

def _rename(name: str, family: Family) -> str | None:
    """llama.cpp's tensor filters: None drops the tensor, otherwise the (possibly renamed) name."""
    if family.rope_permute:  # llama classes: SmolVLM's text_model prefix
        name = name.replace("text_model.", "")
    if family.drop_lm_head and name == "lm_head.weight":
        return None
    if name.startswith(_MM_PREFIXES) or any(p in name for p in _MM_PARTS):
        return None
    if name.endswith("e_score_correction_bias"):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    return name.replace("language_model.", "")


def _block_id(name: str) -> int | None:
    return next((int(p) for p in name.split(".") if p.isdecimal()), None)


def gguf_name(name: str, family: Family, bid: int | None) -> str:
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if base in GLOBAL_NAMES:
                return GLOBAL_NAMES[base] + suffix
            prefix = f"model.layers.{bid}."
            if bid is not None and base.startswith(prefix) and base[len(prefix):] in family.layer:
                return f"blk.{bid}.{family.layer[base[len(prefix):]]}{suffix}"
    raise UnsupportedModel(f"cannot map tensor {name!r} to a GGUF tensor of {family.gguf_arch}")


def _must_be_f32(name: str, ndim: int) -> bool:
    if ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return True
    return re.sub(r"^blk\.\d+\.", "", name[: -len(".weight")]) in F32_TENSORS


def _spec(name: str, hf_names: tuple[str, ...], torch_shape: tuple[int, ...], ops: tuple[tuple, ...]) -> TensorSpec:
    return TensorSpec(name, hf_names, tuple(reversed(torch_shape)), ops, _must_be_f32(name, len(torch_shape)))


def llama3_rope_factors(hp: HParams) -> list[float]:
    """Meta's Llama-3.1 frequency scaling, computed in float32 the way llama.cpp's converter does."""
    rope = hp.full_rope
    base = rope.get("rope_theta", 10000.0)
    dim = hp.get("head_dim")
    if dim is None:
        dim = hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).tolist()


def generated_tensors(family: Family, hp: HParams) -> tuple[list[TensorSpec], dict[str, float]]:
    """Tensors llama.cpp computes from config.json (emitted before the checkpoint's), and KV entries
    that it sets while doing so (they land right after general.architecture)."""
    specs: list[TensorSpec] = []
    early_kv: dict[str, float] = {}
    if family.rope_freqs and hp.full_rope and str(hp.full_rope.get("rope_type", "")).lower() == "llama3":
        values = llama3_rope_factors(hp)
        specs.append(_spec("rope_freqs.weight", (), (len(values),), (("const", tuple(values)),)))
    if family.long_rope and (long := hp.rope.get("long_factor")):
        short = hp.rope.get("short_factor")
        max_pos = hp.find(("n_positions", "max_position_embeddings"), optional=False)
        orig = hp.rope["original_max_position_embeddings"]
        scale = max_pos / orig
        kind = str(hp.rope.get("rope_type", "")).lower()
        if kind in ("su", "longrope"):
            attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        elif kind == "yarn":
            attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        else:
            raise UnsupportedModel(f"Phi-3 rope scaling type {kind!r} is not supported")
        early_kv[f"{family.gguf_arch}.rope.scaling.attn_factor"] = attn
        n = phi3_rope_dims(hp) / 2
        if short is None or len(long) != len(short) or len(long) != n:
            raise UnsupportedModel(f"Phi-3 rope long/short factors must both have {n} values")
        specs.append(_spec("rope_factors_long.weight", (), (len(long),), (("const", tuple(float(x) for x in long)),)))
        specs.append(_spec("rope_factors_short.weight", (), (len(short),), (("const", tuple(float(x) for x in short)),)))
    return specs, early_kv


def plan_tensors(model_dir: Path, family: Family, hp: HParams) -> tuple[list[TensorSpec], dict[str, float]]:
    """The GGUF tensors of the checkpoint in llama.cpp's order (+ KV set on the way, see generated_tensors)."""
    if hp.get("quantization_config"):
        raise UnsupportedModel("the checkpoint is already quantized; GGUF conversion needs a float checkpoint")
    specs, early_kv = generated_tensors(family, hp)
    n_head = hp.find(("n_heads", "num_attention_heads"), optional=not family.rope_permute)
    n_kv_head = hp.find(("n_kv_heads", "num_key_value_heads"), optional=not family.rope_permute)
    experts = family.experts
    pending: dict[int, dict[str, SourceTensor]] = {}
    vocab_cut: int | None = None
    originals: dict[str, str] = {}
    for src in index_checkpoint(model_dir):
        name = _rename(src.name, family)
        if name is None or name.endswith(IGNORED_SUFFIXES):
            continue
        originals[name] = src.name
        bid = _block_id(name)
        shape = src.shape
        ops: list[tuple] = []
        if family.trim_vocab_rows and "embed_tokens.weight" in name:
            if vocab_cut is None:
                vocab_cut = vocab_rows(Path(model_dir), hp.d)
            if vocab_cut < shape[0]:
                ops.append(("slice", 0, 0, vocab_cut))
                shape = (vocab_cut, *shape[1:])
        if family.norm_shift and name.endswith("norm.weight"):
            ops.append(("add", family.norm_shift))
        if family.rope_permute:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                ops.append(("permute", n_head))
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                ops.append(("permute", n_kv_head if n_kv_head is not None and n_kv_head != n_head else n_head))
        if experts is not None and experts.fused and bid is not None:
            base = name.removesuffix(".weight")
            if base.endswith(f"{experts.prefix}.down_proj"):
                specs.append(_spec(_expert_gguf_name(experts, "down_proj", bid), (src.name,), shape, tuple(ops)))
                continue
            if base.endswith(f"{experts.prefix}.gate_up_proj"):
                if len(shape) < 3 or shape[-2] % 2:
                    raise UnsupportedModel(f"unexpected gate_up_proj shape {shape} for {name}")
                n_ff = shape[-2] // 2
                half = (*shape[:-2], n_ff, shape[-1])
                for part, (start, stop) in (("gate_proj", (0, n_ff)), ("up_proj", (n_ff, 2 * n_ff))):
                    target = _expert_gguf_name(experts, part, bid)
                    specs.append(_spec(target, (src.name,), half, (*ops, ("slice", len(shape) - 2, start, stop))))
                continue
        if experts is not None and experts.marker in name:
            if bid is None:
                raise UnsupportedModel(f"expert tensor without a layer number: {name}")
            layer = pending.setdefault(bid, {})
            layer[name] = src
            n_experts = hp.find(experts.count_keys, optional=False)
            if len(layer) >= n_experts * 3:
                for part, target in experts.parts:
                    names = [f"model.layers.{bid}.{experts.prefix}.{x}.{part}.weight" for x in range(n_experts)]
                    missing = [n for n in names if n not in layer]
                    if missing:
                        raise UnsupportedModel(f"layer {bid} lacks expert tensors {missing[:3]}")
                    stacked = (n_experts, *layer[names[0]].shape)
                    specs.append(_spec(f"blk.{bid}.{target}.weight", tuple(originals[n] for n in names), stacked,
                                       (("stack",),)))
                    for n in names:
                        del layer[n]
            continue
        specs.append(_spec(gguf_name(name, family, bid), (src.name,), shape, tuple(ops)))
    leftover = [n for layer in pending.values() for n in layer]
    if leftover:
        raise UnsupportedModel(f"unprocessed expert tensors: {leftover[:5]}")
    seen: set[str] = set()
    for spec in specs:
        if spec.gguf_name in seen:
            raise UnsupportedModel(f"two checkpoint tensors map to {spec.gguf_name}")
        seen.add(spec.gguf_name)
    return specs, early_kv


def _expert_gguf_name(experts: ExpertLayout, part: str, bid: int) -> str:
    return f"blk.{bid}.{dict(experts.parts)[part]}.weight"


def parameter_counts(specs: list[TensorSpec]) -> tuple[int, int, int, int]:
    """(total, shared, expert, expert_count) as gguf.GGUFWriter.get_total_parameter_count computes them."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for spec in specs:
        shape = spec.torch_shape
        size = math.prod(shape)
        if "_exps." in spec.gguf_name and len(shape) >= 3:
            count = shape[-2 if ".bias" in spec.gguf_name else -3]
            expert += size // count
            expert_sum += count
            n_expert_tensors += 1
        else:
            shared += size
        total += size
    return total, shared, expert, (expert_sum // n_expert_tensors) if n_expert_tensors else 0


# ---------------------------------------------------------------------------------------------------
# data

def _working(t: torch.Tensor) -> torch.Tensor:
    # llama.cpp converts everything but float16/float32 to float32 before transforming
    return t if t.dtype in (torch.float16, torch.float32) else t.to(torch.float32)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_data(spec: TensorSpec, loader: Loader, as_stored: bool = False) -> torch.Tensor:
    """The tensor's values (float32, torch shape) computed from the checkpoint through loader(name).

    Transforms run in the source dtype when it is float16/float32 and in float32 otherwise (bf16 ...),
    like llama.cpp's converter, so values (e.g. Gemma's f16 norm + 1) match it bit for bit. as_stored:
    a tensor whose transforms only move values keeps the stored dtype (widening is exact and can wait
    for the device that quantizes it, at half the bytes to move)."""
    keep = as_stored and spec.moves_only
    working = (lambda t: t) if keep else _working  # noqa: E731
    t: torch.Tensor | None = None
    for op in spec.transform:
        kind = op[0]
        if kind == "const":
            t = torch.tensor(op[1], dtype=torch.float32)
        elif kind == "stack":
            t = torch.stack([working(loader(n)) for n in spec.hf_names], dim=0)
        else:
            if t is None:
                t = working(loader(spec.hf_names[0]))
            if kind == "slice":
                _, dim, start, stop = op
                t = t.narrow(dim, start, stop - start).contiguous()
            elif kind == "permute":
                t = _permute(t, op[1])
            elif kind == "add":
                t = t + op[1]
            else:
                raise ValueError(f"unknown transform {op!r}")
    if t is None:
        t = working(loader(spec.hf_names[0]))
    if tuple(t.shape) != spec.torch_shape:
        raise ValueError(f"{spec.gguf_name}: computed shape {tuple(t.shape)} != planned {spec.torch_shape}")
    return t if keep else t.to(torch.float32)
