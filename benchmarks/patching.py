"""Position patching: patches stacked along the batch against one patch per forward (prints JSON).

``patch_positions`` runs up to ``batch_size // n_seq`` patched copies of a chunk in one forward.
Side by side on one model and one token batch (medians of ``--repeats`` runs):

- ``forward_s``: one plain forward of the batch with logits, the unit of cost;
- ``stacked_s``: ``patch_positions`` over resid_pre × every layer × every position with
  ``batch_size = n_seq × --stack``;
- ``one_per_forward_s``: the same with ``batch_size = n_seq`` (one patched copy per forward, the
  loop one writes by hand); ``speedup`` = one_per_forward_s / stacked_s;
- ``max_abs_diff``: largest difference between the two tables' effects (they must agree).

The model is a random-weight Llama (``--hidden``, ``--layers``, ``--vocab``); no download.

    .venv/bin/python benchmarks/patching.py [--device cpu|cuda] [--n-seq 4] [--seq-len 32] [--stack 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_llama(hidden: int, layers: int, vocab: int, device: str):
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from posprobe.models.hf import HFModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 192),
        num_hidden_layers=layers,
        intermediate_size=hidden * 8 // 3,
        vocab_size=vocab,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )
    hf = LlamaForCausalLM(config).eval()
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<s>": 0}, unk_token="<s>")))
    return HFModel(hf, tok, name=f"llama-{hidden}x{layers} (random)").to(device)


def timed(fn, repeats: int, device: str) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-seq", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--stack", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from posprobe.stats.patching import patch_positions

    model = random_llama(args.hidden, args.layers, args.vocab, args.device)
    tokens = torch.randint(1, args.vocab, (args.n_seq, args.seq_len), generator=torch.Generator().manual_seed(0))
    kw = dict(shift=3, mode="filler", sites="resid_pre", per_position=True)
    forward_s, _ = timed(lambda: model.run(tokens), args.repeats, args.device)
    stacked_s, stacked = timed(
        lambda: patch_positions(model, tokens, batch_size=args.n_seq * args.stack, **kw), args.repeats, args.device
    )
    single_s, single = timed(
        lambda: patch_positions(model, tokens, batch_size=args.n_seq, **kw), args.repeats, args.device
    )
    n_patches = args.layers * args.seq_len
    print(
        json.dumps(
            {
                "model": model.info.name,
                "device": args.device,
                "threads": args.threads,
                "n_seq": args.n_seq,
                "seq_len": args.seq_len,
                "n_patches": n_patches,
                "stack": args.stack,
                "forward_s": forward_s,
                "stacked_s": stacked_s,
                "one_per_forward_s": single_s,
                "stacked_forwards_per_patch": stacked_s / forward_s / n_patches,
                "one_per_forward_forwards_per_patch": single_s / forward_s / n_patches,
                "speedup": single_s / stacked_s,
                "max_abs_diff": float((stacked.table["effect"] - single.table["effect"]).abs().max()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
