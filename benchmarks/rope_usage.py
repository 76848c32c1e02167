"""RoPE frequency analyses: cost against a plain forward, and the Δ-loop against the pairwise reference (prints JSON).

Side by side on one model and one token batch (medians of ``--repeats`` runs):

- ``forward_s``: the model body alone (``model.run(..., return_logits=False)``), the floor;
- ``usage_s``: ``rope_frequency_usage`` on every layer (q/k capture, pattern scores, plane norms,
  contributions for Δ ≤ ``--max-delta``), reported as a ratio to the forward;
- ``loss_s`` / ``ablation_condition_s``: one loss forward, and one ablation condition of
  ``rope_ablation`` (the same forward with ablation hooks and pattern scores on every layer);
- for one layer, ``delta_cross_products`` (every Δ at once, as an FFT cross-correlation along the
  sequence) against the reference one writes by hand: every plane's full [b heads s t] score
  matrix, then the sum of each diagonal. Both give the same sums (``max_abs_diff``).

Uses SmolLM2-135M when ``posprobe.load_model`` can load it offline, otherwise (or with
``--synthetic``) a random-weight Llama of the same shape (``"synthetic": true``).

    .venv/bin/python benchmarks/rope_usage.py [--synthetic] [--device cpu|cuda] [--n-seq 8] [--seq-len 256]
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


def smollm2_shaped(device: str):
    """SmolLM2-135M's architecture with random weights and a stand-in tokenizer (no download)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from posprobe.models.hf import HFModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_hidden_layers=30,
        intermediate_size=1536,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
    )
    hf = LlamaForCausalLM(config).eval()
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<s>": 0}, unk_token="<s>")))
    return HFModel(hf, tok, name="smollm2-shaped (random)").to(device)


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pairwise_reference(qz: torch.Tensor, kz: torch.Tensor, kv_map: torch.Tensor, max_delta: int) -> torch.Tensor:
    """Sums of q_z conj(k_z) at each Δ from the full per-plane score matrices [b heads planes s t]."""
    full = torch.einsum("bshp,bthp->bhpst", qz, kz[:, :, kv_map].conj())
    return torch.stack([full.diagonal(-d, dim1=-2, dim2=-1).sum((0, -1)) for d in range(max_delta + 1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-seq", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-delta", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from posprobe.sites import SiteKey
    from posprobe.stats.rope import delta_cross_products, kv_heads, layer_planes, rope_frequency_usage
    from posprobe.stats.rope_ablation import frequency_ablation_hooks
    from posprobe.stats.rope_roles import PatternScores

    synthetic = args.synthetic
    if not synthetic:
        try:
            import posprobe as pp

            model = pp.load_model("smollm2-135m", device=args.device)
        except (ImportError, OSError, ValueError):
            synthetic = True
    if synthetic:
        model = smollm2_shaped(args.device)
    info = model.info
    tokens = torch.randint(2, 20000, (args.n_seq, args.seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    d = args.device
    forward = timed(lambda: model.run(tokens, return_logits=False), args.repeats, d)
    usage = timed(
        lambda: rope_frequency_usage(model, tokens, batch_size=args.n_seq, max_delta=args.max_delta), args.repeats, d
    )
    loss = timed(lambda: model.loss(tokens, mask), args.repeats, d)
    ablation_hooks = frequency_ablation_hooks(model, range(info.n_layers), 0.5, "lowest")

    def ablated() -> None:
        scores = PatternScores(range(info.n_layers), info.n_heads)
        model.loss(tokens, mask, hooks={**ablation_hooks, **scores.hooks(mask)})

    condition = timed(ablated, args.repeats, d)

    layer = info.n_layers // 2
    acts = model.capture(tokens, [SiteKey("q", layer), SiteKey("k", layer)])
    planes = layer_planes(info, layer)
    qz, kz = planes.split(acts[SiteKey("q", layer)]), planes.split(acts[SiteKey("k", layer)])
    valid = torch.ones(tokens.shape, dtype=torch.bool, device=qz.device)
    kv_map = torch.as_tensor(kv_heads(info.n_heads, info.n_kv_heads), device=qz.device)
    fft_sums, _ = delta_cross_products(qz, kz, valid, kv_map, args.max_delta)
    reference = pairwise_reference(qz, kz, kv_map, args.max_delta)
    fft_s = timed(lambda: delta_cross_products(qz, kz, valid, kv_map, args.max_delta), args.repeats, d)
    reference_s = timed(lambda: pairwise_reference(qz, kz, kv_map, args.max_delta), args.repeats, d)
    result = {
        "device": torch.cuda.get_device_name() if d == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "model": info.name,
        "synthetic": synthetic,
        "n_seq": args.n_seq,
        "seq_len": args.seq_len,
        "max_delta": args.max_delta,
        "forward_s": round(forward, 4),
        "usage_s": round(usage, 4),
        "usage_over_forward": round(usage / forward, 2),
        "loss_s": round(loss, 4),
        "ablation_condition_s": round(condition, 4),
        "ablation_condition_over_loss": round(condition / loss, 2),
        "one_layer": {
            "layer": layer,
            "fft_cross_products_s": round(fft_s, 5),
            "pairwise_reference_s": round(reference_s, 5),
            "speedup": round(reference_s / fft_s, 2),
            "max_abs_diff": float((fft_sums - reference.to(fft_sums.dtype)).abs().max()),
            "max_abs_sum": float(fft_sums.abs().max()),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
