"""Per-expert linears in place of transformers' fused 3-D expert parameters.

transformers 5 keeps the experts of a MoE block as `gate_up_proj` [E, 2I, H] and `down_proj`
[E, H, I]; checkpoints, vLLM and llama.cpp name them per expert. Swapping in one nn.Linear per
expert and projection gives every expert its own routed tokens (for hooks) and its file names.
"""

from __future__ import annotations

import torch
from torch import nn

from qconvert.model.architectures import MoE


class Expert(nn.Module):
    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int):
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden, intermediate, bias=False, device="meta"))
        self.add_module(up, nn.Linear(hidden, intermediate, bias=False, device="meta"))
        self.add_module(down, nn.Linear(intermediate, hidden, bias=False, device="meta"))

    def forward(self, x: torch.Tensor, act_fn) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.Module):
    """Same forward(hidden_states, top_k_index, top_k_weights) as the fused experts module."""

    def __init__(self, fused: nn.Module, moe: MoE):
        super().__init__()
        num_experts, two_i, hidden = fused.gate_up_proj.shape
        self.num_experts = num_experts
        self.act_fn = fused.act_fn
        for e in range(num_experts):
            self.add_module(str(e), Expert(moe.proj, hidden, two_i // 2))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = getattr(self, str(e))(hidden_states[token_idx], self.act_fn)
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out


def unfuse_experts(block: nn.Module, moe: MoE) -> None:
    """Replace the fused experts module of a block (if this block has one) in place."""
    parent_path, _, attr = moe.experts.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    fused = getattr(parent, attr, None)
    if fused is not None and hasattr(fused, "gate_up_proj"):
        setattr(parent, attr, UnfusedExperts(fused, moe))
