import copy
import math

import pytest
import torch

from galore_torch.lion import Lion


def sign(x):
    return 0.0 if x == 0 else math.copysign(1.0, x)


def test_two_steps_by_hand():
    lr, beta1, beta2, wd = 0.1, 0.9, 0.99, 0.1
    p0 = [1.0, -2.0, 0.5, 0.0]
    p = torch.tensor(p0, dtype=torch.float64)
    opt = Lion([p], lr=lr, betas=(beta1, beta2), weight_decay=wd)
    g1, g2 = [0.3, -0.1, 0.0, 1.0], [-0.01, 0.5, 0.2, -0.2]

    # step 1: m = 0, so the direction is sign(g); a zero gradient entry only decays
    expected1 = [x * (1 - lr * wd) - lr * sign(g) for x, g in zip(p0, g1)]
    m1 = [(1 - beta2) * g for g in g1]
    # step 2: entry 0 keeps moving up (0.9 * 0.003 + 0.1 * -0.01 > 0) although g < 0; entry 3 turns
    # (0.9 * 0.01 + 0.1 * -0.2 < 0), where beta2 in place of beta1 would not (0.99 * 0.01 + 0.01 * -0.2 > 0)
    directions = [beta1 * m + (1 - beta1) * g for m, g in zip(m1, g2)]
    assert sign(directions[0]) == 1.0 and sign(directions[3]) == -1.0
    expected2 = [x * (1 - lr * wd) - lr * sign(c) for x, c in zip(expected1, directions)]
    m2 = [beta2 * m + (1 - beta2) * g for m, g in zip(m1, g2)]

    for grad, expected in ((g1, expected1), (g2, expected2)):
        p.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
        torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=0.0)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor(m2, dtype=torch.float64), rtol=1e-15, atol=0.0)


def test_mixed_dtypes_and_missing_grads_in_one_group():
    p32 = torch.zeros(3)
    p64 = torch.zeros(2, dtype=torch.float64)
    skipped = torch.ones(2)
    opt = Lion([p32, p64, skipped], lr=0.5)
    p32.grad = torch.tensor([1.0, -1.0, 2.0])
    p64.grad = torch.tensor([-3.0, 0.5], dtype=torch.float64)
    opt.step()
    assert torch.equal(p32, torch.tensor([-0.5, 0.5, -0.5]))
    assert torch.equal(p64, torch.tensor([0.5, -0.5], dtype=torch.float64))
    assert torch.equal(skipped, torch.ones(2)) and skipped not in opt.state


def test_step_returns_closure_loss_and_leaves_grad_untouched():
    model = torch.nn.Linear(3, 1)
    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1)

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(2, 3)).pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert isinstance(loss, torch.Tensor)
    for p, grad in zip(model.parameters(), grads):
        assert torch.equal(p.grad, grad)


def test_state_dict_round_trip_resumes_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = Lion(model.parameters(), lr=1e-2)
    inputs = torch.randn(8, 4)

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            m(inputs).pow(2).mean().backward()
            o.step()

    train(model, opt, 3)
    resumed_model = copy.deepcopy(model)
    resumed_opt = Lion(resumed_model.parameters(), lr=1e-2)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    train(model, opt, 3)
    train(resumed_model, resumed_opt, 3)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_bf16_params():
    model = torch.nn.Linear(4, 2).to(torch.bfloat16)
    opt = Lion(model.parameters(), lr=1e-2)
    model(torch.ones(3, 4, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    before = [p.clone() for p in model.parameters()]
    opt.step()
    for p, old in zip(model.parameters(), before):
        assert p.dtype == opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert not torch.equal(p, old)


@pytest.mark.parametrize("kwargs, name", [
    ({"lr": -1e-4}, "lr"),
    ({"betas": (1.0, 0.99)}, "betas"),
    ({"betas": (0.9,)}, "betas"),
    ({"weight_decay": -0.1}, "weight_decay"),
])
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Lion([torch.zeros(2, requires_grad=True)], **kwargs)


def test_invalid_param_group_values_name_the_group():
    groups = [{"params": [torch.zeros(2, requires_grad=True)]},
              {"params": [torch.zeros(2, requires_grad=True)], "lr": -1.0}]
    with pytest.raises(ValueError, match="param group 1 lr"):
        Lion(groups)


def test_loss_decreases_on_a_tiny_regression():
    torch.manual_seed(0)
    inputs = torch.randn(64, 8)
    targets = inputs @ torch.randn(8, 1)
    model = torch.nn.Linear(8, 1)
    opt = Lion(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_state_saved_before_maximize_existed_loads_and_minimizes():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    saved = Lion(model.parameters(), lr=1e-2).state_dict()
    del saved["param_groups"][0]["maximize"]
    resumed = Lion(model.parameters(), lr=1e-2)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["maximize"] is False
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    resumed.step()
    assert all(torch.equal(p, b - 1e-2) for p, b in zip(model.parameters(), before))
