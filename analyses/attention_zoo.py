"""Attention diagnostics across position schemes: variance, similarity of nearby states, head roles.

The comparison issue #7 asks for: the five zoo models (NoPE, learned, sinusoidal, RoPE, ALiBi),
each trained and at random initialisation, and SmolLM2 (trained and at initialisation), all on
the same kind of text windows. Per model and state:

- ``attention_variance`` (Chi et al. 2023): per layer the exponent a of attention-output
  variance ∝ keys^(−a) and the within-sequence |Spearman ρ| of variance with position;
- ``embedding_similarity`` at ``resid_post`` (Zuo et al. 2025): cosine similarity at distance 1
  and at the largest distance, adjacency (most similar other token is a neighbour) against its
  chance level, and spectral order recovery; ``compare_position_predictors`` says which of the
  two signals orders tokens better, layer by layer;
- ``attention_stats``: per-head entropy, sink (first-token) mass, previous-token score, and
  the head-role table (rules in ``posprobe.stats.attention.HeadRoleRules``, written to
  ``role_rules.csv``).

Usage: ``python analyses/attention_zoo.py [--quick] [--out DIR] [--zoo-root DIR] [--zoo v1|v2|v1,v2]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ZOO_ORDER, begin, load_zoo_model, skipped_row, with_notes, zoo_name

NAME = "attention_zoo"


def settings(quick: bool) -> dict:
    if quick:
        return {"zoo": {"n": 8, "seq_len": 64}, "smol": {"n": 4, "seq_len": 64}}
    return {"zoo": {"n": 64, "seq_len": 256}, "smol": {"n": 16, "seq_len": 256}}


def analyse(model, batch, label: dict) -> dict[str, pd.DataFrame]:
    """Variance, similarity, predictor comparison and head statistics of one model on ``batch``."""
    import posprobe as pp
    from posprobe.stats.similarity import compare_position_predictors

    var = pp.attention_variance(model, batch, site="attn_out")
    sim = pp.embedding_similarity(model, batch, site="resid_post")
    stats = pp.attention_stats(model, batch)
    summary = sim.summary[~sim.summary["include_pos0"]].set_index("layer")
    table = sim.table[~sim.table["include_pos0"]]
    far = int(table["distance"].max())
    cos = table.pivot_table(index="layer", columns="distance", values="cos_sim")
    layers = var.exponents.set_index("layer")
    heads = stats.heads[~stats.heads["include_pos0"]]
    head_means = heads.groupby("layer")[["first_token_mass", "previous_token", "normalized_entropy"]].mean()
    head_means = head_means.reindex(layers.index)
    per_layer = pd.DataFrame(
        {
            "layer": layers.index,
            "variance_exponent": layers["exponent"].to_numpy(),
            "variance_fit_r2": layers["r2"].to_numpy(),
            "variance_abs_spearman": layers["abs_spearman"].to_numpy(),
            "cos_d1": cos[1].reindex(layers.index).to_numpy(),
            "cos_far": cos[far].reindex(layers.index).to_numpy(),
            "far_distance": far,
            "adjacency": summary["adjacency"].reindex(layers.index).to_numpy(),
            "adjacency_chance": summary["adjacency_chance"].reindex(layers.index).to_numpy(),
            "spectral_spearman": summary["spectral_spearman"].reindex(layers.index).to_numpy(),
            **{col: head_means[col].to_numpy() for col in head_means.columns},
        }
    ).assign(**label)
    predictors = compare_position_predictors(var, sim).assign(**label)
    roles = stats.roles.assign(**label)
    return {"per_layer": per_layer, "predictors": predictors, "roles": roles, "rules": stats.rules_table}


def comparison_figure(per_layer: pd.DataFrame) -> go.Figure:
    """Four panels per layer across models: variance exponent, adjacency / chance, sink mass, previous-token score."""
    panels = [
        ("variance_exponent", "variance exponent a (Chi: 1 at init)"),
        ("adjacency_over_chance", "adjacency ÷ chance (Zuo)"),
        ("first_token_mass", "first-token (sink) mass"),
        ("previous_token", "previous-token score"),
    ]
    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in panels])
    rows = per_layer.dropna(subset=["layer"]).assign(
        adjacency_over_chance=lambda d: d["adjacency"] / d["adjacency_chance"]
    )
    colors = {}
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for (model, state), g in rows.groupby(["model", "state"], sort=False):
        color = colors.setdefault(model, palette[len(colors) % len(palette)])
        for j, (col, _) in enumerate(panels):
            fig.add_scatter(
                x=g["layer"],
                y=g[col],
                mode="lines+markers",
                name=f"{model} · {state}",
                legendgroup=f"{model} · {state}",
                showlegend=j == 0,
                line={"color": color, "dash": "solid" if state == "trained" else "dot"},
                hovertemplate=f"{model} · {state}<br>layer %{{x}}<br>{col} %{{y:.3f}}<extra></extra>",
                row=j // 2 + 1,
                col=j % 2 + 1,
            )
    for j in range(4):
        fig.update_xaxes(title_text="layer", row=j // 2 + 1, col=j % 2 + 1)
    fig.update_layout(
        title="Attention diagnostics by position scheme (solid: trained, dotted: random init)",
        template="plotly_white",
        height=800,
    )
    return fig


def role_counts_figure(roles: pd.DataFrame) -> go.Figure:
    """Stacked bars: heads per role for every model and state."""
    from posprobe.stats.attention import ROLES

    counts = roles.groupby(["model", "state", "role"]).size().unstack("role", fill_value=0)
    labels = [f"{m} · {s}" for m, s in counts.index]
    fig = go.Figure()
    for role in ROLES:
        if role in counts:
            fig.add_bar(x=labels, y=counts[role], name=role, hovertemplate="%{x}<br>" + role + ": %{y}<extra></extra>")
    fig.update_layout(
        barmode="stack",
        title="Head roles per model (rules: role_rules.csv)",
        xaxis_title="model · state",
        yaxis_title="heads",
        template="plotly_white",
    )
    return fig


def headline(per_layer: pd.DataFrame, predictors: pd.DataFrame, roles: pd.DataFrame) -> dict:
    out: dict = {}
    rows = per_layer.dropna(subset=["layer"])
    for (model, state), g in rows.groupby(["model", "state"], sort=False):
        pred = predictors[(predictors["model"] == model) & (predictors["state"] == state)]
        best = pred[pred["best"]].groupby("predictor").size().to_dict() if "best" in pred else {}
        role_counts = roles[(roles["model"] == model) & (roles["state"] == state)]["role"].value_counts()
        out[f"{model} · {state}"] = {
            "variance_exponent_per_layer": [round(float(v), 3) for v in g["variance_exponent"]],
            "variance_abs_spearman_mean": round(float(g["variance_abs_spearman"].mean()), 3),
            "cos_d1_mean": round(float(g["cos_d1"].mean()), 3),
            "cos_far_mean": round(float(g["cos_far"].mean()), 3),
            "adjacency_over_chance_mean": round(float((g["adjacency"] / g["adjacency_chance"]).mean()), 2),
            "layers_where_similarity_orders_better": int(best.get("embedding_similarity", 0)),
            "layers_where_variance_orders_better": int(best.get("attention_variance", 0)),
            "first_token_mass_mean": round(float(g["first_token_mass"].mean()), 3),
            "roles": {k: int(v) for k, v in role_counts.items()},
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    import posprobe as pp
    from posprobe.plots.attention import head_role_map

    args, out, cfg = begin(argv, __doc__, NAME, settings, default_zoo="v1")
    parts: dict[str, list[pd.DataFrame]] = {"per_layer": [], "predictors": [], "roles": []}
    rules = None

    def add(result: dict[str, pd.DataFrame]) -> None:
        nonlocal rules
        for key in parts:
            parts[key].append(result[key])
        rules = result["rules"]

    for zoo, variant in [(zoo, variant) for zoo in args.zoo for variant in ZOO_ORDER]:
        name = zoo_name(variant, zoo)
        model, note = load_zoo_model(variant, args.zoo_root, zoo=zoo)
        if model is None:
            parts["per_layer"].append(skipped_row(name, note))
            continue
        batch = pp.data.text_windows(model, **cfg["zoo"], seed=args.seed)
        add(analyse(model, batch, {"model": name, "state": "trained", "position_scheme": variant}))
        twin = model.random_init_copy(args.seed)
        add(analyse(twin, batch, {"model": name, "state": "init", "position_scheme": variant}))
        print(f"[{NAME}] {name} done")
    smol = pp.load_model("smollm2-135m")
    batch = pp.data.text_windows(smol, **cfg["smol"], seed=args.seed)
    label = {"model": "smollm2-135m", "position_scheme": smol.info.position_scheme}
    add(analyse(smol, batch, {**label, "state": "trained"}))
    add(analyse(smol.random_init_copy(args.seed), batch, {**label, "state": "init"}))
    print(f"[{NAME}] smollm2-135m done")

    per_layer = with_notes(parts["per_layer"])
    predictors = pd.concat(parts["predictors"], ignore_index=True)
    roles = pd.concat(parts["roles"], ignore_index=True)
    out.table("per_layer", per_layer)
    out.table("position_predictors", predictors)
    out.table("head_roles", roles)
    out.table("role_rules", rules)
    out.figure("comparison_by_layer", comparison_figure(per_layer))
    out.figure("role_counts", role_counts_figure(roles))
    for model in roles["model"].unique():
        trained = roles[(roles["model"] == model) & (roles["state"] == "trained")]
        stem = "head_roles_" + model.replace(":", "_").replace("-", "_")
        out.figure(stem, head_role_map(trained, title=f"Head roles, {model} (trained)"))
    out.summary = headline(per_layer, predictors, roles)
    out.summary["skipped"] = {r.model: r.note for r in per_layer[per_layer["note"].notna()].itertuples()}
    return out.finish()


if __name__ == "__main__":
    main()
