"""Models posprobe has no native map for, hooked through a TransformerLens ``TransformerBridge``.

TransformerLens 4's bridge has an architecture adapter for ~140 Hugging Face architectures and
exposes the same hook names posprobe's sites are named after (``blocks.{L}.hook_resid_post``,
``blocks.{L}.attn.hook_rot_q``, …). When ``discover_layout`` cannot map a model (a mixture of
experts, whose MLP is no single linear map; a family it does not recognise) and TransformerLens
knows the architecture, ``load_model`` falls back to this backend with a one-line warning. It is
slower than the native one: the bridge runs every layer's attention eagerly and keeps its own hook
points on every module.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from posprobe.models.architecture import UnsupportedModelError, find_layers, text_config
from posprobe.models.base import Hook, ModelInfo, PositionModel
from posprobe.sites import LAYERLESS_SITES, SITES, SiteKey

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class BridgeFallbackWarning(UserWarning):
    """posprobe is hooking a model through TransformerLens' bridge because it has no native map for it."""


def boot_bridge(hf: nn.Module, tokenizer: Any, name: str | None = None, why: str = "") -> Any:
    """A TransformerBridge around ``hf`` (offline: the tokenizer is handed over through a local copy).

    Raises an ``UnsupportedModelError`` that names the architecture when TransformerLens has no adapter for it.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    cfg = text_config(hf.config)
    architecture = (getattr(hf.config, "architectures", None) or [type(hf).__name__])[0]
    cast("PreTrainedModel", hf).config.architectures = [architecture]
    with tempfile.TemporaryDirectory(prefix="posprobe-tokenizer-") as folder:
        # TransformerLens reloads the tokenizer from its name_or_path: give it one that exists offline
        tokenizer.save_pretrained(folder)
        local = AutoTokenizer.from_pretrained(folder)
        try:
            return TransformerBridge.boot_transformers(name or architecture, hf_model=hf, tokenizer=local)
        except ValueError as err:
            if "nsupported architecture" not in str(err) and "Could not determine supported architecture" not in str(
                err
            ):
                raise
            raise UnsupportedModelError(
                cfg.model_type,
                f"{why + '; ' if why else ''}TransformerLens has no adapter for {architecture}",
                bridge_tried=True,
            ) from err


def unbridged(bridge: Any) -> nn.Module:
    """The bridge's Hugging Face model as transformers built it, sharing the bridge's tensors (nothing is copied).

    Booting a bridge replaces the model's submodules by TransformerLens components that keep the
    originals as ``_original_component``; posprobe hooks transformers' own modules, so it rebuilds
    the model's module tree on the meta device and puts the very same parameters and buffers back in.
    """
    import copy

    wrapped = bridge.original_model
    tensors: dict[str, Tensor] = {}
    for inner in (True, False):  # the original components' tensors first, then any the bridge holds itself
        for name, t in [
            *wrapped.named_parameters(remove_duplicate=False),
            *wrapped.named_buffers(remove_duplicate=False),
        ]:
            if ("_original_component" in name) == inner:
                tensors.setdefault(name.replace("._original_component", "").replace("_original_component.", ""), t)
    with torch.device("meta"):
        fresh = type(wrapped)(copy.deepcopy(wrapped.config))
    for name, _ in [*fresh.named_parameters(remove_duplicate=False), *fresh.named_buffers(remove_duplicate=False)]:
        if name not in tensors:
            raise UnsupportedModelError(text_config(wrapped.config).model_type, f"the bridge holds no tensor {name!r}")
        owner, _, leaf = name.rpartition(".")
        module = fresh.get_submodule(owner)
        table = module._parameters if leaf in module._parameters else module._buffers
        table[leaf] = tensors[name]
    return fresh.eval()


class BridgeModel(PositionModel):
    """A Hugging Face model hooked through TransformerLens' bridge: posprobe's sites are its hook points."""

    def __init__(self, bridge: Any, tokenizer: Any, name: str | None = None, source: str = "transformer-lens"):
        self.bridge = bridge.eval()
        self.hf = bridge.original_model
        self.tokenizer = tokenizer
        self.source = source
        self.info = bridge_info(bridge, tokenizer, name or bridge.cfg.model_name)
        self._hook_names = set(bridge.hook_dict)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> BridgeModel:
        self.hf.to(device=device, dtype=dtype)
        return self

    @property
    def mixture_of_experts(self) -> bool:
        return "blocks.0.mlp.hook_expert_indices" in self._hook_names

    def available_sites(self) -> tuple[str, ...]:
        """The sites whose TransformerLens hook point the bridge has (no mlp_post in a mixture of experts)."""
        sites = [s for s in super().available_sites() if _hook_name(s) in self._hook_names]
        return tuple(s for s in sites if not (s == "mlp_post" and self.mixture_of_experts))

    def check_site(self, site: str) -> str:
        if site in SITES and site not in self.available_sites():
            why = (
                "its MLP is a mixture of experts, with one hidden layer per expert"
                if site == "mlp_post" and self.mixture_of_experts
                else f"TransformerLens' bridge for {self.info.architecture} has no hook point {_hook_name(site)!r}"
            )
            raise ValueError(
                f"site {site!r} is not available in {self.info.name}: {why}; available sites: "
                f"{', '.join(self.available_sites())}"
            )
        return super().check_site(site)

    def random_init_copy(self, seed: int = 0) -> BridgeModel:
        from posprobe.models.hf import fresh_like

        fresh = fresh_like(self.hf, seed)
        name = f"{self.info.name}[random-init seed={seed}]"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return BridgeModel(boot_bridge(fresh, self.tokenizer, self.info.name), self.tokenizer, name, "random-init")

    def _run(
        self,
        tokens: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        hooks: Mapping[SiteKey, Hook],
        return_logits: bool,
        stop_at_layer: int | None,
    ) -> Tensor | None:
        from posprobe.models.hf import _apply

        def tl_hook(inner: Hook):
            return lambda x, hook: _apply(inner, x)

        fwd_hooks = [(key.hook_name, tl_hook(hook)) for key, hook in hooks.items()]
        stop = (
            None
            if return_logits or stop_at_layer is None or stop_at_layer + 1 >= self.info.n_layers
            else stop_at_layer + 1
        )
        out = self.bridge.run_with_hooks(
            tokens,
            fwd_hooks=fwd_hooks,
            return_type="logits" if return_logits else None,
            stop_at_layer=stop,
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        return out if return_logits else None


def _hook_name(site: str) -> str:
    return SiteKey(site, None if site in LAYERLESS_SITES else 0).hook_name


def bridge_info(bridge: Any, tokenizer: Any, name: str) -> ModelInfo:
    """ModelInfo of a bridged model: sizes from the bridge's config, position facts from the HF modules."""
    from posprobe.models.facts import act_fn_name, bos_facts, context_length, position_facts

    hf = bridge.original_model
    cfg, tl = text_config(hf.config), bridge.cfg
    layers = find_layers(hf, cfg.num_hidden_layers)
    if layers is None:
        raise UnsupportedModelError(cfg.model_type, "no list of blocks for posprobe to read position facts from")
    facts = position_facts(hf, layers, None)
    if tl.positional_embedding_type == "standard" and facts["position_scheme"] == "none":
        facts["position_scheme"] = "learned"
    return ModelInfo(
        name=name,
        architecture=(getattr(hf.config, "architectures", None) or [type(hf).__name__])[0],
        n_layers=tl.n_layers,
        n_heads=tl.n_heads,
        n_kv_heads=getattr(tl, "n_key_value_heads", None) or tl.n_heads,
        d_model=tl.d_model,
        d_head=tl.d_head,
        d_mlp=getattr(tl, "d_mlp", None) or 4 * tl.d_model,
        n_ctx=context_length(cfg, tokenizer),
        d_vocab=hf.get_input_embeddings().weight.shape[0],
        act_fn=act_fn_name(cfg),
        **bos_facts(tokenizer),
        **facts,
        extra={"model_type": cfg.model_type, "attention": "transformer-lens bridge"},
    )
