"""Token windows for calibration (random, seeded) and evaluation (consecutive, held out)."""

from __future__ import annotations

import torch

from qconvert.errors import QConvertError


def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer itself adds one (every window must then start with it)."""
    ids = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    return bos if bos is not None and ids and ids[0] == bos else None


def token_stream(texts: list[str], tokenizer) -> list[int]:
    """All documents, tokenized without special tokens, joined by EOS (when there is one)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False).input_ids:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    return stream


def _windows(stream: list[int], starts: list[int], body: int, bos: int | None) -> torch.Tensor:
    prefix = [] if bos is None else [bos]
    return torch.tensor([prefix + stream[s : s + body] for s in starts], dtype=torch.long)


def calibration_windows(texts: list[str], tokenizer, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets, BOS first where the model uses it."""
    if samples < 1 or seq_len < 2:
        raise QConvertError("--samples must be >= 1 and --seq-len >= 2")
    bos = bos_id(tokenizer)
    body = seq_len - (bos is not None)
    stream = token_stream(texts, tokenizer)
    if len(stream) < body:
        raise QConvertError(f"the dataset has {len(stream)} tokens, fewer than one window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - body + 1, (samples,), generator=gen).tolist()
    return _windows(stream, starts, body, bos)


def saved_windows(path, samples: int, seq_len: int) -> torch.Tensor:
    """Pre-tokenized windows saved with torch.save (a LongTensor [n, seq_len]): the first `samples`."""
    try:
        ids = torch.load(path, weights_only=True)
    except Exception as exc:
        raise QConvertError(f"{path}: cannot read token ids ({type(exc).__name__}: {exc})") from None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise QConvertError(f"{path}: expected an integer tensor [windows, seq_len] of token ids")
    if ids.shape[0] < samples or ids.shape[1] != seq_len:
        raise QConvertError(f"{path}: holds {ids.shape[0]} x {ids.shape[1]} token ids; "
                            f"--samples {samples} --seq-len {seq_len} asks for {samples} x {seq_len}")
    return ids[:samples].long()


def evaluation_windows(texts: list[str], tokenizer, max_windows: int, seq_len: int) -> torch.Tensor:
    """Consecutive, non-overlapping windows from the start of the text (deterministic)."""
    bos = bos_id(tokenizer)
    body = seq_len - (bos is not None)
    stream = token_stream(texts, tokenizer)
    count = min(max_windows, len(stream) // body)
    if count < 1:
        raise QConvertError(f"the dataset has {len(stream)} tokens, fewer than one window of {seq_len}")
    return _windows(stream, [i * body for i in range(count)], body, bos)
