"""Adafactor must reproduce transformers' Adafactor (the class the reference's baselines ran) bit for bit."""

import inspect
import io

import pytest
import torch

from galore_torch.adafactor import Adafactor

# The reference's fixed arguments (StableSPAM utils/setup.py); lr, beta1 and weight_decay come from its flags.
REFERENCE_ARGUMENTS = {"eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8, "relative_step": False,
                       "scale_parameter": False, "warmup_init": False}
# A fixed learning rate, as in the reference (the class defaults are transformers' relative step size).
FIXED_LR = {"relative_step": False, "scale_parameter": False}
SHAPES = [(6, 5), (5,), (3, 4, 5)]  # a matrix (factored), a vector (full second moment), a 3-D tensor


def make_params(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in SHAPES]


def train(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, seed: int = 1) -> None:
    """Steps on a quadratic loss plus noise, so each gradient depends on the params the last step produced."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            noise = torch.randn(p.shape, generator=generator).to(p.dtype)
            p.grad = p.detach() * 0.5 + noise
        optimizer.step()


CONFIGURATIONS = {
    "defaults": {},
    "reference": dict(REFERENCE_ARGUMENTS, lr=1e-2),
    "reference+beta1+wd": dict(REFERENCE_ARGUMENTS, lr=1e-2, beta1=0.9, weight_decay=0.1),
    "scale_parameter+wd": dict(REFERENCE_ARGUMENTS, lr=1e-2, weight_decay=0.1, scale_parameter=True),
    "relative_step+scale_parameter+beta1+wd": dict(REFERENCE_ARGUMENTS, lr=None, beta1=0.9, weight_decay=0.1,
                                                   relative_step=True, scale_parameter=True),
    "warmup_init": dict(REFERENCE_ARGUMENTS, lr=None, relative_step=True, warmup_init=True),
}


def test_defaults_are_transformers_defaults():
    transformers_optimization = pytest.importorskip("transformers.optimization")
    ours = inspect.signature(Adafactor).parameters
    theirs = inspect.signature(transformers_optimization.Adafactor).parameters
    assert list(ours) == list(theirs)
    assert {name: p.default for name, p in ours.items()} == {name: p.default for name, p in theirs.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_bitwise_equal_to_transformers_adafactor(name, dtype):
    transformers_optimization = pytest.importorskip("transformers.optimization")
    kwargs = CONFIGURATIONS[name]
    ours, theirs = make_params(dtype), make_params(dtype)
    ours_optimizer = Adafactor(ours, **kwargs)
    theirs_optimizer = transformers_optimization.Adafactor(theirs, **kwargs)
    train(ours_optimizer, ours, steps=30)
    train(theirs_optimizer, theirs, steps=30)
    for p, q in zip(ours, theirs):
        assert p.dtype == dtype and torch.equal(p, q)
    for p, q in zip(ours, theirs):
        for key, value in ours_optimizer.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(theirs_optimizer.state[q][key])), key


def test_first_step_by_hand_with_update_clipping():
    # Step 1 has beta2_t = 1 - 1^-0.8 = 0, so V = g^2 + eps1 exactly (a rank-1 g^2 is factored exactly too):
    # the raw update is ~sign(g), RMS 1, and clip_threshold 0.5 halves it.
    lr, eps1 = 0.1, 1e-30
    vector = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    matrix = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    optimizer = Adafactor([vector, matrix], lr=lr, eps=(eps1, 1e-3), clip_threshold=0.5, **FIXED_LR)
    vector.grad = torch.tensor([3.0, -0.25, 1e-3], dtype=torch.float64)
    matrix.grad = torch.outer(torch.tensor([1.0, -2.0], dtype=torch.float64),
                              torch.tensor([0.5, 4.0, -1.0], dtype=torch.float64))
    optimizer.step()

    expected_vector = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) - lr * 0.5 * vector.grad.sign()
    torch.testing.assert_close(vector.detach(), expected_vector, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(matrix.detach(), -lr * 0.5 * matrix.grad.sign(), rtol=1e-12, atol=1e-12)
    assert set(optimizer.state[matrix]) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}
    assert set(optimizer.state[vector]) == {"step", "exp_avg_sq"}


def test_factored_statistics_cover_the_last_two_dims():
    params = make_params(torch.float32)
    optimizer = Adafactor(params, lr=1e-2, beta1=0.9, **FIXED_LR)
    train(optimizer, params, steps=1)
    state = optimizer.state[params[2]]  # shape (3, 4, 5)
    assert state["exp_avg_sq_row"].shape == (3, 4) and state["exp_avg_sq_col"].shape == (3, 5)
    assert state["exp_avg"].shape == (3, 4, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_bitwise(dtype):
    kwargs = CONFIGURATIONS["reference+beta1+wd"]
    params = make_params(dtype)
    optimizer = Adafactor(params, **kwargs)
    train(optimizer, params, steps=3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = Adafactor(resumed_params, **kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    # half-precision params keep fp32 statistics across the load (torch would cast them to bf16)
    assert all(v.dtype == torch.float32 for s in resumed.state.values() for v in s.values() if torch.is_tensor(v))
    train(optimizer, params, steps=3, seed=2)
    train(resumed, resumed_params, steps=3, seed=2)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_bf16_params_keep_their_dtype_and_get_fp32_statistics():
    params = make_params(torch.bfloat16)
    optimizer = Adafactor(params, lr=1e-2, beta1=0.9, **FIXED_LR)
    before = [p.detach().clone() for p in params]
    train(optimizer, params, steps=1)
    for p, old in zip(params, before):
        assert p.dtype == torch.bfloat16 and not torch.equal(p, old)
        assert all(v.dtype == torch.float32 for v in optimizer.state[p].values() if torch.is_tensor(v))


def test_step_returns_closure_loss_skips_params_without_grad_and_leaves_grad_untouched():
    model = torch.nn.Linear(3, 2)
    skipped = torch.ones(2, requires_grad=True)
    optimizer = Adafactor([*model.parameters(), skipped], lr=1e-2, **FIXED_LR)

    def closure():
        optimizer.zero_grad()
        loss = model(torch.ones(2, 3)).pow(2).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(skipped, torch.ones(2)) and skipped not in optimizer.state


@pytest.mark.parametrize("kwargs, message", [
    ({"relative_step": False}, "lr: None needs relative_step=True"),
    ({"lr": 1e-2}, "lr: 0.01 with relative_step=True"),
    ({"lr": 1e-2, "relative_step": False, "warmup_init": True}, "warmup_init"),
    ({"lr": -1e-2, "relative_step": False}, "lr"),
    ({"eps": (1e-30,)}, "eps"),
    ({"eps": (-1.0, 1e-3)}, r"eps\[0\]"),
    ({"clip_threshold": 0.0}, "clip_threshold"),
    ({"decay_rate": 0.8}, "decay_rate"),
    ({"beta1": 1.0}, "beta1"),
    ({"weight_decay": -0.1}, "weight_decay"),
])
def test_invalid_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Adafactor([torch.zeros(2, requires_grad=True)], **kwargs)


def test_invalid_param_group_values_name_the_group():
    groups = [{"params": [torch.zeros(2, requires_grad=True)]},
              {"params": [torch.zeros(2, requires_grad=True)], "beta1": 1.5}]
    with pytest.raises(ValueError, match="param group 1 beta1"):
        Adafactor(groups, lr=1e-2, **FIXED_LR)


def test_loss_decreases_on_a_tiny_regression():
    torch.manual_seed(0)
    inputs = torch.randn(64, 8)
    targets = inputs @ torch.randn(8, 1)
    model = torch.nn.Linear(8, 1)
    optimizer = Adafactor(model.parameters(), lr=1e-2, beta1=0.9, **FIXED_LR)
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
