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
# # A transformer without positional encodings still knows position
#
# Haviv et al. (2022, "Transformer language models without positional encodings still learn
# positional information") trained decoders with no positional encoding at all (**NoPE**) and
# found that a linear probe still recovers each token's absolute position from the hidden states:
# at chance in the embeddings, best in early-middle layers, fading towards the top. Causal
# attention is the source: a token at position t averages over t + 1 values, so the **variance**
# of the attention output shrinks like 1/t (Chi et al. 2023), and nearby tokens end up with
# **similar** hidden states (Zuo et al. 2025).
#
# This notebook checks all three on posprobe's **zoo**: small decoders trained on the same data
# that differ only in their position scheme (`zoo:none`, `zoo:learned`, `zoo:sinusoidal`), with
# **random-init** twins as the control (RESEARCH.md §2: the random-init control must not be zero,
# because causal attention alone leaks position).

# %%
import tempfile

import pandas as pd
import plotly.express as px
import torch

import posprobe as pp

torch.manual_seed(0)
workdir = tempfile.TemporaryDirectory(prefix="posprobe-notebook-")  # stores land here, deleted at exit
pd.set_option("display.width", 160)

# %%
variants = ["none", "learned", "sinusoidal"]
models = {v: pp.load_model(f"zoo:{v}") for v in variants}
for m in models.values():
    print(m.info.summary())
tokens = pp.data.text_windows(models["none"], n=32, seq_len=128, seed=0)
print(tokens.shape)

# %% [markdown]
# ## 1. Probe curves: NoPE vs learned vs sinusoidal
#
# `pp.probe_model` extracts the residual stream of the model **and** of its random-init copy on the
# same tokens, then fits the probes with all controls. The zoo models share one tokenizer, so the
# tokens are the same for all three.

# %%
tables = []
for v, m in models.items():
    res = pp.probe_model(m, tokens, site="resid_post", seed=0, out=f"{workdir.name}/probe-{v}")
    tables.append(res.table)
probes = pd.concat(tables, ignore_index=True)
main = probes[(probes["target"] == "absolute") & ~probes["include_pos0"]]
main[["model", "layer", "r2", "mad", "mad_chance", "control_random_init", "control_token", "selectivity"]].round(3)

# %%
fig = px.line(
    main,
    x="layer",
    y="r2",
    color="model",
    markers=True,
    title="Absolute-position probe R² per layer (held-out sequences, position 0 excluded)",
    labels={"r2": "R² (held-out sequences)", "layer": "layer (resid_post)"},
)
for v in variants:
    control = main[main["model"] == f"zoo:{v}"]
    fig.add_scatter(
        x=control["layer"],
        y=control["control_random_init"],
        mode="lines",
        line={"dash": "dot", "width": 1},
        name=f"zoo:{v} · random-init control",
    )
fig.update_layout(template="plotly_white")
fig

# %% [markdown]
# **What to look for.** Three things. (1) How R² moves with depth for each scheme: Haviv et al.
# found NoPE at chance in the embeddings, best in early-middle layers (their MAD: 337 at layer 0,
# ≈16.5 in layers 4–7, for 1,024 positions), then fading, while learned and sinusoidal APEs are
# readable right at the input. (2) The dotted random-init controls. They are not zero: an untrained
# causal stack already leaks position, and an untrained absolute scheme's position vectors are
# trivially decodable. `selectivity` (R² minus the best control) is what training added, and it
# can be negative when trained token content drowns the position signal. (3) Scale: our zoo models
# are tiny (4 layers, d_model 128) and briefly trained, so compare shapes, not the paper's numbers.

# %% [markdown]
# ## 2. Attention-output variance falls with position (Chi et al. 2023)
#
# For a causal model without positional encodings, the attention output at position t mixes
# t + 1 value vectors, so its variance across hidden units falls roughly as 1/(t + 1): the fitted
# exponent `a` of variance ∝ n_keys^(−a) is near 1 at random initialisation.

# %%
nope = models["none"]
random_nope = nope.random_init_copy(seed=0)
variance = {name: pp.attention_variance(m, tokens) for name, m in {"trained": nope, "random init": random_nope}.items()}
pd.concat([v.exponents.assign(model=name) for name, v in variance.items()])[
    ["model", "layer", "exponent", "r2", "spearman"]
].round(3)

# %%
variance["random init"].figure()

# %%
variance["trained"].figure()

# %% [markdown]
# **What to look for.** At random initialisation the variance falls as a clean power law
# (straight lines on log-log axes, `r2` of the fit near 1, Spearman with position strongly
# negative); Chi et al.'s idealised analysis predicts an exponent of 1 for uncorrelated values,
# and correlated values or a BOS sink make it shallower. After training the fall persists but is
# shallower and noisier: compare `exponent` and `spearman` between the two tables.
#
# ## 3. Nearby tokens have similar hidden states (Zuo et al. 2025)
#
# Cosine similarity between hidden states at positions i and j falls with |i − j|; the adjacency
# score is the share of tokens whose most similar other token is an immediate neighbour.

# %%
similarity = pp.embedding_similarity(nope, tokens, max_distance=64)
similarity.summary[~similarity.summary["include_pos0"]].round(3)

# %%
similarity.figure()

# %% [markdown]
# **What to look for.** Whether similarity decays with distance already after the first layer,
# and how far `adjacency` rises above `adjacency_chance`: Zuo et al. argue that this similarity of
# neighbours, created by the first causal attention layer, is what lets a NoPE model recover
# order without any positional encoding.
#
# ## 4. What the learned table itself looks like
#
# The learned model's position signal at layer 0 is its table W_pos. GPT-2's W_pos lies on a
# helix: its top principal components are smooth, periodic functions of position (RESEARCH.md §6).
# `pp.position_embedding_geometry` measures that for any model with a learned or sinusoidal table:
# each component's dominant period and how pure it is, whether the PC1–PC2 angle turns at a
# constant rate, and how similar rows Δ apart are, beside the random-init twin's table.

# %%
tables = {"zoo:learned": models["learned"], "minilm-l6": pp.load_model("minilm-l6")}
geometry = {name: pp.position_embedding_geometry(m) for name, m in tables.items()}
pd.DataFrame({name: g.summary for name, g in geometry.items()}).T

# %%
geometry["minilm-l6"].figure("helix")

# %%
geometry["zoo:learned"].figure("neighbours")

# %% [markdown]
# **What to look for.** MiniLM (BERT-style, 512 learned positions, long pretraining) shows the
# helix: PC1 and PC2 are near-pure sinusoids of the same short period and their angle turns
# linearly (R² near 1), and neighbouring rows are far more similar than at random init. The zoo's
# learned table (6.6M training tokens) has built the slow part only: one dominant direction along
# which position runs monotonically (PC1, Spearman near −1), neighbours similar, no fast rotation.
# At random init the rows are unrelated (neighbour similarity near 0): the structure is learned.
