# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Positional neurons in the MLPs
#
# Voita et al. (2023, "Neurons in large language models: dead, n-gram, positional") found MLP
# neurons whose firing depends on the token's **position** rather than its content: in OPT-125M,
# layer 2 holds about ten oscillatory neurons that tile the positions; a model trained without
# positional encodings has positional neurons but no oscillatory ones. A neuron is scored by the
# mutual information `I(active; position)` (bits) between firing (activation above f(0)) and
# position; it is positional when the MI, less its expected bias `(K − 1)/(2N ln 2)` for K positions
# and N tokens, exceeds 0.05. For smooth activations (GELU / SwiGLU) posprobe also reports η², the
# share of a neuron's activation variance explained by position, and the period of its mean
# activation over positions.
#
# We scan SmolLM2 first, then compare the zoo's learned-embedding and NoPE models.

# %%
import tempfile

import pandas as pd
import torch

import posprobe as pp

torch.manual_seed(0)
workdir = tempfile.TemporaryDirectory(prefix="posprobe-notebook-")  # stores land here, deleted at exit
pd.set_option("display.width", 160)

# %%
smol = pp.load_model("smollm2-135m")
tokens = pp.data.text_windows(smol, n=16, seq_len=128, seed=0)
store = pp.extract(
    smol, tokens, sites="mlp_post", layers=[0, 1, 2, 3, 10, 15, 20, 29], out=f"{workdir.name}/smol", progress=False
)
neurons = pp.positional_neurons(store)
neurons.layer_summary

# %%
neurons.figure("counts")

# %% [markdown]
# **What to look for.** Positional counts per layer and category (oscillatory, both-extremes,
# one-extreme, other-strong / other-weak). SmolLM2's MLPs are gated (SwiGLU): "active" means the
# gated activation is above 0, and η² is often the more telling score. With 16 windows × 128
# tokens the MI estimate is still noisy; Voita et al. used about 5M tokens.

# %%
top = neurons.top(10)
top[["layer", "neuron", "mi", "mi_bias", "eta2", "period", "firing_rate", "peak_position", "category"]].round(3)

# %%
neurons.figure("heatmap", top=20) if len(top) else neurons.figure("counts")

# %%
best = top.iloc[0] if len(top) else neurons.table.sort_values("eta2", ascending=False).iloc[0]
neurons.figure("profile", layer=int(best["layer"]), neuron=int(best["neuron"]))

# %% [markdown]
# **What to look for.** The heatmap shows each top neuron's mean activation (z-scored over
# positions) against position: a band at the left edge is a neuron that marks the first tokens of
# a window (the attention-sink region), a slow ramp counts position, stripes are oscillation. The
# profile adds the spread over sequences and the firing rate at each position.
#
# ## The zoo: learned positions vs none
#
# The same scan on two zoo models that differ only in their position scheme.

# %%
zoo = {}
for v in ("learned", "none"):
    m = pp.load_model(f"zoo:{v}")
    toks = pp.data.text_windows(m, n=64, seq_len=128, seed=0)
    zstore = pp.extract(m, toks, sites="mlp_post", out=f"{workdir.name}/zoo-{v}", progress=False)
    zoo[v] = pp.positional_neurons(zstore)
pd.concat(
    [
        r.table.groupby("layer")
        .agg(
            positional=("is_positional", "sum"),
            max_mi=("mi", "max"),
            max_eta2=("eta2", "max"),
            median_eta2=("eta2", "median"),
        )
        .assign(model=f"zoo:{v}")
        for v, r in zoo.items()
    ]
).round(3)

# %% [markdown]
# **What to look for.** Whether the learned-embedding model, which is handed position at the
# input, grows more position-dependent MLP units than the NoPE model, which must compute position
# from causal attention. Our zoo models are small and briefly trained (see `data/zoo/README.md`),
# so expect far weaker positional neurons than in OPT: compare the η² columns, not only the
# counts above the MI threshold.
