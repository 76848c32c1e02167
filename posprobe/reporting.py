"""``posprobe report``: one offline HTML page answering "where does position live in this model?".

Composition only: every number comes from an analysis in ``posprobe.stats`` run here, every
figure from ``posprobe.plots``. Tables land beside the page as CSV and Parquet, with a JSON
summary and the run's settings.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch

from posprobe.headlines import neurons_headline, probe_headline, roles_headline, shift_headline
from posprobe.labels import ROLES, ROPE_ROLES
from posprobe.models import PositionModel, load_model
from posprobe.progress import tqdm
from posprobe.results import Result

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportSettings:
    """What a report run measures on: token windows, seed, device; ``controls``: also run the random-init twin
    (seed ``seed``) for the head-role and neuron headlines (the probes always use it)."""

    n: int = 32
    seq_len: int = 256
    seed: int = 0
    device: str = "auto"
    quick: bool = False
    controls: bool = True

    @classmethod
    def make(cls, quick: bool = False, **overrides: Any) -> ReportSettings:
        base = cls(n=8, seq_len=128, quick=True) if quick else cls()
        return cls(**{**asdict(base), **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class Section:
    """One part of the page: a title, a sentence of findings, figures, and the results (saved with
    ``Result.save``: name → (result, the tables of it the report keeps)) or plain tables behind them."""

    key: str
    title: str
    summary: str
    figures: list[go.Figure] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    results: dict[str, tuple[Result, tuple[str, ...]]] = field(default_factory=dict)

    def all_tables(self) -> dict[str, pd.DataFrame]:
        """Every table the section keeps, by file stem: plain ones by name, a result's as ``<name>.<table>``."""
        found = dict(self.tables)
        for name, (result, kept) in self.results.items():
            found.update({f"{name}.{t}": table for t, table in result.tables().items() if t in kept})
        return found


@dataclass
class ModelReport:
    """All sections computed for one model."""

    model_name: str
    info: dict[str, Any]
    sections: list[Section]
    headline: dict[str, Any]


def analyse_model(model: PositionModel, settings: ReportSettings, progress: bool = True) -> ModelReport:
    """Run every analysis that applies to ``model`` and collect their tables and figures."""
    import posprobe.data as data

    tokens = data.text_windows(model, n=settings.n, seq_len=min(settings.seq_len, model.info.n_ctx), seed=settings.seed)
    twin = functools.cache(lambda: model.random_init_copy(settings.seed)) if settings.controls else None
    stages: list[tuple[str, Callable[[], Section]]] = [
        ("model card", lambda: _model_card(model, tokens)),
        ("position probes", lambda: _probes(model, tokens, settings)),
    ]
    if model.info.is_rotary:
        stages.append(("RoPE frequencies", lambda: _rope(model, tokens, twin)))
    if "pos_embed" in model.available_sites():
        stages.append(("position table", lambda: _position_table(model, settings)))
    stages.append(("positional neurons", lambda: _neurons(model, tokens, twin)))
    stages.append(("attention", lambda: _attention(model, tokens, twin)))
    if "pattern" in model.available_sites() and _sink_seq_len(model, settings) > SINK_SHIFT:
        stages.append(("attention sinks", lambda: _sinks(model, settings, twin)))
    stages.append(("shift invariance", lambda: _shift(model, tokens)))
    sections = []
    bar = tqdm(stages, desc=f"report {model.info.name}", unit="stage", disable=not progress)
    for name, stage in bar:
        bar.set_postfix_str(name)
        started = time.perf_counter()
        sections.append(stage())
        log.info("%s: %s took %.1f s", model.info.name, name, time.perf_counter() - started)
    headline = {s.key: s.summary for s in sections}
    return ModelReport(model.info.name, model.info.as_dict(), sections, headline)


# -- sections ------------------------------------------------------------------------------------


def _model_card(model: PositionModel, tokens) -> Section:
    info = model.info
    rows = [
        ("architecture", info.architecture),
        ("position scheme", info.position_scheme),
        ("layers / heads / kv-heads", f"{info.n_layers} / {info.n_heads} / {info.n_kv_heads}"),
        ("d_model / d_head / d_mlp", f"{info.d_model} / {info.d_head} / {info.d_mlp}"),
        ("context", info.n_ctx),
        ("causal", info.causal),
    ]
    if info.parallel_residual:
        rows.append(("block", "attention and MLP in parallel (no resid_mid)"))
    if info.alibi_slopes:
        rows.append(("ALiBi slopes per head", ", ".join(f"{m:.4g}" for m in info.alibi_slopes)))
    if info.position_offset:
        rows.append(("position table offset", info.position_offset))
    for name, value in (("attention soft-cap", info.attn_softcap), ("final logit soft-cap", info.final_softcap)):
        if value:
            rows.append((name, value))
    if info.is_rotary:
        rows.append(("RoPE pairing", info.rope_pairing))
        freqs = [f or () for f in info.rope_inv_freq] if info.rope_inv_freq else [()] * info.n_layers
        bases = pd.DataFrame(
            {
                "layer": range(info.n_layers),
                "layer_type": info.layer_types or ["full_attention"] * info.n_layers,
                "rope_type": info.rope_types or [None] * info.n_layers,
                "rope_base": info.rope_bases,
                "rotary_dims": info.rotary_dims,
                "attention_scaling": info.rope_attention_scaling or [None] * info.n_layers,
                "fastest_theta": [max(f, default=None) for f in freqs],
                "slowest_theta": [min((t for t in f if t > 0), default=None) for f in freqs],
                "sliding_window": info.sliding_windows or [None] * info.n_layers,
            }
        )
    else:
        bases = pd.DataFrame({"layer": range(info.n_layers)})
    rows.append(("BOS prepended in this run", tokens.prepend_bos))
    card = pd.DataFrame(rows, columns=["property", "value"]).astype({"value": str})
    summary = info.summary()
    return Section("model", "Model card", summary, tables={"model_card": card, "layers": bases})


def _probes(model: PositionModel, tokens, settings: ReportSettings) -> Section:
    from posprobe.stats.probes import probe_model

    with tempfile.TemporaryDirectory(prefix="posprobe-report-") as tmp:
        result = probe_model(model, tokens, site="resid_post", seed=settings.seed, out=tmp)
    table = result.table
    summary = probe_headline(table)
    figure = result.figure("r2")
    clipped = sorted(table.loc[table["r2"] < R2_FLOOR, "layer"].dropna().astype(int).unique().tolist())
    if clipped:  # one diverging layer would squash every other curve against the axis
        figure.update_yaxes(range=[R2_FLOOR - 0.05, 1.05])
        summary += f"; R² below {R2_FLOOR:g} (worse than predicting the mean) clipped in the figure at layers {clipped}"
    return Section(
        "probes",
        "Where can position be read out? (linear probes, Haviv et al. 2022)",
        summary,
        figures=[figure],
        results={"probes": (result, ("table",))},
    )


#: the probe figure's R² axis stops here; the table keeps every value
R2_FLOOR = -1.0


# -- analyses beside their random-init twin (the report's sections and the CLI's commands) -----------

#: a model's random-init twin, made when first asked for (None: no twin control)
Twin = Callable[[], PositionModel] | None


def rope_roles(model: PositionModel, tokens: Any, twin: Twin, progress: bool = False) -> tuple[Any, str]:
    """RoPE frequency usage of ``model`` and its headline: head roles counted beside the twin's."""
    from posprobe.stats.rope import rope_frequency_usage

    usage = rope_frequency_usage(model, tokens, progress=progress)
    twin_roles = rope_frequency_usage(twin(), tokens, progress=progress).head_roles if twin is not None else None
    summary = roles_headline(usage.head_roles, twin_roles, ROPE_ROLES, fallback=ROPE_ROLES[-1])
    return usage, summary.replace("head roles", "head roles from frequency use", 1)


def neuron_positions(model: PositionModel, tokens: Any, twin: Twin, progress: bool = False) -> tuple[Any, str]:
    """Positional neurons of ``model`` and their headline: counted beside the twin's."""
    from posprobe.stats.neurons import positional_neurons

    result = positional_neurons(model, tokens, progress=progress)
    twin_table = positional_neurons(twin(), tokens, progress=progress).table if twin is not None else None
    return result, neurons_headline(result.table, twin_table)


def attention_roles(model: PositionModel, tokens: Any, twin: Twin, progress: bool = False) -> tuple[Any, str]:
    """Attention statistics of ``model`` and their headline: head roles counted beside the twin's."""
    from posprobe.stats.attention import attention_stats

    stats = attention_stats(model, tokens, progress=progress)
    twin_roles = attention_stats(twin(), tokens, progress=progress).roles if twin is not None else None
    return stats, roles_headline(stats.roles, twin_roles, ROLES, fallback=ROLES[-1])


def _rope(model: PositionModel, tokens, twin: Twin) -> Section:
    few = tokens[: min(len(tokens), 8)]
    usage, summary = rope_roles(model, few, twin)
    return Section(
        "rope",
        "Which rotation frequencies does each head use? (Barbero et al. 2024)",
        summary,
        figures=[usage.figure(), usage.figure("spectrum")],
        results={"rope": (usage, ("table", "head_roles"))},
    )


def _position_table(model: PositionModel, settings: ReportSettings) -> Section:
    from posprobe.stats.position_table import FIGURE_KINDS, position_embedding_geometry

    geometry = position_embedding_geometry(model, seed=settings.seed)
    head = geometry.summary
    explained = ", ".join(f"{v:.0%}" for v in head["explained_variance_pc1_3"])
    periods = ", ".join(f"{v:g}" for v in head["period_pc1_3"])
    summary = (
        f"W_pos [{head['shape'][0]} × {head['shape'][1]}]: PC1–3 explain {explained} of its variance, with "
        f"dominant periods {periods} positions; the PC1–PC2 angle turns with period {head['pc12_turn_period']:.1f} "
        f"(linear fit R² {head['pc12_angle_linear_r2']:.2f}; near 1 for a helix); neighbouring rows have cosine "
        f"similarity {head['neighbour_cos_d1']:.2f}"
    )
    if "random_init_neighbour_cos_d1" in head:
        summary += f" ({head['random_init_neighbour_cos_d1']:.2f} at random init)"
    return Section(
        "positions",
        "The absolute position table: helix, periods, smoothness (learned / sinusoidal positions)",
        summary,
        figures=[geometry.figure(kind) for kind in FIGURE_KINDS],
        results={"w_pos": (geometry, ("table", "neighbours", "coords"))},
    )


def _neurons(model: PositionModel, tokens, twin: Twin) -> Section:
    result, summary = neuron_positions(model, tokens, twin)
    positional = result.table[result.table["is_positional"]]
    figures = [result.figure("counts")]
    if len(positional):
        figures.append(result.figure("heatmap", top=20))
    return Section(
        "neurons",
        "Positional neurons (Voita et al. 2023)",
        summary,
        figures=figures,
        results={"neurons": (result, ("table", "layer_summary"))},
    )


def _attention(model: PositionModel, tokens, twin: Twin) -> Section:
    from posprobe.stats.similarity import embedding_similarity
    from posprobe.stats.variance import attention_variance

    stats, summary = attention_roles(model, tokens, twin)
    variance = attention_variance(model, tokens)
    similarity = embedding_similarity(model, tokens)
    exps = variance.exponents
    if "exponent" in exps:
        summary += f"; attention-output variance ∝ position^-a with median a = {exps['exponent'].median():.2f}"
    if stats.notes:  # a bidirectional model: say which statistics assume causal attention
        summary += " (bidirectional model: " + "; ".join(stats.notes) + ")"
    return Section(
        "attention",
        "Attention: sinks, head roles, variance and similarity (Chi 2023, Zuo 2025)",
        summary,
        figures=[stats.figure(), variance.figure(), similarity.figure()],
        results={
            "attention": (stats, ("table", "roles")),
            "variance": (variance, ("table", "exponents")),
            "similarity": (similarity, ("table", "summary")),
        },
    )


#: the fillers the report's sink section moves the first token behind (``attention_sinks``' first_k)
SINK_SHIFT = 4


def sink_rates(model: PositionModel, twin: Twin, progress: bool = False, **settings: Any) -> tuple[Any, str]:
    """Gu et al.'s attention-sink rates of ``model`` (``attention_sinks`` with ``settings``) and their headline,
    beside the random-init twin's."""
    from posprobe.stats.sinks import attention_sinks

    result = attention_sinks(model, progress=progress, **settings)
    twin_result = attention_sinks(twin(), progress=progress, **settings) if twin is not None else None
    return result, sinks_headline(result, twin_result)


def sinks_headline(result: Any, twin: Any = None) -> str:
    """Sink^ε_0 per input kind and BOS choice, the twin's largest, the massive-activation peak and the moved test."""
    eps = result.info.params["epsilon"]
    rates = result.summary[result.summary["k"] == 0]
    parts = []
    for kind, part in rates.groupby("input", sort=False):
        said = [f"{rate:.0f}%" if pd.notna(rate) else "n/a" for rate in part["sink_rate"]]
        labels = ["with BOS" if bos else "without" for bos in part["bos"]]
        parts.append(f"{kind} " + " / ".join(f"{r} {label}" for r, label in zip(said, labels, strict=True)))
    text = f"Sink^{eps:g}_0 (heads whose mean attention on the first token exceeds {eps:g}; Gu et al. 2025): "
    text += "; ".join(parts)
    if twin is not None:
        twin_rates = twin.summary.loc[twin.summary["k"] == 0, "sink_rate"]
        text += f"; random-init twin at most {twin_rates.max():.0f}%" if twin_rates.notna().any() else ""
    massive = result.massive.dropna(subset=["ratio_mean"])
    if len(massive):
        top = massive.loc[massive["ratio_mean"].idxmax()]
        text += (
            f"; the first token's residual norm reaches {top['ratio_mean']:.3g}× the median token's "
            f"(layer {int(top['layer'])}, {top['input']} {'with' if top['bos'] else 'without'} BOS)"
        )
    moved = result.moved
    sinks = int(moved["n_sink_heads"].sum())
    if sinks:
        follows, stays = int(moved["n_follows_token"].sum()), int(moved["n_stays_at_start"].sum())
        shift = result.info.params["first_k"]
        text += (
            f"; first token moved to position {shift}: {follows / sinks:.0%} of {sinks} sink heads follow it, "
            f"{stays / sinks:.0%} stay on the {shift} filler tokens before it"
        )
    if result.info.notes:  # a bidirectional model, a model without BOS
        text += " (" + "; ".join(result.info.notes) + ")"
    return text


def _sink_seq_len(model: PositionModel, settings: ReportSettings) -> int:
    """Gu et al.'s T = 64, within the report's windows and the model's context."""
    return min(64, settings.seq_len, model.info.n_ctx)


def _sinks(model: PositionModel, settings: ReportSettings, twin: Twin) -> Section:
    n = 4 if settings.quick else min(settings.n, 16)
    result, summary = sink_rates(
        model, twin, n=n, seq_len=_sink_seq_len(model, settings), seed=settings.seed, first_k=SINK_SHIFT
    )
    return Section(
        "sinks",
        "Attention sinks on natural, random and repeated tokens, with and without BOS (Gu et al. 2025)",
        summary,
        figures=[result.figure(), result.figure("moved"), result.figure("massive")],
        results={"sinks": (result, ("summary", "by_layer", "massive", "moved"))},
    )


def _first_columns(batch: Any, keep: int) -> Any:
    """The first ``keep`` token columns of a TokenBatch (the report's windows are unpadded)."""
    from posprobe.data import TokenBatch

    str_tokens = [row[:keep] for row in batch.str_tokens] if batch.str_tokens is not None else None
    return TokenBatch(batch.tokens[:, :keep], batch.attention_mask[:, :keep], batch.prepend_bos, batch.source,
                      str_tokens, dict(batch.meta))  # fmt: skip


def _shift(model: PositionModel, tokens) -> Section:
    from posprobe.stats.patching import shift_invariance

    tokens = tokens[: min(len(tokens), 4)]
    shifts: tuple[int, ...] = (1, 8, 64)
    if not model.extrapolates and tokens.shape[1] + max(shifts) > model.info.n_ctx:
        # sequences that fill a learned table leave no room to shift: shorten them to make that room
        keep = model.info.n_ctx - max(shifts)
        if keep < 16:
            shifts, keep = tuple(k for k in shifts if model.info.n_ctx - k >= 16), model.info.n_ctx - 1
        tokens = _first_columns(tokens, min(keep, tokens.shape[1]))
    result = shift_invariance(model, tokens, shifts=shifts)
    summary = shift_headline(result.table)
    return Section(
        "shift",
        "Relative or absolute? Shifting every position",
        summary,
        results={"shift_invariance": (result, ("table",))},
    )


# -- assembling the page -------------------------------------------------------------------------


def build_report(
    model: str | PositionModel = "smollm2-135m",
    out: str | Path = "report",
    *,
    quick: bool = False,
    compare: str | PositionModel | None = None,
    settings: ReportSettings | None = None,
    progress: bool = True,
) -> Path:
    """Analyse ``model`` (and ``compare`` side by side) and write ``out/index.html``; returns its path."""
    from posprobe.extraction import versions

    settings = settings or ReportSettings.make(quick=quick)
    out = Path(out)
    started = time.perf_counter()
    reports = []
    for m in [model] + ([compare] if compare is not None else []):
        loaded = load_model(m, device=settings.device) if not isinstance(m, PositionModel) else m
        torch.manual_seed(settings.seed)
        reports.append(analyse_model(loaded, settings, progress=progress))
    meta = {
        "settings": asdict(settings),
        "versions": versions(),  # the same record a store and the CLI keep
        "machine": platform.platform(),
        "seconds": round(time.perf_counter() - started, 1),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no empty folder
    _write_tables(reports, out)
    (out / "summary.json").write_text(
        json.dumps({"meta": meta, "models": {r.model_name: r.headline for r in reports}}, indent=1, default=str)
    )
    page = out / "index.html"
    page.write_text(_html(reports, meta))
    return page


def _write_tables(reports: list[ModelReport], out: Path) -> None:
    tables = out / "tables"
    tables.mkdir(exist_ok=True)
    for report in reports:
        for section in report.sections:
            for name, table in section.tables.items():  # the model card: no analysis behind it
                table.to_csv(tables / _table_file(report, name, "csv"), index=False)
                table.to_parquet(tables / _table_file(report, name, "parquet"), index=False)
            for name, (result, kept) in section.results.items():
                result.save(tables, prefix=_table_file(report, name, ""), tables=kept, figures=())


def _table_file(report: ModelReport, name: str, ext: str) -> str:
    return f"{report.model_name.replace('/', '_').replace(':', '_')}.{name}.{ext}"


STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;padding:1.5em 2em;max-width:1500px;
     color:#222;line-height:1.4}
h1{margin:0 0 .3em;font-size:1.7em} h2{margin:1.6em 0 .4em;padding-bottom:.2em;border-bottom:1px solid #ddd}
h3{margin:.6em 0 .3em;font-size:1.05em;color:#444}
.settings{color:#555;font-size:.88em;margin:.2em 0} nav{margin:.8em 0;font-size:.92em}
nav a{margin-right:1.2em;color:#2a5599;text-decoration:none} nav a:hover{text-decoration:underline}
.row{display:grid;gap:1.5em;align-items:start} .col{min-width:0}
.figure{margin:.8em 0;border:1px solid #eee;border-radius:4px}
table{border-collapse:collapse;font-size:.85em;margin:.4em 0}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
th{background:#f4f6fa} .summary{background:#f4f6fa;padding:.5em 1em;border-left:4px solid #4a6fa5;margin:.4em 0}
details{margin:.4em 0} summary{cursor:pointer;color:#2a5599} .files{font-size:.85em;color:#555}
.files a{color:#2a5599;margin-right:.8em}
"""

#: figures without an explicit height get this one (a percentage would collapse inside the flex layout)
FIGURE_HEIGHT = "480px"
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


def _html(reports: list[ModelReport], meta: dict[str, Any]) -> str:
    from plotly.offline import get_plotlyjs

    names = " vs ".join(html.escape(r.model_name) for r in reports)
    settings = meta["settings"]
    versions = " · ".join(f"{k} {html.escape(str(v))}" for k, v in meta["versions"].items())
    keys = list(dict.fromkeys(s.key for r in reports for s in r.sections))
    titles = {s.key: s.title for r in reports for s in r.sections}
    nav = "".join(f"<a href='#{key}'>{html.escape(_short_title(titles[key]))}</a>" for key in keys)
    head = (
        f"<h1>Where does position live in {names}?</h1>"
        f"<p class='settings'>{settings['n']} windows × {settings['seq_len']} tokens of held-out State of the Union "
        f"text · seed {settings['seed']} · device {html.escape(str(settings['device']))}"
        f"{' · quick run' if settings.get('quick') else ''} · {meta['seconds']} s · {html.escape(meta['created'])}</p>"
        f"<p class='settings'>{versions} · every table: <code>tables/</code> (CSV and Parquet) · headline numbers: "
        "<code>summary.json</code></p>"
        f"<nav>{nav}</nav>"
    )
    body = [_section_html(key, titles[key], reports) for key in keys]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>posprobe report: {names}</title>"
        f"<style>{STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        + head
        + "".join(body)
        + "</body></html>"
    )


def _short_title(title: str) -> str:
    return title.split(" (")[0].split("?")[0]


def _section_html(key: str, title: str, reports: list[ModelReport]) -> str:
    cols = []
    for report in reports:
        section = next((s for s in report.sections if s.key == key), None)
        name = html.escape(report.model_name)
        parts = [f"<h3>{name}</h3>"] if len(reports) > 1 else []
        if section is None:
            cols.append("<div class='col'>" + "".join(parts) + f"<p>not applicable to {name}</p></div>")
            continue
        parts.append(f"<p class='summary'>{html.escape(section.summary)}</p>")
        parts += [
            "<div class='figure'>"
            + f.to_html(full_html=False, include_plotlyjs=False, default_height=FIGURE_HEIGHT, config=PLOTLY_CONFIG)
            + "</div>"
            for f in section.figures
        ]
        tables = list(section.all_tables().items())
        if key == "model" or not section.figures:
            first, *rest = tables
            parts.append(first[1].to_html(index=False, border=0))
            parts += [
                f"<details><summary>{html.escape(n)} ({len(t)} rows)</summary>{t.to_html(index=False, border=0)}"
                "</details>"
                for n, t in rest
            ]
        links = " ".join(
            f"<a href='tables/{html.escape(_table_file(report, n, 'csv'))}'>{html.escape(n)}.csv</a>" for n, _ in tables
        )
        parts.append(f"<p class='files'>tables: {links}</p>")
        cols.append("<div class='col'>" + "".join(parts) + "</div>")
    # fixed column tracks: each figure is drawn while the page loads, before the columns after it exist
    grid = f"grid-template-columns:repeat({len(reports)},minmax(0,1fr))"
    row = f"<div class='row' style='{grid}'>{''.join(cols)}</div>"
    return f"<section id='{key}'><h2>{html.escape(title)}</h2>{row}</section>"
