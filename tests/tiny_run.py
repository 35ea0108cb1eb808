"""The smallest model and data the trainer tests run: a one-layer LLaMA over a 64-token vocabulary and
micro-batches of two 8-token sequences, the same for every test that compares two runs."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, pad_token_id=None, use_cache=False))


def micro_batches(count: int) -> list[dict]:
    ids = torch.randint(0, 64, (count, 2, 8), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]
