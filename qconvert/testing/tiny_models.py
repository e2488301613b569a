"""Tiny random-weight models of every supported family, with a small tokenizer trained on the bundled
text (byte-level BPE by default, or SentencePiece). Widths are multiples of 128 so every group size
applies."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from qconvert.calibration.datasets import load_texts

VOCAB = 512
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=128)
CONFIGS = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma2": {},
    "gemma3_text": {},
    "phi3": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, shared_expert_intermediate_size=128, **MOE),
    "qwen3_moe": dict(num_experts=4, **MOE),
}
ARCHITECTURES = tuple(CONFIGS)


def train_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer that prepends <s>, trained on the bundled calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(load_texts("mixed")[:40], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(out_dir)
    return fast


def train_sentencepiece_tokenizer(out_dir: Path):
    """A SentencePiece BPE tokenizer (byte fallback, <unk>=0 <s>=1 </s>=2, prepends <s>) trained on the
    bundled calibration text: tokenizer.model plus the Hugging Face files of a LlamaTokenizer."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(load_texts("mixed")[:40]), model_writer=model, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, num_threads=1, minloglevel=2,
        max_sentence_length=100000, input_sentence_size=0, shuffle_input_sentence=False)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    tok = LlamaTokenizer.from_pretrained(out_dir, add_bos_token=True)
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(out_dir)
    return tok


def make_tiny_model(out_dir: Path, arch: str = "llama", layers: int = 2, seed: int = 0,
                    dtype: torch.dtype = torch.bfloat16, tokenizer_dir: Path | None = None,
                    tokenizer: str = "bpe", **overrides) -> Path:
    """Save a random `arch` model (and tokenizer) to out_dir; returns out_dir.

    tokenizer: "bpe" (byte-level BPE, tokenizer.json only) or "sentencepiece" (tokenizer.model plus its
    Hugging Face files); ignored when tokenizer_dir gives one to copy."""
    out_dir = Path(out_dir)
    kwargs = {**COMMON, **CONFIGS[arch], "num_hidden_layers": layers, **overrides}
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # wider-than-init weights so that quantization error is visible
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    elif tokenizer == "sentencepiece":
        train_sentencepiece_tokenizer(out_dir)
    elif tokenizer == "bpe":
        train_tokenizer(out_dir)
    else:
        raise ValueError(f"unknown tokenizer kind {tokenizer!r} (bpe, sentencepiece)")
    return out_dir
