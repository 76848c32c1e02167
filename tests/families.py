"""Every Hugging Face family posprobe supports, as a tiny random-weight model built from transformers' own config.

Add a family by adding one line to ``FAMILIES``: name → (config class name, config keyword arguments).
Each model has 3 layers, d_model 64 and the vocabulary of ``conftest.tiny_tokenizer`` (ids 0 = <bos>, 1 = <pad>).
"""

from __future__ import annotations

import torch

V = dict(vocab_size=256, bos_token_id=0, pad_token_id=1, eos_token_id=0)
HF = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128, **V)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip

FAMILIES: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=3, n_head=4, n_positions=128, **V)),
    "gpt_neox": ("GPTNeoXConfig", dict(HF, intermediate_size=128, rotary_pct=0.25)),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=3, n_head=4, n_positions=128, rotary_dim=8, **V)),
    "opt": ("OPTConfig", dict(HF, ffn_dim=128, word_embed_proj_dim=64)),
    "phi": ("PhiConfig", dict(HF, intermediate_size=128, partial_rotary_factor=0.4)),
    "phi3": ("Phi3Config", dict(HF, num_key_value_heads=2, intermediate_size=128)),
    "qwen2": ("Qwen2Config", dict(HF, num_key_value_heads=2, intermediate_size=128)),
    "qwen3": ("Qwen3Config", dict(HF, num_key_value_heads=2, head_dim=16, intermediate_size=128)),
    "llama3": ("LlamaConfig", dict(HF, num_key_value_heads=2, intermediate_size=128, rope_parameters=LLAMA3)),
    "mistral": ("MistralConfig", dict(HF, num_key_value_heads=2, intermediate_size=128, sliding_window=6)),
    "gemma2": ("Gemma2Config", dict(HF, num_key_value_heads=2, head_dim=16, intermediate_size=128, sliding_window=6)),
    "gemma3": ("Gemma3TextConfig", dict(HF, num_key_value_heads=1, head_dim=32, intermediate_size=96, sliding_window=6,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "olmo2": ("Olmo2Config", dict(HF, num_key_value_heads=2, intermediate_size=128)),
    "stablelm": ("StableLmConfig", dict(HF, num_key_value_heads=2, intermediate_size=128)),
    "falcon": ("FalconConfig", dict(HF, new_decoder_architecture=False, multi_query=True)),
    "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=3, n_head=4, **V)),
    "mpt": ("MptConfig", dict(d_model=64, n_layers=3, n_heads=4, max_seq_len=128, **V)),
    "bert": ("BertConfig", dict(HF, intermediate_size=128, pad_token_id=1)),
    "roberta": ("RobertaConfig", dict(HF | {"max_position_embeddings": 130}, intermediate_size=128)),
}  # fmt: skip

ENCODERS = ("bert", "roberta")
ROTARY = ("gpt_neox", "gptj", "phi", "phi3", "qwen2", "qwen3", "llama3", "mistral", "gemma2", "gemma3", "olmo2",
          "stablelm", "falcon")  # fmt: skip
ALIBI = ("bloom", "mpt")
LEARNED = ("gpt2", "opt", "bert", "roberta")


def build(family: str, seed: int = 0, **kwargs):
    """The tiny random-weight transformers model of ``family`` (eval mode, float32); the same seed, the same weights.

    Keyword arguments go to ``from_config`` (e.g. ``attn_implementation="eager"``).
    """
    import transformers

    class_name, config_kwargs = FAMILIES[family]
    config = getattr(transformers, class_name)(**config_kwargs)
    torch.manual_seed(seed)
    if family in ENCODERS:
        return transformers.AutoModel.from_config(config, add_pooling_layer=False, **kwargs).eval()
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs).eval()
