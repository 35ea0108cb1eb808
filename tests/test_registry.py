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


@pytest.mark.parametrize("name", ["adafactor", "lion", "spam", "stablespam"])
def test_our_optimizers_refuse_sparse_gradients(name):
    """Sparse gradients would silently skip the dense foreach/compiled paths: refused with one line instead."""
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = get_optimizer_class(name)(embedding.parameters(), lr=1e-3)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        optimizer.step()
