"""Catch host syncs in code under test: every Python-level way of reading a tensor's value raises."""

import torch

HOST_SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def forbid_host_reads(monkeypatch) -> None:
    """Patch torch.Tensor (undone with `monkeypatch`) so that a sync added to the code fails the test."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("host read of a tensor value")

    for method in HOST_SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, method, refuse)
