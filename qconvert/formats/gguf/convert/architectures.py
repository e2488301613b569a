"""One table row per supported model family: GGUF architecture, how HF tensor names map to GGUF ones,
the per-tensor transforms llama.cpp applies, the hyper-parameter keys it writes and the tokenizer recipe.

Everything here mirrors what llama.cpp's convert_hf_to_gguf.py (llama-cpp-python 0.3.36) writes for
these Hugging Face architectures; the per-family notes say where a family departs from the common
"TextModel" behaviour.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gguf import GGUFValueType, Keys

from qconvert.errors import QConvertError

from .kv import KVList


class UnsupportedModel(QConvertError):
    """The checkpoint is of an architecture (or variant) this GGUF converter does not handle."""


# ---------------------------------------------------------------------------------------------------
# hyper-parameters, as llama.cpp's TextModel sees them

@dataclass
class HParams:
    """config.json as transformers' AutoConfig reads it (defaults filled in), text_config merged in,
    plus llama.cpp's normalised rope parameters."""
    d: dict[str, Any]
    model_dir: Path
    hf_arch: str
    rope: dict[str, Any] = field(default_factory=dict)

    def find(self, keys: tuple[str, ...] | list[str], optional: bool = True) -> Any:
        for k in keys:
            if k in self.d:
                return self.d[k]
        if optional:
            return None
        raise UnsupportedModel(f"config.json has none of {list(keys)}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.d.get(key, default)

    def __getitem__(self, key: str) -> Any:
        if key not in self.d:
            raise UnsupportedModel(f"config.json has no {key!r}")
        return self.d[key]

    @property
    def block_count(self) -> int:
        return self.find(("n_layers", "num_hidden_layers", "n_layer", "num_layers"), optional=False)

    @property
    def full_rope(self) -> dict[str, Any]:
        return self.rope.get("full_attention", self.rope)


def load_hparams(model_dir: Path) -> HParams:
    model_dir = Path(model_dir)
    try:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False).to_dict()
    except Exception:
        path = model_dir / "config.json"
        if not path.is_file():
            raise UnsupportedModel(f"{model_dir} has no config.json") from None
        config = json.loads(path.read_text(encoding="utf-8"))
    for alias in ("llm_config", "lm_config", "language_config"):
        if alias in config:
            config["text_config"] = config[alias]
    text = config.get("text_config") or {}
    arch = (config.get("architectures") or [None])[0]
    if text.get("architectures"):
        arch = text["architectures"][0]
    if arch is None:
        raise UnsupportedModel(f"{model_dir}/config.json names no architecture")
    if "text_config" in config:
        config = {**config, **config["text_config"]}
    hp = HParams(config, model_dir, arch)
    rope = config.get("rope_parameters", config.get("rope_scaling")) or {}
    if "full_attention" not in rope and "sliding_attention" not in rope:
        theta = hp.find(("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"))
        local = hp.find(("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq"))
        partial = hp.find(("partial_rotary_factor", "rope_pct", "rope_percent"))
        orig_ctx = hp.find(("original_max_position_embeddings",))
        if local is not None:
            rope["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and (kind := rope.get("type")) is not None:
            rope["rope_type"] = kind
        if "partial_rotary_factor" not in rope and partial is not None:
            rope["partial_rotary_factor"] = partial
        if "original_max_position_embeddings" not in rope and orig_ctx is not None:
            rope["original_max_position_embeddings"] = orig_ctx
    hp.rope = rope
    return hp


# ---------------------------------------------------------------------------------------------------
# hyper-parameter KV writers

FILE_TYPE = Keys.General.FILE_TYPE


def _key(template: str, arch: str) -> str:
    return template.format(arch=arch)


def text_params(kv: KVList, hp: HParams, arch: str) -> None:
    """llama.cpp's generic TextModel parameters; general.file_type is left as a placeholder (None)."""
    K = lambda t: _key(t, arch)  # noqa: E731
    kv.u32(K(Keys.LLM.BLOCK_COUNT), hp.block_count)
    for key, names in ((Keys.LLM.CONTEXT_LENGTH, ("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                                                 "max_sequence_length", "model_max_length")),
                       (Keys.LLM.EMBEDDING_LENGTH, ("hidden_size", "n_embd", "dim")),
                       (Keys.LLM.FEED_FORWARD_LENGTH, ("prefix_dense_intermediate_size", "dense_intermediate_size",
                                                      "intermediate_size", "n_inner", "hidden_dim")),
                       (Keys.Attention.HEAD_COUNT, ("num_attention_heads", "n_head", "n_heads")),
                       (Keys.Attention.HEAD_COUNT_KV, ("num_key_value_heads", "n_kv_heads"))):
        if (value := hp.find(names)) is not None:
            kv.u32(K(key), value)
    if hp.get("is_causal") is False:
        kv.boolean(K(Keys.Attention.CAUSAL), False)
    rope = hp.full_rope
    if (kind := rope.get("rope_type")) is not None:
        factor = rope.get("factor")
        if kind == "linear" and factor is not None:
            kv.string(K(Keys.Rope.SCALING_TYPE), "linear")
            kv.f32(K(Keys.Rope.SCALING_FACTOR), factor)
        elif kind == "yarn" and factor is not None:
            kv.string(K(Keys.Rope.SCALING_TYPE), "yarn")
            kv.f32(K(Keys.Rope.SCALING_FACTOR), factor)
            kv.u32(K(Keys.Rope.SCALING_ORIG_CTX_LEN), rope["original_max_position_embeddings"])
            for key, value in ((Keys.Rope.SCALING_YARN_EXT_FACTOR, rope.get("extrapolation_factor")),
                               (Keys.Rope.SCALING_YARN_ATTN_FACTOR, rope.get("attention_factor", rope.get("attn_factor"))),
                               (Keys.Rope.SCALING_YARN_BETA_FAST, rope.get("beta_fast")),
                               (Keys.Rope.SCALING_YARN_BETA_SLOW, rope.get("beta_slow"))):
                if value is not None:
                    kv.f32(K(key), value)
        elif kind in ("su", "longrope"):
            kv.string(K(Keys.Rope.SCALING_TYPE), "longrope")
        # "dynamic", "llama3" (-> rope_freqs tensor), "default": nothing here
    if "mrope_section" in hp.rope:
        sections = list(hp.rope["mrope_section"]) + [0, 0, 0, 0]
        kv.array(K(Keys.Rope.DIMENSION_SECTIONS), sections[:4])
    if (theta := rope.get("rope_theta")) is not None:
        kv.f32(K(Keys.Rope.FREQ_BASE), theta)
    if (local := hp.rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        kv.f32(K(Keys.Rope.FREQ_BASE_SWA), local)
    if (eps := hp.find(("rms_norm_eps", "norm_eps"))) is not None:
        kv.f32(K(Keys.Attention.LAYERNORM_RMS_EPS), eps)
    if (eps := hp.find(("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        kv.f32(K(Keys.Attention.LAYERNORM_EPS), eps)
    if (n := hp.find(("num_local_experts", "num_experts", "n_routed_experts"))) is not None:
        kv.u32(K(Keys.LLM.EXPERT_COUNT), n)
    if (n := hp.find(("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))) is not None:
        kv.u32(K(Keys.LLM.EXPERT_USED_COUNT), n)
    if (n := hp.get("n_group")) is not None:
        kv.u32(K(Keys.LLM.EXPERT_GROUP_COUNT), n)
    if (n := hp.get("topk_group")) is not None:
        kv.u32(K(Keys.LLM.EXPERT_GROUP_USED_COUNT), n)
    score = hp.find(("score_function", "scoring_func", "score_func", "moe_router_activation",
                     "moe_router_activation_func", "expert_selection_fn"))
    if score is not None:
        gating = {"softmax": 1, "sigmoid": 2, "sqrtsoftplus": 4}
        if score not in gating:
            raise UnsupportedModel(f"unsupported expert gating function {score!r}")
        kv.u32(K(Keys.LLM.EXPERT_GATING_FUNC), gating[score])
    if (head_dim := hp.get("head_dim")) is not None:
        kv.u32(K(Keys.Attention.KEY_LENGTH), head_dim)
        kv.u32(K(Keys.Attention.VALUE_LENGTH), head_dim)
    kv.set(FILE_TYPE, None, GGUFValueType.UINT32)


def pooling_params(kv: KVList, hp: HParams, arch: str) -> None:
    """sentence-transformers pooling (modules.json), as llama.cpp's _try_set_pooling_type."""
    modules = hp.model_dir / "modules.json"
    if modules.is_file():
        path = next((m["path"] for m in json.loads(modules.read_text()) if m["type"].endswith("Pooling")), None)
        if path is not None:
            cfg = json.loads((hp.model_dir / path / "config.json").read_text())
            modes = {"mean": 1, "cls": 2, "lasttoken": 3}
            if cfg.get("pooling_mode_mean_tokens"):
                value = 1
            elif cfg.get("pooling_mode_cls_token"):
                value = 2
            elif cfg.get("pooling_mode_lasttoken"):
                value = 3
            elif cfg.get("pooling_mode") in modes:
                value = modes[cfg["pooling_mode"]]
            else:
                raise UnsupportedModel("only MEAN, CLS and LAST pooling are supported")
            kv.u32(_key(Keys.LLM.POOLING_TYPE, arch), value)
    if hp.get("classifier_pooling") is not None:
        raise UnsupportedModel("classifier pooling heads are not supported")


def llama_params(kv: KVList, hp: HParams, arch: str) -> None:
    text_params(kv, hp, arch)
    kv.u32(_key(Keys.LLM.VOCAB_SIZE, arch), hp["vocab_size"])
    rope_dim = hp.get("head_dim")
    if rope_dim is None:
        rope_dim = hp["hidden_size"] // hp["num_attention_heads"]
    kv.u32(_key(Keys.Rope.DIMENSION_COUNT, arch), rope_dim)


def qwen_params(kv: KVList, hp: HParams, arch: str) -> None:
    text_params(kv, hp, arch)
    pooling_params(kv, hp, arch)


def qwen_moe_params(kv: KVList, hp: HParams, arch: str) -> None:
    text_params(kv, hp, arch)
    if (n := hp.get("moe_intermediate_size")) is not None:
        kv.u32(_key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, arch), n)
    if (n := hp.get("shared_expert_intermediate_size")) is not None:
        kv.u32(_key(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, arch), n)


def gemma3_params(kv: KVList, hp: HParams, arch: str) -> None:
    """TextModel's keys, then Gemma 3 re-sets several of them (same positions) with its own defaults."""
    text_params(kv, hp, arch)
    K = lambda t: _key(t, arch)  # noqa: E731
    kv.u32(K(Keys.LLM.CONTEXT_LENGTH), hp.get("max_position_embeddings", 131072))
    kv.u32(K(Keys.Attention.HEAD_COUNT), hp.get("num_attention_heads", 8))
    kv.f32(K(Keys.Attention.LAYERNORM_RMS_EPS), hp.get("rms_norm_eps", 1e-6))
    kv.u32(K(Keys.Attention.KEY_LENGTH), hp.get("head_dim", 256))
    kv.u32(K(Keys.Attention.VALUE_LENGTH), hp.get("head_dim", 256))
    kv.f32(K(Keys.Rope.FREQ_BASE), hp.full_rope.get("rope_theta", 1_000_000.0))
    if hp.get("attn_logit_softcapping") is not None:
        raise UnsupportedModel("Gemma 3 checkpoints have no attn_logit_softcapping")
    if cap := hp.get("final_logit_softcapping"):
        kv.f32(K(Keys.LLM.FINAL_LOGIT_SOFTCAPPING), cap)
    if hp.get("sliding_window_pattern") != 1:  # (the HF config calls it _sliding_window_pattern)
        kv.u32(K(Keys.Attention.SLIDING_WINDOW), hp["sliding_window"])
    kv.u32(K(Keys.Attention.HEAD_COUNT_KV), hp.get("num_key_value_heads", 4))


def gemma2_params(kv: KVList, hp: HParams, arch: str) -> None:
    """Gemma 2 writes its own list (not TextModel's)."""
    K = lambda t: _key(t, arch)  # noqa: E731
    kv.u32(K(Keys.LLM.CONTEXT_LENGTH), hp["max_position_embeddings"])
    kv.u32(K(Keys.LLM.EMBEDDING_LENGTH), hp["hidden_size"])
    kv.u32(K(Keys.LLM.BLOCK_COUNT), hp.block_count)
    kv.u32(K(Keys.LLM.FEED_FORWARD_LENGTH), hp["intermediate_size"])
    kv.u32(K(Keys.Attention.HEAD_COUNT), hp["num_attention_heads"])
    kv.u32(K(Keys.Attention.HEAD_COUNT_KV), hp.get("num_key_value_heads", hp["num_attention_heads"]))
    kv.f32(K(Keys.Attention.LAYERNORM_RMS_EPS), hp["rms_norm_eps"])
    kv.u32(K(Keys.Attention.KEY_LENGTH), hp["head_dim"])
    kv.u32(K(Keys.Attention.VALUE_LENGTH), hp["head_dim"])
    kv.set(FILE_TYPE, None, GGUFValueType.UINT32)
    kv.f32(K(Keys.LLM.ATTN_LOGIT_SOFTCAPPING), hp["attn_logit_softcapping"])
    kv.f32(K(Keys.LLM.FINAL_LOGIT_SOFTCAPPING), hp["final_logit_softcapping"])
    kv.u32(K(Keys.Attention.SLIDING_WINDOW), hp["sliding_window"])


def phi3_rope_dims(hp: HParams) -> int:
    n_embd = hp.find(("hidden_size", "n_embd"), optional=False)
    n_head = hp.find(("num_attention_heads", "n_head"), optional=False)
    return int(hp.rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head


def phi3_params(kv: KVList, hp: HParams, arch: str) -> None:
    """Phi-3 writes its own list (not TextModel's)."""
    K = lambda t: _key(t, arch)  # noqa: E731
    if "original_max_position_embeddings" not in hp.rope:
        raise UnsupportedModel("Phi-3 config has no original_max_position_embeddings")
    kv.u32(K(Keys.LLM.CONTEXT_LENGTH), hp.find(("n_positions", "max_position_embeddings"), optional=False))
    kv.u32(K(Keys.Rope.SCALING_ORIG_CTX_LEN), hp.rope["original_max_position_embeddings"])
    kv.u32(K(Keys.LLM.EMBEDDING_LENGTH), hp.find(("hidden_size", "n_embd"), optional=False))
    kv.u32(K(Keys.LLM.FEED_FORWARD_LENGTH), hp.find(("intermediate_size",), optional=False))
    kv.u32(K(Keys.LLM.BLOCK_COUNT), hp.block_count)
    kv.u32(K(Keys.Attention.HEAD_COUNT), hp.find(("num_attention_heads", "n_head"), optional=False))
    kv.u32(K(Keys.Attention.HEAD_COUNT_KV), hp.find(("num_key_value_heads", "n_head_kv"), optional=False))
    kv.f32(K(Keys.Attention.LAYERNORM_RMS_EPS), hp.find(("rms_norm_eps",), optional=False))
    kv.u32(K(Keys.Rope.DIMENSION_COUNT), phi3_rope_dims(hp))
    kv.f32(K(Keys.Rope.FREQ_BASE), hp.full_rope["rope_theta"])
    kv.set(FILE_TYPE, None, GGUFValueType.UINT32)
    kv.u32(K(Keys.Attention.SLIDING_WINDOW), hp.get("sliding_window") or 0)


# ---------------------------------------------------------------------------------------------------
# tensor-name tables (names under "model.layers.{bid}." -> GGUF names under "blk.{bid}.")

ATTENTION = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
}
DENSE_FFN = {
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
QK_NORM = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
GEMMA_NORMS = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
QWEN_MOE_FFN = {
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    # dense layers of a MoE model (mlp_only_layers / decoder_sparse_step)
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


@dataclass(frozen=True)
class ExpertLayout:
    """Per-expert HF tensors `model.layers.{bid}.{prefix}.{x}.{part}.weight`, stacked by llama.cpp into
    one [n_expert, rows, cols] tensor per part, emitted (in `parts` order) as soon as the layer's last
    expert tensor has been read."""
    marker: str                         # substring that marks a name as an expert tensor (llama.cpp's test)
    prefix: str
    parts: tuple[tuple[str, str], ...]  # (HF projection, GGUF tensor), in emission order
    count_keys: tuple[str, ...]
    fused: bool = False                 # also accept transformers' fused 3-D gate_up_proj / down_proj


MIXTRAL_EXPERTS = ExpertLayout("block_sparse_moe.experts", "block_sparse_moe.experts",
                               (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")),
                               ("num_local_experts",))
QWEN_EXPERTS = ExpertLayout("experts", "mlp.experts",
                            (("down_proj", "ffn_down_exps"), ("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps")),
                            ("num_local_experts", "num_experts"), fused=True)


@dataclass(frozen=True)
class Family:
    name: str
    gguf_arch: str
    layer: dict[str, str]
    params: Callable[[KVList, HParams, str], None]
    vocab: str                          # key of tokenizer.VOCABS
    rope_permute: bool = False          # llama-style rope: q/k rows reordered (not for NEOX-rope families)
    norm_shift: float = 0.0             # added to every "*norm.weight" (Gemma's RMSNorm stores w - 1)
    drop_lm_head: bool = False          # lm_head.weight is ignored (Gemma 2)
    trim_vocab_rows: bool = False       # token_embd cut to the tokenizer's real size (Gemma 3)
    experts: ExpertLayout | None = None
    rope_freqs: bool = False            # llama3-type rope scaling -> generated rope_freqs.weight
    long_rope: bool = False             # Phi-3 long/short rope factors -> generated tensors


LLAMA = Family("llama", "llama", {**ATTENTION, **DENSE_FFN}, llama_params, "llama", rope_permute=True, rope_freqs=True)
MIXTRAL = Family("mixtral", "llama", {**ATTENTION, "post_attention_layernorm": "ffn_norm",
                                      "block_sparse_moe.gate": "ffn_gate_inp"},
                 llama_params, "llama", rope_permute=True, rope_freqs=True, experts=MIXTRAL_EXPERTS)
QWEN2 = Family("qwen2", "qwen2", {**ATTENTION, **DENSE_FFN}, qwen_params, "spm_or_bpe")
QWEN3 = Family("qwen3", "qwen3", {**ATTENTION, **QK_NORM, **DENSE_FFN}, qwen_params, "spm_or_bpe")
QWEN2MOE = Family("qwen2moe", "qwen2moe", {**ATTENTION, **QWEN_MOE_FFN}, qwen_moe_params, "bpe", experts=QWEN_EXPERTS)
QWEN3MOE = Family("qwen3moe", "qwen3moe", {**ATTENTION, **QK_NORM, **QWEN_MOE_FFN}, qwen_moe_params, "bpe",
                  experts=QWEN_EXPERTS)
GEMMA3 = Family("gemma3", "gemma3", {**ATTENTION, **QK_NORM, **DENSE_FFN, **GEMMA_NORMS}, gemma3_params, "gemma3",
                norm_shift=1.0, trim_vocab_rows=True)
GEMMA2 = Family("gemma2", "gemma2", {**ATTENTION, **DENSE_FFN, **GEMMA_NORMS}, gemma2_params, "gemma2",
                norm_shift=1.0, drop_lm_head=True)
PHI3 = Family("phi3", "phi3", {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv",
                               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                               "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
              phi3_params, "phi3", long_rope=True)

# HF architecture (config.json "architectures"[0]) -> family
HF_ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": LLAMA,
    "LLaMAForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "MixtralForCausalLM": MIXTRAL,
    "Qwen2ForCausalLM": QWEN2,
    "Qwen3ForCausalLM": QWEN3,
    "Qwen2MoeForCausalLM": QWEN2MOE,
    "Qwen3MoeForCausalLM": QWEN3MOE,
    "Gemma3ForCausalLM": GEMMA3,
    "Gemma3ForConditionalGeneration": GEMMA3,  # text part only (vision tensors are skipped)
    "Gemma2ForCausalLM": GEMMA2,
    "Phi3ForCausalLM": PHI3,
}


def family_for(hp: HParams) -> Family:
    family = HF_ARCHITECTURES.get(hp.hf_arch)
    if family is None:
        raise UnsupportedModel(f"GGUF conversion does not support {hp.hf_arch} (supported: "
                               f"{', '.join(sorted(HF_ARCHITECTURES))})")
    if family is QWEN3 and _is_qwen3_reranker(hp):
        raise UnsupportedModel("Qwen3 reranker checkpoints are not supported")
    if family is LLAMA and "draft_vocab_size" in hp.d and hp.block_count == 1:
        raise UnsupportedModel("EAGLE-3 draft checkpoints are not supported")
    return family


def _is_qwen3_reranker(hp: HParams) -> bool:
    readme = hp.model_dir / "README.md"
    text = readme.read_text(encoding="utf-8").lower() if readme.exists() else ""
    if "# qwen3-reranker" in text or "# qwen3-vl-reranker" in text:
        return True
    hints = [hp.model_dir.name, str(hp.get("_name_or_path", "")), str(hp.get("model_type", "")), hp.hf_arch]
    if any("qwen3-reranker" in h.lower() or "qwen3-vl-reranker" in h.lower() for h in hints if h):
        return True
    return "sequenceclassification" in hp.hf_arch.lower()
