"""The tokenizer part of a GGUF file (`tokenizer.*` keys), as llama.cpp's HF converter writes it.

Vocabulary kinds (the GGUF `tokenizer.ggml.model`):
  * "gpt2"  — byte-level BPE from tokenizer.json, read through transformers' AutoTokenizer; the
              pre-tokenizer name is identified by hashing the ids of a probe text (pre_tokenizers.py).
  * "llama" — SentencePiece from tokenizer.model (scores and piece types), or for llama-family
              checkpoints that only ship a byte-fallback BPE tokenizer.json, that tokenizer.json.
Special token ids, add_bos/add_eos/add_sep, merges, chat template and normalizer flags come from
special_tokens.py.
"""

from __future__ import annotations

import re
from hashlib import sha256
from pathlib import Path
from typing import Any

from gguf import Keys, TokenType

from qconvert.errors import QConvertError

from .kv import KVList
from .pre_tokenizers import PRE_TOKENIZERS, PROBE_TEXT
from .special_tokens import SpecialTokens, read_json, tokenizer_json

# SentencePiece piece types (= gguf.TokenType values)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (int(TokenType.NORMAL), int(TokenType.UNKNOWN),
                                                       int(TokenType.CONTROL), int(TokenType.USER_DEFINED),
                                                       int(TokenType.UNUSED), int(TokenType.BYTE))
SPACE_MARK = "\u2581"  # SentencePiece's "▁"


class UnknownPreTokenizer(QConvertError):
    """The BPE tokenizer's pre-tokenizer is not one that llama.cpp knows (its probe-text hash is unknown)."""


def _find(hparams: dict, keys: tuple[str, ...]) -> Any:
    return next((hparams[k] for k in keys if k in hparams), None)


# ---------------------------------------------------------------------------------------------------
# pre-tokenizer identification

def probe_hash(token_ids: list[int]) -> str:
    return sha256(str(list(token_ids)).encode()).hexdigest()


def identify_pre_tokenizer(hf_tokenizer) -> str:
    """The `tokenizer.ggml.pre` name of a Hugging Face BPE tokenizer; UnknownPreTokenizer if llama.cpp
    would not recognise it."""
    digest = probe_hash(hf_tokenizer.encode(PROBE_TEXT))
    hit = PRE_TOKENIZERS.get(digest)
    if hit is None:
        raise UnknownPreTokenizer(
            f"this BPE tokenizer's pre-tokenizer is not one llama.cpp knows (probe hash {digest}); llama.cpp's "
            "converter refuses it too. Use a tokenizer of a supported model family or add the hash to "
            "qconvert/formats/gguf/convert/pre_tokenizers.py once llama.cpp supports it")
    return hit[0]


def looks_special(text: str | bytes) -> bool:
    """Added tokens that some models forget to mark special (llama.cpp's heuristic)."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


# ---------------------------------------------------------------------------------------------------
# vocabularies

def _auto_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def bpe_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    """Byte-level BPE ("gpt2") from tokenizer.json."""
    tok = _auto_tokenizer(model_dir)
    vocab = tok.vocab
    vocab_size = hparams.get("vocab_size", len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise QConvertError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    pre = identify_pre_tokenizer(tok)
    by_id = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        text = by_id[i]
        if text in added:
            if not decoder[i].normalized:  # llama.cpp wants added tokens in their normalized form
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            if decoder[i].special or looks_special(text):
                types.append(CONTROL)
            else:
                text = text.replace(SPACE_MARK, " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(text)
    kv.string(Keys.Tokenizer.MODEL, "gpt2")
    kv.string(Keys.Tokenizer.PRE, pre)
    kv.array(Keys.Tokenizer.LIST, tokens)
    kv.array(Keys.Tokenizer.TOKEN_TYPE, types)
    SpecialTokens(model_dir, load_merges=True).emit(kv)


def _spm_processor(model_dir: Path):
    from sentencepiece import SentencePieceProcessor
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(path)
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    return sp


def _spm_piece_type(sp, i: int) -> int:
    if sp.IsUnknown(i):
        return UNKNOWN
    if sp.IsControl(i):
        return CONTROL
    if sp.IsUnused(i):
        return UNUSED
    if sp.IsByte(i):
        return BYTE
    return NORMAL


def _spm_pieces(sp, model_dir: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """The SentencePiece pieces padded with [PADi] up to vocab_size, then added_tokens.json's entries
    as user-defined tokens."""
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = _spm_piece_type(sp, i)
    if (model_dir / "added_tokens.json").is_file():
        for text, i in read_json(model_dir / "added_tokens.json").items():
            if i < vocab_size:
                tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, USER_DEFINED
    return tokens, scores, types


def spm_tokens(model_dir: Path, hparams: dict) -> tuple[list[bytes], list[float], list[int]]:
    """SentencePiece pieces + added tokens (added_tokens.json, tokenizer_config added_tokens_decoder),
    padded with [PADi] up to the model's vocab_size."""
    sp = _spm_processor(model_dir)
    vocab_size = _find(hparams, ("vocab_size_per_layer_input", "vocab_size")) or sp.vocab_size()
    tokens, scores, types = _spm_pieces(sp, model_dir, vocab_size)
    if (model_dir / "tokenizer_config.json").is_file():
        decoder = read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
        for key, data in decoder.items():
            i = int(key)
            if i >= vocab_size:
                continue
            text: str = data["content"]
            if data.get("special") or looks_special(text):
                types[i] = CONTROL
            else:
                text = text.replace(SPACE_MARK, " ")
                types[i] = USER_DEFINED
            scores[i] = -1000.0
            tokens[i] = text.encode("utf-8")
    return tokens, scores, types


def _emit_llama_vocab(kv: KVList, tokens: list, scores: list, types: list) -> None:
    kv.string(Keys.Tokenizer.MODEL, "llama")
    kv.string(Keys.Tokenizer.PRE, "default")
    kv.array(Keys.Tokenizer.LIST, tokens)
    kv.array(Keys.Tokenizer.SCORES, scores)
    kv.array(Keys.Tokenizer.TOKEN_TYPE, types)


def spm_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    tokens, scores, types = spm_tokens(model_dir, hparams)
    _emit_llama_vocab(kv, tokens, scores, types)
    SpecialTokens(model_dir, n_vocab=len(tokens)).emit(kv)


def phi3_spm_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    """Phi-3's own SentencePiece reader: added tokens from tokenizer_config and tokenizer.json, marked
    user-defined or control by their `special` flag only, spaces kept as ▁."""
    sp = _spm_processor(model_dir)
    tokens, scores, types = _spm_pieces(sp, model_dir, hparams.get("vocab_size", sp.vocab_size()))
    entries = []
    if (model_dir / "tokenizer_config.json").is_file():
        decoder = read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
        entries += [(int(k), d) for k, d in decoder.items()]
    if (model_dir / "tokenizer.json").is_file():
        entries += [(int(d["id"]), d) for d in tokenizer_json(model_dir).get("added_tokens", [])]
    for i, data in entries:
        tokens[i] = data["content"].encode("utf-8")
        scores[i] = -1000.0
        types[i] = CONTROL if data.get("special") else USER_DEFINED
    _emit_llama_vocab(kv, tokens, scores, types)
    SpecialTokens(model_dir, n_vocab=len(tokens)).emit(kv)


def llama_hf_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    """A llama-style (byte-fallback BPE) tokenizer.json without tokenizer.model. Raises
    FileNotFoundError when tokenizer.json is not of that kind, TypeError for Llama-3 style BPE."""
    tj = tokenizer_json(model_dir)  # FileNotFoundError when absent
    model = tj["model"]
    if model["type"] == "BPE" and model.get("ignore_merges", False) and not model.get("byte_fallback", True):
        raise TypeError("Llama 3 style BPE")
    if model["type"] != "BPE" or not model.get("byte_fallback", False) or tj["decoder"]["type"] != "Sequence":
        raise FileNotFoundError("not a llama BPE tokenizer.json")
    tok = _auto_tokenizer(model_dir)
    base = tok.vocab_size
    added = sorted(tok.get_added_vocab().items(), key=lambda x: x[1])
    added = [(t, i) for t, i in added if i >= base]
    vocab = tok.get_vocab()
    specials = {t: vocab[t] for t in tok.all_special_tokens}
    special_ids = set(tok.all_special_ids)
    by_id = {i: t for t, i in vocab.items()}
    tokens, scores, types = [], [], []
    for i in range(base):
        text = by_id[i].encode("utf-8")
        tokens.append(text)
        scores.append(-1000.0)
        types.append(BYTE if re.fullmatch(rb"<0x[0-9A-Fa-f]{2}>", text) else CONTROL if i in special_ids else NORMAL)
    for text, _ in added:
        tokens.append(text.encode("utf-8"))
        scores.append(-1000.0)
        types.append((CONTROL if specials[text] in special_ids else NORMAL) if text in specials else USER_DEFINED)
    _emit_llama_vocab(kv, tokens, scores, types)
    SpecialTokens(model_dir, n_vocab=len(tokens)).emit(kv)


# ---------------------------------------------------------------------------------------------------
# per-family tokenizer recipes (the set_vocab of each llama.cpp model class)

def llama_family_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = read_json(cfg_path)
        if (prefix := cfg.get("add_prefix_space")) is not None:
            kv.boolean(Keys.Tokenizer.ADD_PREFIX, prefix)
        if cfg.get("tokenizer_class") == "HybridDNATokenizer":
            raise QConvertError("HybridDNATokenizer vocabularies are not supported")
    if (model_dir / "tekken.json").is_file() and not (model_dir / "tokenizer.json").is_file():
        raise QConvertError("Mistral tekken.json tokenizers are not supported (needs mistral-common)")
    try:
        spm_vocab(kv, model_dir, hparams)
    except FileNotFoundError:
        try:
            llama_hf_vocab(kv, model_dir, hparams)
        except (FileNotFoundError, TypeError):
            bpe_vocab(kv, model_dir, hparams)
    vocab_size = hparams.get("vocab_size", 32000)
    if vocab_size == 32016:  # CodeLlama: only the EOT id has a GGUF key among its FIM tokens
        extra = SpecialTokens(model_dir, types=("prefix", "suffix", "middle", "eot"))
        for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
            extra.set_id(typ, tid)
        extra.emit(kv)
    if vocab_size == 49152:  # llama.cpp's rule for granite-small vocabularies (also hits SmolLM/SmolLM2)
        kv.boolean(Keys.Tokenizer.ADD_BOS, False)


def spm_or_bpe_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    try:
        spm_vocab(kv, model_dir, hparams)
    except FileNotFoundError:
        bpe_vocab(kv, model_dir, hparams)


def gemma3_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    if (model_dir / "tokenizer.model").is_file():
        spm_vocab(kv, model_dir, hparams)
        kv.boolean(Keys.Tokenizer.ADD_PREFIX, False)
    else:
        bpe_vocab(kv, model_dir, hparams)


def gemma2_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    try:
        spm_vocab(kv, model_dir, hparams)
    except FileNotFoundError:
        raise QConvertError(f"Gemma 2 needs a SentencePiece tokenizer.model in {model_dir}") from None
    kv.boolean(Keys.Tokenizer.ADD_PREFIX, False)


def phi3_vocab(kv: KVList, model_dir: Path, hparams: dict) -> None:
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = read_json(cfg_path)
        if "tokenizer_class" not in cfg:
            raise QConvertError(f"{cfg_path} has no tokenizer_class (llama.cpp's converter needs it for Phi-3)")
        if cfg["tokenizer_class"] == "GPT2Tokenizer":  # Phi-4
            bpe_vocab(kv, model_dir, hparams)
            return
    if not (model_dir / "tokenizer.model").is_file():
        raise QConvertError(f"Phi-3 needs a SentencePiece tokenizer.model in {model_dir}")
    phi3_spm_vocab(kv, model_dir, hparams)


VOCABS = {
    "llama": llama_family_vocab,
    "spm_or_bpe": spm_or_bpe_vocab,
    "bpe": bpe_vocab,
    "gemma3": gemma3_vocab,
    "gemma2": gemma2_vocab,
    "phi3": phi3_vocab,
}


def vocab_rows(model_dir: Path, hparams: dict) -> int:
    """Gemma 3's count of real vocabulary rows (token_embd is cut to it)."""
    if (model_dir / "tokenizer.model").is_file():
        return len(spm_tokens(model_dir, hparams)[0])
    tj = tokenizer_json(model_dir)
    return len(tj["model"]["vocab"]) + len(tj["added_tokens"])
