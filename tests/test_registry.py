import copy
import pickle

import pytest
import torch

from galore_torch import OPTIMIZERS, get_optimizer_class
from optimizer_table import NOT_COPYABLE, OUR_OPTIMIZERS, make_optimizer, takes, with_compiled


def test_torch_baselines_are_torch_classes_not_copies():
    assert get_optimizer_class("adam") is torch.optim.Adam
    assert get_optimizer_class("AdamW") is torch.optim.AdamW
    assert get_optimizer_class("adafactor_torch") is torch.optim.Adafactor


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_optimizer_class("adamx")
    for name in OPTIMIZERS:
        assert name in str(err.value)


def test_project_optimizers_registered():
    from galore_torch import SPAM, Adafactor, Lion, StableSPAM

    assert get_optimizer_class("StableSPAM") is StableSPAM
    assert get_optimizer_class("Adafactor") is Adafactor  # the reference's (transformers') Adafactor, not torch's
    assert get_optimizer_class("spam") is SPAM
    assert get_optimizer_class("lion") is Lion


@pytest.mark.parametrize("name", OUR_OPTIMIZERS)
def test_our_optimizers_refuse_sparse_gradients(name):
    """Sparse gradients would silently skip the dense foreach/compiled paths: refused with one line instead."""
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = make_optimizer(name, embedding.parameters())
    with pytest.raises(ValueError, match="sparse"):  # a per-layer optimizer steps, and refuses, in backward
        embedding(torch.tensor([1, 2])).sum().backward()
        optimizer.step()


@pytest.mark.parametrize("name", OUR_OPTIMIZERS)
def test_our_optimizers_refuse_complex_params(name):
    """SPAM and Adafactor would update a complex param wrongly, Lion and StableSPAM fail inside torch: refused
    with one line naming the param and its dtype instead."""
    real = torch.zeros(2, requires_grad=True)
    complex_param = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    optimizer = make_optimizer(name, [real, complex_param])
    with pytest.raises(ValueError, match=r"complex parameters \(param \d of param group \d has dtype "
                                         r"torch.complex64\).*torch.view_as_real"):
        (real.sum() + torch.view_as_real(complex_param).sum()).backward()  # per-layer: refused in backward
        optimizer.step()


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 4, generator=generator)).pow(2).mean().backward()
        optimizer.step()


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}


@pytest.mark.parametrize("copy_of", COPIES.values(), ids=COPIES.keys())
@pytest.mark.parametrize("name", NOT_COPYABLE)
def test_optimizers_that_cannot_be_copied_say_so(name, copy_of):
    optimizer = make_optimizer(name, torch.nn.Linear(4, 3).parameters())
    with pytest.raises(TypeError, match="cannot be pickled or deep-copied; save its state_dict"):
        copy_of(optimizer)


@pytest.mark.parametrize("copy_of", COPIES.values(), ids=COPIES.keys())
@pytest.mark.parametrize("name", [name for name in OUR_OPTIMIZERS if name not in NOT_COPYABLE])
def test_copies_of_our_optimizers_continue_exactly(name, copy_of):
    """torch pickles only defaults, state and param groups: whatever else an optimizer needs must travel
    too (a StableSPAM copy raised AttributeError: 'total_T' at its first step)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = make_optimizer(name, model.parameters())
    _train(model, optimizer, steps=3, seed=1)
    copied_model, copied_optimizer = copy_of((model, optimizer))
    _train(model, optimizer, steps=3, seed=2)
    _train(copied_model, copied_optimizer, steps=3, seed=2)
    for p, q in zip(model.parameters(), copied_model.parameters()):
        assert torch.equal(p, q)


MAXIMIZE_CASES = with_compiled(tuple(name for name in OUR_OPTIMIZERS if takes(name, "maximize")))


def _maximize_run(case: str, maximize: bool) -> list[torch.Tensor]:
    """Eight steps on gradients g(p) (noise, a pull and spikes) with maximize, or on -g(p) without it."""
    torch.manual_seed(0)  # SPAM draws its masks at construction
    params = [torch.randn(6, 5, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(2)]
    groups = [{"params": params[:1]}, {"params": params[1:]}]
    if case.startswith("spam"):
        groups[1].update(density=0.5, update_proj_gap=4)  # masked entries and resets
    optimizer = make_optimizer(case, groups, maximize=maximize)
    generator = torch.Generator().manual_seed(1)
    for step in range(8):
        for p in params:
            grad = torch.randn(p.shape, generator=generator) + 0.5 * p.detach()
            if step % 3 == 2:
                grad[0, 0] *= 1000.0
            p.grad = grad if maximize else -grad
        expected_grads = [p.grad.clone() for p in params]
        optimizer.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, expected_grads))
    return params


@pytest.mark.parametrize("case", MAXIMIZE_CASES)
def test_maximize_steps_on_minus_the_gradient(case):
    """torch.optim's `maximize`: maximizing with gradient g is exactly minimizing with -g."""
    maximized = _maximize_run(case, maximize=True)
    minimized = _maximize_run(case, maximize=False)
    for p, q in zip(maximized, minimized):
        assert torch.equal(p, q)
