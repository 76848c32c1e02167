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
# # Patching position: which sites does the model actually use?
#
# Probes show where position *can be read*; activation patching (Meng et al. 2022; applied to
# position here) shows where it is *used*. A clean run and a corrupted run differ only in their
# position ids (every id shifted by k); one site is copied from the corrupted run into the clean
# one and we measure how far the output moves: `normalized` = 1 means that site alone carries the
# whole change. Makelov et al. (2023) warn that subspace patches can "work" by waking dormant
# pathways, so posprobe reports full-component patches first.
#
# Before patching, a simpler question: does the output change at all when every position shifts?
# For a relative scheme (RoPE) or NoPE it must not.

# %%
import tempfile

import pandas as pd
import torch

import posprobe as pp

torch.manual_seed(0)
workdir = tempfile.TemporaryDirectory(prefix="posprobe-notebook-")  # stores land here, deleted at exit
pd.set_option("display.width", 160)

# %%
zoo = {v: pp.load_model(f"zoo:{v}") for v in ("none", "learned", "sinusoidal", "rope")}
tokens = pp.data.text_windows(zoo["none"], n=8, seq_len=64, seed=0)
shift = pd.concat([pp.shift_invariance(m, tokens, shifts=(1, 8, 64)).table for m in zoo.values()], ignore_index=True)
shift[["model", "shift", "with_bos", "kl", "max_abs_logit_diff"]]

# %% [markdown]
# **What to look for.** KL ≈ 0 (float noise, ~1e-9) for `none` and `rope`: their outputs depend
# only on relative positions. The learned and sinusoidal models change: their embeddings are
# absolute, so shifted ids give different inputs.
#
# ## Position-shift patching in the learned-embedding model
#
# We shift every position by 8 and patch the residual stream entering each layer (`resid_pre`),
# one position at a time. A ridge probe fitted on the clean run at the last layer's input reads
# the decoded position of the patched token.

# %%
from posprobe.stats.patching import fit_site_probe

learned = zoo["learned"]
last = learned.info.n_layers - 1
probe = fit_site_probe(learned, tokens, site="resid_pre", layer=last)
patch = pp.patch_positions(learned, tokens[:4], shift=8, sites=("resid_pre",), per_position=True, probe=probe)
by_layer = {m: rows.groupby("layer")["normalized"] for m, rows in patch.table.groupby("metric")}
pd.DataFrame(
    {
        "kl, summed over positions": by_layer["kl"].sum(),
        "logprob, summed over positions": by_layer["logprob"].sum(),
        "probe_position, mean over positions": by_layer["probe_position"].mean(),
    }
).round(3)

# %%
patch.figure("kl")

# %%
patch.figure("probe_position", value="normalized")

# %% [markdown]
# **How to read it.** `kl` and `logprob` average over every token of the window, so one position's
# patch moves them by a small share of the full change, and a layer's per-position values sum to
# about its whole-sequence effect (the sums: 1 = the full change). `probe_position` is read at the
# patched token itself, so its mean over positions is the telling number: 1 means the token now
# decodes as shifted. At the probe's own
# site (the last layer) that is 1 by construction; at layer 0 it shows how much of the decoded
# position a token takes from its own embedding rather than rebuilding it from its context.
#
# ## Whole-layer patches across sites
#
# Without `per_position` each site is patched at every position at once: one number per
# (site, layer), cheap enough to scan attention and MLP outputs too.

# %%
whole = pp.patch_positions(learned, tokens[:4], shift=8, sites=("resid_pre", "attn_out", "mlp_out"), per_position=False)
whole.table[whole.table["metric"] == "kl"][["site", "layer", "clean", "corrupt", "value", "normalized"]].round(4)

# %% [markdown]
# **What to look for.** Every `resid_pre` carries the whole change: position enters once, at the
# input, and the residual stream carries it up. The attention and MLP outputs say which component
# writes a *position-dependent* signal into the stream, and how much of the output change each
# one alone explains; components far below 1 pass position on without re-encoding it.
