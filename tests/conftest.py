"""Fixtures shared by the tests."""

import json
from pathlib import Path

import pytest
import torch

# hidden 64, 2 layers, 4 heads; vocab 32000 so the built-in tokenizer fits.
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 32000, "max_sequence_length": 64, "hidden_act": "silu", "rms_norm_eps": 1e-6,
              "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1,
              "model_type": "llama"}


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """A model config file in the original's JSON format, small enough for a CPU test run."""
    path = tmp_path_factory.mktemp("config") / "llama_tiny.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and avoids OpenMP stalls when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
