"""Shared fixtures: tiny random-weight models built from the real configs of each architecture."""

from __future__ import annotations

import os

import pytest
import torch

from posprobe.models.zoo import ZooModel

torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 256


def tiny_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer over 't0'…'t{vocab-3}' plus <bos> (0) and <pad> (1), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<bos>": 0, "<pad>": 1, **{f"t{i}": i + 2 for i in range(vocab - 2)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>")


def _seeded(build, seed: int = 0):
    torch.manual_seed(seed)
    return build().eval()


def tiny_llama_hf(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        intermediate_size=96,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=0,
        pad_token_id=1,
    )
    cfg.update(overrides)
    return _seeded(lambda: LlamaForCausalLM(LlamaConfig(**cfg)))


def tiny_gemma3_hf():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        num_hidden_layers=3,
        intermediate_size=96,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        bos_token_id=0,
        pad_token_id=1,
    )
    return _seeded(lambda: Gemma3ForCausalLM(cfg))


def tiny_bert_hf():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=96,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return _seeded(lambda: BertModel(cfg, add_pooling_layer=False))


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tiny_llama(tokenizer):
    from posprobe.models.hf import HFModel

    return HFModel(tiny_llama_hf(), tokenizer, name="tiny-llama")


@pytest.fixture
def tiny_gemma3(tokenizer):
    from posprobe.models.hf import HFModel

    return HFModel(tiny_gemma3_hf(), tokenizer, name="tiny-gemma3")


@pytest.fixture
def tiny_bert(tokenizer):
    from posprobe.models.hf import HFModel

    return HFModel(tiny_bert_hf(), tokenizer, name="tiny-bert")


@pytest.fixture(scope="session")
def smollm2():
    import posprobe as pp

    return pp.load_model("smollm2-135m")


def assert_logits_unchanged(hooked: torch.Tensor, plain: torch.Tensor, same_kernel: bool) -> None:
    """Capturing must not change logits: bit for bit when the same attention kernel ran, else within float32 rounding.

    A run that switches a layer from the fused SDPA kernel to the explicit softmax(q·k)·v path (to read its
    attention weights) sums in another order; its error scales with the logits, so the bound is
    1e-4 × max|logit|, never a bare absolute tolerance that one CPU meets and another does not.
    """
    if same_kernel:
        assert torch.equal(hooked, plain), f"logits changed by {(hooked - plain).abs().max():.3g}"
        return
    bound = 1e-4 * plain.abs().max().item()
    diff = (hooked - plain).abs().max().item()
    assert diff <= bound, f"logits changed by {diff:.3g} > 1e-4 × max|logit| = {bound:.3g}"


def random_ids(n: int, s: int, seed: int = 0, low: int = 2, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(low, high, (n, s), generator=torch.Generator().manual_seed(seed))


class UnhookedZoo(ZooModel):
    """A zoo backend whose forward ignores hooks, as a model whose attention bypasses posprobe would."""

    def _run(self, tokens, attention_mask, position_ids, hooks, return_logits, stop_at_layer):
        return super()._run(tokens, attention_mask, position_ids, {}, return_logits, stop_at_layer)


class ZooWithoutPattern(ZooModel):
    """A zoo backend that does not offer the attention-map sites."""

    def available_sites(self):
        return tuple(s for s in super().available_sites() if s not in ("pattern", "attn_scores"))


def tiny_zoo_checkpoint(folder, pe: str, state: dict):
    """A 1-layer zoo checkpoint of scheme ``pe`` written into ``folder`` with ``state`` as its train_state.json."""
    import json

    from safetensors.torch import save_file

    from posprobe.models.zoo_net import ZooConfig, ZooTransformer

    folder.mkdir(parents=True)
    net = ZooTransformer(ZooConfig(pe=pe, d_model=32, n_layers=1, n_heads=2, d_head=16, d_mlp=64, n_ctx=32))
    net.cfg.to_json(folder / "config.json")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "train_state.json").write_text(json.dumps(state))
    return net
