"""Gu et al. 2025: attention sinks counted as the paper counts them, across position schemes and real models.

Published: Sink^ε_k, the share of heads (over all layers) whose mean attention on token k exceeds
ε = 0.3, on natural text, random tokens and one token repeated (T = 64). GPT2-XL 77.0 / 70.3 / 62.3 %,
Llama-2-7B 92.5 / 90.1 / 0.0 %, Llama-3-8B 99.0 / 91.2 / 0.0 %, Mistral-7B 97.5 / 75.2 / 0.0 %; ~60M
Llama-style models trained alike but for the position scheme, Sink^ε_1 on natural text: NoPE 20.4 %,
absolute 32.7 %, learnable 33.1 %, relative 35.5 %, ALiBi 20.8 %, RoPE 18.2 %.

Here: ``pp.attention_sinks`` (ε = 0.3, T = 64, with and without a BOS) on the zoo's six schemes,
trained and at random initialisation, and on SmolLM2-135M and Gemma 3 270M. Our k = 0 is the paper's
k = 1 (``paper_k`` in the tables). Besides the rates: the first token's massive activation and whether
each model's sink follows the first token or stays at the first position.

Usage: ``python analyses/gu_sinks.py [--quick] [--out DIR] [--zoo-root DIR] [--zoo v1|v2|v1,v2]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import begin, load_zoo_model, skipped_row, with_notes, zoo_name

NAME = "gu_sinks"
ZOO_SCHEMES = ("none", "learned", "sinusoidal", "rope", "alibi", "p-rope")
EPSILON = 0.3
SEQ_LEN = 64  # Gu et al.'s T


def settings(quick: bool) -> dict:
    if quick:
        return {"zoo": {"n": 8}, "smol": {"n": 4}, "gemma": {"n": 2}}
    return {"zoo": {"n": 64}, "smol": {"n": 32}, "gemma": {"n": 16}}


def measure(model, n: int, label: dict, seed: int) -> dict[str, pd.DataFrame]:
    """``attention_sinks`` of one model on the paper's three inputs, with and without BOS, labelled."""
    import posprobe as pp

    res = pp.attention_sinks(model, n=n, seq_len=SEQ_LEN, epsilon=EPSILON, seed=seed)
    tables = {"summary": res.summary, "by_layer": res.by_layer, "massive": res.massive, "moved": res.moved}
    return {name: table.assign(**label) for name, table in tables.items()}


def zoo_runs(args, n: int) -> list[dict[str, pd.DataFrame]]:
    """Every scheme of each zoo in ``args.zoo`` (v1 and v2 by default), trained and at random init."""
    runs = []
    for zoo in args.zoo:
        for scheme in ZOO_SCHEMES:
            name = zoo_name(scheme, zoo)
            model, note = load_zoo_model(scheme, args.zoo_root, zoo=zoo)
            if model is None:
                runs.append({"summary": skipped_row(name, note)})
                continue
            runs.append(measure(model, n, {"model": name, "state": "trained"}, args.seed))
            twin = model.random_init_copy(args.seed)
            runs.append(measure(twin, n, {"model": name, "state": "init"}, args.seed))
    return runs


def headline(summary: pd.DataFrame, moved: pd.DataFrame, massive: pd.DataFrame) -> dict:
    """Sink^0.3 of token 0 per model, state, input and BOS; the moved-token verdict; the largest massive ratio."""
    first = summary[(summary["k"] == 0) & summary["sink_rate"].notna()]
    out: dict = {}
    for (model, state), g in first.groupby(["model", "state"], sort=False):
        rates = {f"{r.input} · {'BOS' if r.bos else 'no BOS'}": round(float(r.sink_rate), 1) for r in g.itertuples()}
        out[f"{model} · {state}"] = {"sink_rate_k0_percent": rates}
    for (model, state), g in moved.groupby(["model", "state"], sort=False):
        heads = int(g["n_sink_heads"].sum())
        if heads and f"{model} · {state}" in out:
            out[f"{model} · {state}"]["moved_first_token"] = {
                outcome: round(float(g[f"n_{outcome}"].sum() / heads), 3)
                for outcome in ("follows_token", "stays_at_start", "dissolved")
            } | {"sink_heads": heads}
    for (model, state), g in massive.groupby(["model", "state"], sort=False):
        if f"{model} · {state}" in out:
            out[f"{model} · {state}"]["max_massive_ratio"] = round(float(g["ratio_mean"].max()), 1)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    import posprobe as pp

    args, out, cfg = begin(argv, __doc__, NAME, settings, default_zoo="v1,v2")
    runs = zoo_runs(args, cfg["zoo"]["n"])
    for name, key in (("smollm2-135m", "smol"), ("gemma-3-270m", "gemma")):
        model, n = pp.load_model(name), cfg[key]["n"]
        runs.append(measure(model, n, {"model": name, "state": "trained"}, args.seed))
        runs.append(measure(model.random_init_copy(args.seed), n, {"model": name, "state": "init"}, args.seed))
    names = ("summary", "by_layer", "massive", "moved")
    tables = {name: with_notes([r[name] for r in runs if name in r]) for name in names}
    for name, table in tables.items():
        out.table(name, table)
    out.figure("sink_rate_by_layer", _figure(tables["by_layer"]))
    out.summary = headline(tables["summary"], tables["moved"], tables["massive"])
    notes = tables["summary"]
    out.summary["skipped"] = {r.model: r.note for r in notes[notes["note"].notna()].itertuples()}
    return out.finish()


def _figure(by_layer: pd.DataFrame):
    """Sink^0.3_0 per layer of the trained models on natural text with BOS: one line per model."""
    import plotly.graph_objects as go

    rows = by_layer[(by_layer["k"] == 0) & (by_layer["input"] == "natural") & by_layer["bos"].astype(bool)]
    rows = rows[rows["state"] == "trained"]
    fig = go.Figure()
    for model, g in rows.groupby("model", sort=False):
        fig.add_scatter(x=g["layer"], y=g["sink_rate"], mode="lines+markers", name=model)
    fig.update_layout(
        title=f"Sink^{EPSILON}_1 (Gu et al.; our k = 0) per layer, natural text with BOS",
        xaxis_title="layer",
        yaxis_title="heads with α_0 > ε (%)",
        template="plotly_white",
    )
    return fig


if __name__ == "__main__":
    main()
