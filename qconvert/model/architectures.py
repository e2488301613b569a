"""What qconvert knows about each model family, as data.

Names are module paths inside one decoder block as transformers builds it in memory (after the
per-expert unfusing of moe.py); `renames` maps the checkpoint files' names onto them. `sequential`
lists the linears in the order they run, grouped by shared input (GPTQ's true-sequential order).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from qconvert.errors import QConvertError


QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
O_PROJ = ("self_attn.o_proj",)
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
DOWN = ("mlp.down_proj",)
DENSE = (QKV, O_PROJ, GATE_UP, DOWN)


@dataclass(frozen=True)
class MoE:
    experts: str  # path of transformers' fused experts module (gate_up_proj [E, 2I, H], down_proj [E, H, I])
    proj: tuple[str, str, str]  # per-expert (gate, up, down) linear names in the checkpoint files
    num_experts_key: str


@dataclass(frozen=True)
class ScaleGroup:
    """AWQ / SmoothQuant: `prev` writes the input that `linears` read, so a per-channel scale can move
    from one to the other. `inspect` is the module whose output measures the loss; `also` are
    unquantized readers of the same input (MoE routers) whose columns must be scaled too. A `*`
    in prev and linears stands for one expert at a time. `prev_rows`: "second_half" when only
    the up half of a fused gate_up projection feeds the linears."""

    prev: str
    linears: tuple[str, ...]
    inspect: str
    also: tuple[str, ...] = ()
    prev_rows: str = "all"


def dense_scale_groups(mlp_norm: str = "post_attention_layernorm") -> tuple[ScaleGroup, ...]:
    return (
        ScaleGroup("input_layernorm", QKV, "self_attn"),
        ScaleGroup("self_attn.v_proj", O_PROJ, "self_attn.o_proj"),  # only where v's rows are o's columns (no GQA)
        ScaleGroup(mlp_norm, GATE_UP, "mlp"),
        ScaleGroup("mlp.up_proj", DOWN, "mlp.down_proj"),
    )


@dataclass(frozen=True)
class Architecture:
    name: str
    sequential: tuple[tuple[str, ...], ...]
    skip: tuple[str, ...] = ()  # linears that stay unquantized (routers, gates)
    renames: tuple[tuple[str, str], ...] = ()  # (file substring, memory substring)
    moe: MoE | None = None
    attn_implementation: str = "sdpa"
    layers: str = "model.layers"
    scale_groups: tuple[ScaleGroup, ...] = ()
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)

    def to_memory(self, file_name: str) -> str:
        for src, dst in self.renames:
            file_name = file_name.replace(src, dst)
        return file_name

    def to_file(self, memory_name: str) -> str:
        for src, dst in self.renames:
            memory_name = memory_name.replace(dst, src)
        return memory_name

    def group_of(self, name: str) -> int | None:
        """Index of the sequential group a linear belongs to; None when it is skipped."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.skip):
            return None
        for i, group in enumerate(self.sequential):
            if any(fnmatch.fnmatchcase(name, p) for p in group):
                return i
        raise QConvertError(f"{self.name}: linear '{name}' has no entry in qconvert's architecture table")

    def in_blocks(self, file_name: str) -> bool:
        """Whether a checkpoint tensor belongs to a decoder block."""
        return file_name.startswith(f"{self.layers}.")

    def quantized_weights(self, ckpt) -> Iterator[tuple[str, tuple[int, int]]]:
        """(file name, shape) of every linear weight in the checkpoint that gets quantized, from its headers."""
        prefix = f"{self.layers}."
        for name in ckpt.names():
            if not (self.in_blocks(name) and name.endswith(".weight") and len(ckpt.shape(name)) == 2):
                continue
            local = self.to_memory(name).removeprefix(prefix).split(".", 1)[1].removesuffix(".weight")
            if self.group_of(local) is not None:
                yield name, tuple(ckpt.shape(name))

    def linear_groups(self, block: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
        """The block's linears to quantize, grouped and ordered as `sequential` says."""
        groups: list[list[tuple[str, nn.Linear]]] = [[] for _ in self.sequential]
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                g = self.group_of(name)
                if g is not None:
                    groups[g].append((name, module))
        return [g for g in groups if g]



DENSE_AWQ = dense_scale_groups()
GEMMA2_AWQ = dense_scale_groups("pre_feedforward_layernorm")  # Gemma 2/3 norm the MLP input with this one

_ARCHITECTURES = [
    # Llama 2/3, SmolLM2; Mistral 7B; Qwen2/2.5; Qwen3 (q/k norms are not linears); Gemma 1
    Architecture("llama", DENSE, scale_groups=DENSE_AWQ),
    Architecture("mistral", DENSE, scale_groups=DENSE_AWQ),
    Architecture("qwen2", DENSE, scale_groups=DENSE_AWQ),
    Architecture("qwen3", DENSE, scale_groups=DENSE_AWQ),
    Architecture("gemma", DENSE, scale_groups=DENSE_AWQ, norm_offset=1.0),
    # Gemma 2 uses attention logit soft-capping, which only the eager attention implements
    Architecture("gemma2", DENSE, attn_implementation="eager", scale_groups=GEMMA2_AWQ, norm_offset=1.0),
    Architecture("gemma3_text", DENSE, scale_groups=GEMMA2_AWQ, norm_offset=1.0),
    # Phi-3: fused qkv_proj and gate_up_proj (gate rows first, then up)
    Architecture(
        "phi3",
        (("self_attn.qkv_proj",), O_PROJ, ("mlp.gate_up_proj",), DOWN),
        scale_groups=(
            ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
            ScaleGroup("mlp.gate_up_proj", DOWN, "mlp.down_proj", prev_rows="second_half"),
        ),
    ),
    # Mixtral 8x7B: files say block_sparse_moe.experts.N.w1/w3/w2 (gate/up/down)
    Architecture(
        "mixtral",
        (QKV, O_PROJ, ("mlp.experts.*.w1", "mlp.experts.*.w3"), ("mlp.experts.*.w2",)),
        skip=("mlp.gate",),
        renames=((".block_sparse_moe.", ".mlp."),),
        moe=MoE("mlp.experts", ("w1", "w3", "w2"), "num_local_experts"),
        scale_groups=(
            *DENSE_AWQ[:2],
            ScaleGroup("post_attention_layernorm", ("mlp.experts.*.w1", "mlp.experts.*.w3"), "mlp", also=("mlp.gate",)),
            ScaleGroup("mlp.experts.*.w3", ("mlp.experts.*.w2",), "mlp.experts.*.w2"),
        ),
    ),
    # Qwen1.5-MoE / Qwen2-MoE: routed experts plus a shared expert with a sigmoid gate;
    # layers listed in mlp_only_layers keep a dense MLP
    Architecture(
        "qwen2_moe",
        (
            QKV,
            O_PROJ,
            ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.shared_expert.gate_proj",
             "mlp.shared_expert.up_proj", *GATE_UP),
            ("mlp.experts.*.down_proj", "mlp.shared_expert.down_proj", *DOWN),
        ),
        skip=("mlp.gate", "mlp.shared_expert_gate"),
        moe=MoE("mlp.experts", ("gate_proj", "up_proj", "down_proj"), "num_experts"),
        scale_groups=(
            *DENSE_AWQ,
            ScaleGroup("post_attention_layernorm", ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj",
                       "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), "mlp",
                       also=("mlp.gate", "mlp.shared_expert_gate")),
            ScaleGroup("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), "mlp.experts.*.down_proj"),
            ScaleGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), "mlp.shared_expert.down_proj"),
        ),
    ),
    # Qwen3-MoE (30B-A3B, 235B-A22B)
    Architecture(
        "qwen3_moe",
        (QKV, O_PROJ, ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", *GATE_UP),
         ("mlp.experts.*.down_proj", *DOWN)),
        skip=("mlp.gate",),
        moe=MoE("mlp.experts", ("gate_proj", "up_proj", "down_proj"), "num_experts"),
        scale_groups=(
            *DENSE_AWQ,
            ScaleGroup("post_attention_layernorm", ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"), "mlp",
                       also=("mlp.gate",)),
            ScaleGroup("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), "mlp.experts.*.down_proj"),
        ),
    ),
]
ARCHITECTURES = {a.name: a for a in _ARCHITECTURES}


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise QConvertError(f"unsupported architecture '{model_type}' (supported: {supported})") from None
