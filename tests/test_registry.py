import pytest
import torch

from galore_torch import OPTIMIZERS, get_optimizer_class


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


OUR_OPTIMIZERS = ["adafactor", "lion", "spam", "stablespam"]


@pytest.mark.parametrize("name", OUR_OPTIMIZERS)
def test_our_optimizers_refuse_sparse_gradients(name):
    """Sparse gradients would silently skip the dense foreach/compiled paths: refused with one line instead."""
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = get_optimizer_class(name)(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        optimizer.step()


@pytest.mark.parametrize("name", OUR_OPTIMIZERS)
def test_our_optimizers_refuse_complex_params(name):
    """SPAM and Adafactor would update a complex param wrongly, Lion and StableSPAM fail inside torch: refused
    with one line naming the param and its dtype instead."""
    real = torch.zeros(2, requires_grad=True)
    complex_param = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    optimizer = get_optimizer_class(name)([real, complex_param])
    real.grad = torch.ones(2)
    complex_param.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"complex parameters \(param 1 of param group 0 has dtype "
                                         r"torch.complex64\).*torch.view_as_real"):
        optimizer.step()
