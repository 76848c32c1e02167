"""The model interface every backend implements: facts (`ModelInfo`) and one hooked forward (`run`)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from posprobe.finite import FiniteGuard
from posprobe.sites import LAYERLESS_SITES, ROTARY_SITES, SITES, SiteKey, check_site

POSITION_SCHEMES = ("none", "learned", "sinusoidal", "rope", "alibi")

#: A hook receives an activation in its canonical shape (see ``posprobe.sites``) and
#: returns a replacement of the same shape, or None to leave it unchanged.
Hook = Callable[[Tensor], Tensor | None]


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a model's architecture, read from its real config.

    Per-layer lists (``rope_bases``, ``rotary_dims``, ``rope_inv_freq``, ``rope_types``,
    ``rope_attention_scaling``, ``sliding_windows``, ``layer_types``) have one entry per layer;
    ``None`` where the notion does not apply (no RoPE, global layer). ``rope_inv_freq`` holds the
    frequencies the model really rotates with (read from its ``inv_freq`` buffers, so llama3 /
    yarn / linear / dynamic scaling included), ``rope_parameters`` the config's RoPE parameters
    per layer type. ``rope_pairing`` is ``"half"`` when dimension i rotates with i + d_rot/2
    (Hugging Face / NeoX convention) and ``"interleaved"`` when it rotates with i + 1 (GPT-J /
    original RoPE). ``alibi_slopes`` has one slope per head; ``position_offset`` is the row of
    the learned position table that position 0 reads (2 for OPT and RoBERTa); ``attn_softcap`` /
    ``final_softcap`` are Gemma 2's tanh soft-capping of attention and output logits.
    """

    name: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    n_ctx: int
    d_vocab: int
    position_scheme: str
    causal: bool = True
    rope_bases: tuple[float | None, ...] = ()
    rotary_dims: tuple[int | None, ...] = ()
    rope_pairing: str | None = None
    rope_inv_freq: tuple[tuple[float, ...] | None, ...] = ()
    rope_types: tuple[str | None, ...] = ()
    rope_attention_scaling: tuple[float | None, ...] = ()
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    alibi_slopes: tuple[float, ...] = ()
    position_offset: int = 0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    parallel_residual: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    layer_types: tuple[str, ...] = ()
    act_fn: str = ""
    bos_token_id: int | None = None
    prepends_bos: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_rotary(self) -> bool:
        return self.position_scheme == "rope"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line a user can read: scheme, size and RoPE bases."""
        line = (
            f"{self.name}: {self.architecture}, {self.n_layers} layers, {self.n_heads} heads "
            f"({self.n_kv_heads} kv), d_model {self.d_model}, d_head {self.d_head}, "
            f"n_ctx {self.n_ctx}, position scheme {self.position_scheme}"
        )
        if self.is_rotary:
            bases = sorted({b for b in self.rope_bases if b is not None})
            line += f", RoPE bases {bases} ({self.rope_pairing} pairing)"
            types = sorted({t for t in self.rope_types if t and t != "default"})
            if types:
                line += f", RoPE scaling {', '.join(types)}"
            partial = sorted({r for r in self.rotary_dims if r is not None and r < self.d_head})
            if partial:
                line += f", rotary dims {partial} of {self.d_head}"
        if self.alibi_slopes:
            line += f", ALiBi slopes {self.alibi_slopes[0]:.3g}…{self.alibi_slopes[-1]:.3g}"
        if self.position_offset:
            line += f", position table offset {self.position_offset}"
        return line


@dataclass
class RunOutput:
    """What ``PositionModel.run`` returns: logits (or None when skipped) and captured activations."""

    logits: Tensor | None
    acts: dict[SiteKey, Tensor]

    def __getitem__(self, key: SiteKey | str) -> Tensor:
        key = SiteKey.parse(key) if isinstance(key, str) else key
        return self.acts[key]


class PositionModel(ABC):
    """A transformer with named hook sites, whatever library it comes from.

    Subclasses implement ``_run`` with hooks on exactly the requested sites; everything
    users call (``run``, ``capture``, ``loss``, ``hooks``) lives here.
    """

    info: ModelInfo
    tokenizer: Any

    # -- what a backend provides ------------------------------------------------------
    @abstractmethod
    def _run(
        self,
        tokens: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        hooks: Mapping[SiteKey, Hook],
        return_logits: bool,
        stop_at_layer: int | None,
    ) -> Tensor | None:
        """One forward pass calling ``hooks`` on their sites; logits [b s vocab] or None."""

    @abstractmethod
    def random_init_copy(self, seed: int = 0) -> PositionModel:
        """The same architecture with freshly initialised weights: the control every probe needs."""

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @abstractmethod
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> PositionModel:
        """Move the model; returns self."""

    @property
    def device_map(self) -> dict[str, Any] | None:
        """Where each module lives when the model is split across devices (accelerate), else None."""
        return None

    def available_sites(self) -> tuple[str, ...]:
        """The sites this model has (``rot_q`` only for RoPE, ``pos_embed`` only for absolute schemes)."""
        sites = list(SITES)
        if not self.info.is_rotary:
            sites = [s for s in sites if s not in ROTARY_SITES]
        if self.info.position_scheme not in ("learned", "sinusoidal"):
            sites.remove("pos_embed")
        return tuple(sites)

    def check_site(self, site: str) -> str:
        """Validate ``site`` for this model, explaining why a known site is missing here."""
        check_site(site)
        if site in ROTARY_SITES and not self.info.is_rotary:
            raise ValueError(
                f"site {site!r} needs a rotary model, but {self.info.name} uses position scheme "
                f"{self.info.position_scheme!r}; use 'q'/'k' instead"
            )
        if site not in self.available_sites():
            raise ValueError(
                f"site {site!r} does not exist in {self.info.name} (position scheme "
                f"{self.info.position_scheme!r}); available sites: {', '.join(self.available_sites())}"
            )
        return site

    # -- the public forward ----------------------------------------------------------------
    def run(
        self,
        tokens: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        hooks: Mapping[SiteKey, Hook] | None = None,
        capture: Iterable[SiteKey] = (),
        return_logits: bool = True,
        stop_at_layer: int | None = None,
        check_finite: bool = True,
    ) -> RunOutput:
        """Run ``tokens`` [b s] with ``hooks`` applied and ``capture`` sites recorded.

        Position ids default to the count of real tokens before each token
        (``cumsum(attention_mask) - 1``), so left- and right-padded batches give every real
        token the same position as unpadded. Captured tensors are the values after hooks,
        detached, on the model's device. ``stop_at_layer=L`` skips blocks after L and the
        unembedding (logits are then None). Captured tensors and logits are checked for NaN/inf
        (``posprobe.finite``: one synchronisation) unless ``check_finite=False``.
        """
        tokens, attention_mask, position_ids = self.prepare_inputs(tokens, attention_mask, position_ids)
        hooks = dict(hooks or {})
        for key in hooks:
            self._check_key(key)
        acts: dict[SiteKey, Tensor] = {}
        for key in capture:
            self._check_key(key)
            hooks[key] = _compose_capture(hooks.get(key), key, acts)
        if stop_at_layer is not None and not 0 <= stop_at_layer < self.info.n_layers:
            raise ValueError(f"stop_at_layer {stop_at_layer} out of range 0..{self.info.n_layers - 1}")
        with torch.inference_mode():
            logits = self._run(tokens, attention_mask, position_ids, hooks, return_logits, stop_at_layer)
        if check_finite:
            guard = FiniteGuard(where=f"of {self.info.name}")
            for key, x in acts.items():
                guard.add(key.site, key.layer, x)
            if logits is not None:
                guard.add("logits", None, logits)
            guard.check()
        return RunOutput(logits=logits, acts=acts)

    def capture(self, tokens: Tensor, keys: Iterable[SiteKey], **kwargs: Any) -> dict[SiteKey, Tensor]:
        """Shorthand for ``run(tokens, capture=keys, return_logits=False).acts``."""
        keys = list(keys)
        last = max((k.layer for k in keys if k.layer is not None), default=None)
        kwargs.setdefault("stop_at_layer", last)
        return self.run(tokens, capture=keys, return_logits=False, **kwargs).acts

    def loss(
        self, tokens: Tensor, attention_mask: Tensor | None = None, hooks: Mapping[SiteKey, Hook] | None = None
    ) -> Tensor:
        """Per-token next-token loss [b s-1] in nats (NaN where the target is padding)."""
        out = self.run(tokens, attention_mask=attention_mask, hooks=hooks)
        if out.logits is None:
            raise ValueError(f"{self.info.name} has no language-model head, so it has no next-token loss")
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        targets = tokens[:, 1:].to(logp.device)
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if attention_mask is not None:
            valid = attention_mask[:, 1:].bool().to(nll.device) & attention_mask[:, :-1].bool().to(nll.device)
            nll = nll.masked_fill(~valid, float("nan"))
        return nll

    # -- helpers ---------------------------------------------------------------------------
    def prepare_inputs(
        self, tokens: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Validate a token batch and derive the mask and position ids."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.ndim != 2 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty [batch, seq] tensor, got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        if tokens.min() < 0 or tokens.max() >= self.info.d_vocab:
            raise ValueError(f"token ids must lie in [0, {self.info.d_vocab}); got {tokens.min()}..{tokens.max()}")
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        attention_mask = torch.as_tensor(attention_mask).to(tokens.device).long()
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != tokens {tuple(tokens.shape)}")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        position_ids = torch.as_tensor(position_ids).to(tokens.device).long()
        if position_ids.shape != tokens.shape:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != tokens {tuple(tokens.shape)}")
        longest = int(position_ids.max()) + 1
        if longest > self.info.n_ctx and not self.extrapolates:
            raise ValueError(
                f"sequence needs position {longest - 1}, beyond {self.info.name}'s context of {self.info.n_ctx} tokens"
            )
        device = self.device
        return tokens.to(device), attention_mask.to(device), position_ids.to(device)

    @property
    def extrapolates(self) -> bool:
        """Whether positions beyond ``n_ctx`` are computable (rope/alibi/none); pretrained models say no."""
        return False

    def _check_key(self, key: SiteKey) -> None:
        self.check_site(key.site)
        if key.site in LAYERLESS_SITES:
            if key.layer is not None:
                raise ValueError(f"site {key.site!r} has no layers; got layer {key.layer}")
        elif key.layer is None or not 0 <= key.layer < self.info.n_layers:
            raise ValueError(
                f"layer {key.layer} out of range for {key.site!r}; this model has layers 0..{self.info.n_layers - 1}"
            )

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        yield

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.info.summary()}>"


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids [b s]: each real token's index among the real tokens; padding gets 0."""
    mask = attention_mask.long()
    return ((mask.cumsum(-1) - 1) * mask).clamp(min=0)


def _compose_capture(inner: Hook | None, key: SiteKey, acts: dict[SiteKey, Tensor]) -> Hook:
    def hook(x: Tensor) -> Tensor | None:
        out = inner(x) if inner is not None else None
        acts[key] = (x if out is None else out).detach()
        return out

    return hook
