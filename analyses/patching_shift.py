"""Shift invariance and position patching: which schemes ignore absolute position, and where position is used.

Expected from the schemes' definitions (Su et al. 2021; Press et al. 2022; RESEARCH.md §2, §6):
moving every position id by k leaves RoPE, ALiBi and NoPE outputs unchanged up to float
rounding, and changes learned / sinusoidal absolute models. Activation patching (Meng et al.
2022) with a position-only corruption then locates where the position a model uses lives:
``patch_positions`` copies the residual stream (``resid_pre``) of a position-shifted run into
the clean run, per layer and per token (zoo models; SmolLM2 on 11 layers × 32 positions) and per
layer for the whole sequence (all models; SmolLM2 on all 30 layers).
For the learned zoo model the corruption is ``offset`` (position ids + k); for RoPE / NoPE, whose
outputs ignore an offset, it is ``filler`` (k filler tokens inserted after the BOS).

Usage: ``python analyses/patching_shift.py [--quick] [--out DIR] [--zoo-root DIR]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ZOO_ORDER, begin, load_zoo_model, skipped_row, with_notes

NAME = "patching_shift"
PATCH_PLAN = {"learned": ("offset", "filler"), "rope": ("filler",), "none": ("filler",)}


def settings(quick: bool) -> dict:
    if quick:
        return {
            "shift_zoo": {"n": 4, "seq_len": 128, "shifts": [1, 8, 64]},
            "shift_smol": {"n": 2, "seq_len": 64, "shifts": [1, 8, 64]},
            "patch_zoo": {"n": 4, "seq_len": 32, "shift": 8},
            "patch_smol": {"n": 2, "seq_len": 32, "shift": 8, "layers": [*range(0, 30, 3), 29]},
            "patch_smol_positions": {"n": 2, "seq_len": 16, "shift": 4, "layers": [0, 15, 29]},
        }
    return {
        "shift_zoo": {"n": 32, "seq_len": 128, "shifts": [1, 8, 64, 128]},
        "shift_smol": {"n": 8, "seq_len": 128, "shifts": [1, 8, 64, 128]},
        "patch_zoo": {"n": 32, "seq_len": 64, "shift": 16},
        "patch_smol": {"n": 8, "seq_len": 64, "shift": 16, "layers": None},
        # layer × position on SmolLM2: one patched forward per (layer, position), so fewer layers and tokens
        "patch_smol_positions": {"n": 4, "seq_len": 32, "shift": 8, "layers": [*range(0, 30, 3), 29]},
    }


def shift_table(model, label: str, cfg: dict, seed: int) -> pd.DataFrame:
    import posprobe as pp

    batch = pp.data.text_windows(model, n=cfg["n"], seq_len=cfg["seq_len"], seed=seed)
    bos = (True, False) if model.info.bos_token_id is not None else (False,)
    result = pp.shift_invariance(model, batch, shifts=cfg["shifts"], with_bos=bos, batch_size=4)
    return result.table.assign(model=label, position_scheme=model.info.position_scheme)


def shift_figure(table: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    rows = table.dropna(subset=["kl"])
    for (model, bos), g in rows.groupby(["model", "with_bos"], sort=False):
        fig.add_scatter(
            x=g["shift"],
            y=g["kl"].clip(lower=1e-16),
            mode="lines+markers",
            name=f"{model} ({'BOS' if bos else 'no BOS'})",
            customdata=g[["max_abs_logit_diff"]].to_numpy(),
            hovertemplate="shift %{x}<br>KL %{y:.3g} nats<br>max |Δlogit| %{customdata[0]:.3g}<extra></extra>",
        )
    fig.update_layout(
        title="Shift invariance: KL(original ‖ all position ids + k) per token (floor 1e-16)",
        xaxis={"title": "shift k (positions)", "type": "log"},
        yaxis={"title": "KL (nats)", "type": "log"},
        template="plotly_white",
    )
    return fig


def headline(shifts: pd.DataFrame, patches: pd.DataFrame) -> dict:
    out: dict = {"shift_invariance": {}, "patching": {}}
    for (model, bos), g in shifts.dropna(subset=["kl"]).groupby(["model", "with_bos"], sort=False):
        out["shift_invariance"][f"{model} · {'BOS' if bos else 'no BOS'}"] = {
            f"kl_shift{int(r.shift)}": float(f"{r.kl:.3g}") for r in g.itertuples()
        } | {"max_abs_logit_diff": float(f"{g['max_abs_logit_diff'].max():.3g}")}
    lp = patches[(patches["metric"] == "logprob")] if len(patches) else patches
    for (model, mode), g in lp.groupby(["model", "mode"], sort=False):
        whole = g[g["position"].isna()]
        per_pos = g[g["position"].notna()]
        entry = {
            "clean_logprob": round(float(g["clean"].iloc[0]), 4),
            "corrupt_logprob": round(float(g["corrupt"].iloc[0]), 4),
        }
        if len(whole):
            entry["normalized_by_layer"] = [round(float(v), 3) for v in whole.sort_values("layer")["normalized"]]
        if len(per_pos):
            top = per_pos.loc[per_pos["effect"].abs().idxmax()]
            entry["largest_single_token_patch"] = {
                "layer": int(top["layer"]),
                "position": int(top["position"]),
                "effect": round(float(top["effect"]), 5),
                "normalized": round(float(top["normalized"]), 4),
            }
            by_layer = per_pos.groupby("layer")["effect"].sum()
            entry["sum_of_per_token_effects_by_layer"] = [round(float(v), 4) for v in by_layer]
        out["patching"][f"{model} · {mode}"] = entry
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    import posprobe as pp
    from posprobe.plots.patching import patching_heatmap

    args, out, cfg = begin(argv, __doc__, NAME, settings)
    shifts, patches, skipped = [], [], {}
    for variant in ZOO_ORDER:
        model, note = load_zoo_model(variant, args.zoo_root)
        if model is None:
            skipped[f"zoo:{variant}"] = note
            shifts.append(skipped_row(f"zoo:{variant}", note, position_scheme=variant))
            continue
        shifts.append(shift_table(model, f"zoo:{variant}", cfg["shift_zoo"], args.seed))
        pc = cfg["patch_zoo"]
        batch = pp.data.text_windows(model, n=pc["n"], seq_len=pc["seq_len"], seed=args.seed)
        for mode in PATCH_PLAN.get(variant, ()):
            res = pp.patch_positions(model, batch, shift=pc["shift"], mode=mode, sites="resid_pre", per_position=True)
            # the whole-sequence patch of each layer too, so per-token effects can be set against it
            whole = pp.patch_positions(
                model, batch, shift=pc["shift"], mode=mode, sites="resid_pre", per_position=False
            )
            table = pd.concat([res.table, whole.table], ignore_index=True).assign(model=f"zoo:{variant}", mode=mode)
            patches.append(table)
            out.figure(
                f"patch_heatmap_zoo_{variant}_{mode}",
                patching_heatmap(res.table.assign(model=f"zoo:{variant}", mode=mode, shift=pc["shift"])),
            )
        print(f"[{NAME}] zoo:{variant} done")
    smol = pp.load_model("smollm2-135m")
    shifts.append(shift_table(smol, "smollm2-135m", cfg["shift_smol"], args.seed))
    ps = cfg["patch_smol"]
    batch = pp.data.text_windows(smol, n=ps["n"], seq_len=ps["seq_len"], seed=args.seed)
    res = pp.patch_positions(
        smol, batch, shift=ps["shift"], mode="filler", sites="resid_pre", layers=ps["layers"], per_position=False
    )
    smol_table = res.table.assign(model="smollm2-135m", mode="filler")
    patches.append(smol_table)
    out.figure("patch_by_layer_smollm2_filler", patching_heatmap(smol_table.assign(shift=ps["shift"])))
    pp_cfg = cfg["patch_smol_positions"]
    batch = pp.data.text_windows(smol, n=pp_cfg["n"], seq_len=pp_cfg["seq_len"], seed=args.seed)
    res = pp.patch_positions(
        smol, batch, shift=pp_cfg["shift"], mode="filler", sites="resid_pre", layers=pp_cfg["layers"], per_position=True
    )
    mode = f"filler, {pp_cfg['n']}×{pp_cfg['seq_len']} tokens per position"
    per_pos = res.table.assign(model="smollm2-135m", mode=mode)
    patches.append(per_pos)
    out.figure("patch_heatmap_smollm2_filler", patching_heatmap(per_pos.assign(shift=pp_cfg["shift"])))
    print(f"[{NAME}] smollm2-135m done")
    shift_t, patch_t = with_notes(shifts), pd.concat(patches, ignore_index=True)
    out.table("shift_invariance", shift_t)
    out.table("patching", patch_t)
    out.figure("shift_invariance", shift_figure(shift_t))
    out.summary = headline(shift_t, patch_t)
    out.summary["skipped"] = skipped
    return out.finish()


if __name__ == "__main__":
    main()
