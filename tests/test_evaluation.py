"""Evaluation: the token-weighted loss and the reference's n/(n+1) estimator, on hand-made batches."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from peft_pretraining.distributed import DistributedContext
from peft_pretraining.evaluation import EvalAccumulator, evaluate

ONE_PROCESS = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def test_accumulator_token_weighted_vs_reference_estimator():
    accumulator = EvalAccumulator(torch.device("cpu"))
    accumulator.add(torch.tensor(2.0), targets=30, tokens=32)
    accumulator.add(torch.tensor(4.0), targets=10, tokens=12)
    result = accumulator.result(ONE_PROCESS)
    assert result.loss == pytest.approx((2.0 * 30 + 4.0 * 10) / 40)
    assert result.perplexity == pytest.approx(math.exp(2.5))
    assert result.loss_reference == pytest.approx((2.0 + 4.0) / (2 + 1))  # biased low by n/(n+1)
    assert result.tokens == 44


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=None, use_cache=False)
    return LlamaForCausalLM(config)


def batch(lengths: list[int], seq_len: int = 8) -> dict:
    generator = torch.Generator().manual_seed(sum(lengths))
    input_ids = torch.randint(1, 50, (len(lengths), seq_len), generator=generator)
    mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": input_ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def per_token_losses(model, batch_: dict) -> torch.Tensor:
    """CE of every real next-token prediction (pads excluded), computed independently of HF's loss."""
    with torch.no_grad():
        logits = model(input_ids=batch_["input_ids"]).logits[:, :-1]
    targets = batch_["input_ids"][:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return losses[batch_["attention_mask"][:, 1:].reshape(-1) == 1]


def test_evaluate_weights_tokens_and_masks_pads():
    model = tiny_model()
    batches = [batch([8, 3]), batch([5, 2, 7])]
    result = evaluate(model, batches, max_tokens=10_000, ctx=ONE_PROCESS)
    losses = [per_token_losses(model, b) for b in batches]
    assert result.loss == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5)
    batch_means = [batch_losses.mean().item() for batch_losses in losses]
    assert result.loss_reference == pytest.approx(sum(batch_means) / (len(batches) + 1), rel=1e-5)
    assert result.tokens == 8 + 3 + 5 + 2 + 7
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_evaluate_stops_at_the_token_budget_and_restores_train_mode():
    model = tiny_model()
    model.train()
    batches = [batch([8, 8]), batch([8, 8]), batch([8, 8])]
    result = evaluate(model, batches, max_tokens=20, ctx=ONE_PROCESS)
    assert result.tokens == 32  # 16 < 20 -> a second batch; 32 >= 20 -> stop
    assert model.training


def test_evaluate_skips_batches_with_nothing_to_predict():
    model = tiny_model()
    result = evaluate(model, [batch([1, 1]), batch([4, 4])], max_tokens=1_000, ctx=ONE_PROCESS)
    assert math.isfinite(result.loss)
    assert result.tokens == 8
