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
# # RoPE frequencies: which rotation planes do heads use? (Gemma 3 vs SmolLM2)
#
# Rotary position embedding rotates each 2-D plane i of a query and key by θ_i·position, with
# θ_i = base^(−2i/d). Barbero et al. (2024, "Round and round we go! What makes rotary positional
# encodings useful?") split q and k into these planes and measured the norm each plane carries:
# the **highest frequencies** build positional heads (diagonal, previous-token attention) and the
# **lowest** carry most of the norm, likely semantics; dropping the lowest fraction p (**p-RoPE**)
# costs little.
#
# Two models with different bases: **Gemma 3 270M** alternates sliding-window local layers
# (base 1e4, 512-token windows) with global layers (base 1e6 at layers 5, 11, 17); **SmolLM2-135M**
# uses base 1e5 everywhere. posprobe reads the base per layer from the model config.

# %%
import tempfile

import pandas as pd
import torch

import posprobe as pp

torch.manual_seed(0)
workdir = tempfile.TemporaryDirectory(prefix="posprobe-notebook-")  # stores land here, deleted at exit
pd.set_option("display.width", 160)

# %%
gemma = pp.load_model("gemma-3-270m")
smol = pp.load_model("smollm2-135m")
for m in (gemma, smol):
    print(m.info.summary())

# %% [markdown]
# ## 1. Frequency usage per head
#
# `pp.rope_frequency_usage` runs the model on real text and, per layer, head and plane, records
# the mean norm of the pre-rotation query and key; `share` is the plane's share of the head's q·k
# norm product, a bound on what that plane can add to the attention logit.

# %%
usage = {}
for name, m in {"gemma-3-270m": gemma, "smollm2-135m": smol}.items():
    toks = pp.data.text_windows(m, n=4, seq_len=64, seed=0)
    usage[name] = pp.rope_frequency_usage(m, toks)
usage["gemma-3-270m"].table.head()

# %%
usage["gemma-3-270m"].figure()

# %%
usage["smollm2-135m"].figure()

# %% [markdown]
# **What to look for.** Each row is a head (layer.head), each column a plane from the highest
# frequency (left) to the lowest (right). Most of the norm sits in the low-frequency planes, as
# Barbero et al. report for Gemma 7B. Gemma's global layers (5, 11, 17) have a 100× larger base,
# so their lowest planes barely rotate over the context: they are nearly position-free channels.

# %%
usage["gemma-3-270m"].figure("spectrum", layer=5)

# %% [markdown]
# ## 2. Head roles
#
# Heads are classified from frequency use and attention pattern: **positional** (high-frequency
# share and a sharp previous-token or diagonal pattern), **semantic** (norm in the low planes,
# diffuse pattern) or **mixed**.

# %%
pd.concat([u.head_roles.assign(model=name) for name, u in usage.items()]).groupby(["model", "role"]).size().unstack(
    fill_value=0
)

# %%
usage["smollm2-135m"].figure("roles")

# %% [markdown]
# ## 3. A p-RoPE ablation
#
# `pp.rope_ablation` switches off the lowest (or the highest) fraction p of every head's frequency
# planes in a trained model, in one of two ways: `unrotate` keeps the planes' values but stops
# their rotation (θ = 0: this is p-RoPE itself), `zero` removes the planes from q and k
# altogether. It reports the change in next-token loss (nats per token) and in every head's
# previous-token attention.

# %%
toks = pp.data.text_windows(smol, n=4, seq_len=64, seed=1)
ablations = {
    mode: pp.rope_ablation(
        smol, toks, ps=(0.25,), which=("lowest", "highest"), mode=mode, layer_groups={"all": range(smol.info.n_layers)}
    )
    for mode in ("unrotate", "zero")
}
pd.concat([a.table for a in ablations.values()])[
    ["mode", "which", "p", "n_planes_ablated", "base_loss", "loss", "delta_loss"]
].round(3)

# %%
ablations["unrotate"].figure("heads", group="all", which="highest")

# %% [markdown]
# **What to look for.** The two modes separate *position* from *content*, Barbero et al.'s point.
# Unrotating the lowest quarter (p-RoPE) should cost little: over a 64-token window those planes
# turn by a small fraction of a radian, so they were nearly position-free already. Unrotating the
# highest quarter takes away the fast clocks that previous-token and diagonal heads read (their
# points fall below the diagonal in the figure). Zeroing instead removes the planes' share of the
# q·k norm, and the lowest planes carry most of it (section 1), so zeroing them hurts far more than
# unrotating them. These are 4 short windows: a demonstration, not a measurement (use
# `n=64, seq_len=256` for one).
