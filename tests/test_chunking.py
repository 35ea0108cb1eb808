"""Compiled optimizer cores run one layer-sized chunk at a time: the same numbers as eager, and graphs that do
not grow with the model's depth (so neither does the cold compile)."""

import pytest
import torch
import torch._dynamo.utils

from galore_torch import SPAM, StableSPAM
from galore_torch.chunking import merge_per_tensor, periodic_chunks, take
from galore_torch.stable_spam import Bucket

LAYER = ["q", "k", "v", "o", "gate", "up", "down", "norm1", "norm2"]


def llama_signatures(layers: int) -> list[str]:
    return ["embed", *(LAYER * layers), "norm", "lm_head"]


def test_a_llama_is_cut_into_its_layers_and_the_rest():
    chunks = periodic_chunks(llama_signatures(4))
    assert chunks[0] == [0, 37, 38]  # embed, final norm, lm_head
    assert chunks[1:] == [list(range(1 + 9 * layer, 10 + 9 * layer)) for layer in range(4)]


def test_short_periods_share_a_chunk_and_nothing_repeating_stays_whole():
    assert periodic_chunks(["a", "b"] * 10) == [[16, 17, 18, 19], list(range(8)), list(range(8, 16))]
    assert periodic_chunks(list("abcdefg")) == [list(range(7))]
    assert periodic_chunks(["a"] * 10) == [list(range(10))]  # one chunk of 8 is no saving
    assert periodic_chunks(llama_signatures(1)) == [list(range(12))]


def test_take_picks_per_tensor_fields_and_shares_bucket_wide_ones():
    tensors = [torch.full((2,), float(i)) for i in range(3)]
    bucket = Bucket(params=tensors, grads=tensors, exp_avgs=tensors, exp_avg_sqs=tensors, max_exp_avg_sqs=[],
                    m_maxes=tensors, m_norms=tensors, v_norms=tensors,
                    coefficients=torch.arange(6.0).reshape(2, 3))
    part = take(bucket, [2, 0], size=3)
    assert [t[0].item() for t in part.params] == [2.0, 0.0] and part.max_exp_avg_sqs == []
    assert part.coefficients.tolist() == [[2.0, 0.0], [5.0, 3.0]]
    merged = merge_per_tensor([([1], (["b"],)), ([2, 0], (["c", "a"],))])
    assert merged == (["a", "b", "c"],)


def llama_params(layers: int, seed: int) -> list[torch.Tensor]:
    shapes = {"embed": (64, 16), "q": (16, 16), "k": (16, 16), "v": (16, 16), "o": (16, 16), "gate": (32, 16),
              "up": (32, 16), "down": (16, 32), "norm1": (16,), "norm2": (16,), "norm": (16,), "lm_head": (64, 16)}
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shapes[name], generator=generator).requires_grad_() for name in llama_signatures(layers)]


OPTIMIZERS = {
    "stablespam": lambda params, compile: StableSPAM(params, lr=1e-2, gamma1=0.7, gamma2=0.9, update_proj_gap=0,
                                                     total_T=10, compile=compile),
    "spam": lambda params, compile: SPAM(params, lr=1e-2, warmup_epoch=1, grad_accu_steps=1, threshold=50,
                                         compile=compile),
}

# Graphs per optimizer: 2 chunk shapes (a layer; embed + norm + lm_head), one kind of step each (StableSPAM
# without momentum resets; SPAM always clipping, as its warm-up ended before the first step).
GRAPHS = {"stablespam": 2, "spam": 2}


def run(name: str, params: list[torch.Tensor], compile: bool, steps: int = 5) -> None:
    optimizer = OPTIMIZERS[name](params, compile)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * (100.0 if step == 2 else 1.0)
        optimizer.step()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_chunked_compiled_core_matches_eager_and_its_graphs_do_not_grow_with_depth(name):
    graphs = torch._dynamo.utils.counters["stats"]
    eager, compiled = llama_params(3, seed=0), llama_params(3, seed=0)
    run(name, eager, compile=False)
    before = graphs["unique_graphs"]
    run(name, compiled, compile=True)
    three_layers = graphs["unique_graphs"] - before
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    before = graphs["unique_graphs"]
    run(name, llama_params(7, seed=1), compile=True)
    assert three_layers == GRAPHS[name] and graphs["unique_graphs"] - before == 0
