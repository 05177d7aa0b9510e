"""Tiny randomly initialised models of each supported architecture, built in the test (fast)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 300
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Le patient présente une fièvre et une toux depuis trois jours.",
    "def add(a, b):\n    return a + b",
    "The court held that the contract was void for lack of consideration.",
    "Interest rates rose as inflation stayed above the central bank's target.",
] * 20


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


COMMON = dict(
    vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(**COMMON, tie_word_embeddings=True)
    if family == "qwen2":
        return Qwen2Config(**COMMON, tie_word_embeddings=False)
    if family == "gemma3":
        return Gemma3TextConfig(
            **COMMON, sliding_window=32, layer_types=["sliding_attention", "sliding_attention",
                                                      "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16,
        )
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()
    with torch.no_grad():  # random biases so Qwen2's q/k/v bias slicing is exercised
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.02)
    return model, tiny_tokenizer()


FAMILIES = ["llama", "qwen2", "gemma3"]


# Mistral, Qwen3 and Gemma2: claimed in the README, exercised end to end in test_architectures.py.
def tiny_config_more(family: str):
    from transformers import Gemma2Config, MistralConfig, Qwen3Config

    if family == "mistral":
        return MistralConfig(**COMMON, sliding_window=None, tie_word_embeddings=False)
    if family == "qwen3":
        return Qwen3Config(**COMMON, tie_word_embeddings=True)
    if family == "gemma2":
        return Gemma2Config(**COMMON, sliding_window=32, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                            final_logit_softcapping=30.0,
                            layer_types=["sliding_attention", "full_attention"] * 2)
    raise ValueError(family)


def tiny_model_more(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config_more(family), dtype=torch.float32).eval()
    return model, tiny_tokenizer()


MORE_FAMILIES = ["mistral", "qwen3", "gemma2"]
