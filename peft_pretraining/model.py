"""The LLaMA model of a run: HF `LlamaForCausalLM` from the reference JSON configs, quantized and cast.

The reference JSON configs were written for transformers 4.31 and carry two traps for transformers 5:
`max_sequence_length` is not a LlamaConfig field, and `pad_token_id: -1` would become an embedding
`padding_idx` (row 31999 frozen at zero). We map the first to `max_position_embeddings` and drop the
second: the model never has a padding row; pads are masked out of the loss by the attention mask instead.
"""

import argparse
import dataclasses
import json
import re
import warnings
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.activations import ACT2FN

from quantization import REFERENCE_TOPK, QuantConfig, quantize_linears, reference_configs

# T5's 100 sentinel tokens sit above its 32000-piece vocabulary and never occur in ordinary text: the
# reference trained t5-base with 32000-row configs, so ids past the vocab are tolerated only if they are these.
_SENTINEL_TOKEN = re.compile(r"<extra_id_\d+>")
# Graphs dynamo may keep per compiled function before it falls back to eager (its default is 8).
LAYER_RECOMPILE_LIMIT = 64
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "bf16_mixed": torch.float32}
# Sizes every reference config sets: LlamaConfig would silently fill a missing one with LLaMA-7B's value.
_REQUIRED_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "max_sequence_length", "max_position_embeddings")


def load_llama_config(path: str | Path, *, max_length: int) -> LlamaConfig:
    """Read a reference JSON config into a LlamaConfig, mapping its transformers-4.31 fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--model_config {path}: no such file; pick one of configs/llama_*.json")
    try:
        fields = json.loads(path.read_text())
    except ValueError as err:  # malformed JSON or not UTF-8 text
        raise ValueError(f"--model_config {path}: not valid JSON ({err}); fix the file") from None
    if not isinstance(fields, dict) or fields.get("model_type", "llama") != "llama":
        raise ValueError(f"--model_config {path}: not a LLaMA config (model_type must be 'llama')")
    _check_fields(path, fields)
    fields.pop("architectures", None)
    if "max_sequence_length" in fields:
        fields["max_position_embeddings"] = fields.pop("max_sequence_length")
    fields["pad_token_id"] = None
    fields["use_cache"] = False
    try:
        config = LlamaConfig(**fields)
    except (StrictDataclassError, TypeError, ValueError) as err:  # transformers validates types and shapes
        reason = str(err.__cause__ or err).strip().splitlines()[0].rstrip(".")
        raise ValueError(f"--model_config {path}: {reason}; fix the file") from None
    config._attn_implementation = "sdpa"
    if max_length > config.max_position_embeddings:
        raise ValueError(f"--max_length {max_length} exceeds the {config.max_position_embeddings} positions of "
                         f"{path.name}; lower --max_length")
    return config


def _check_fields(path: Path, fields: dict) -> None:
    """The sizes must be there and be positive integers, and the activation one transformers knows."""
    missing = [key for key in _REQUIRED_SIZES if key not in fields]
    if missing:
        raise ValueError(f"--model_config {path}: missing {', '.join(missing)}; add them (see configs/llama_*.json)")
    for key in (*_REQUIRED_SIZES, *_OPTIONAL_SIZES):
        value = fields.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"--model_config {path}: {key} is {value!r}; it must be a positive integer")
    activation = fields.get("hidden_act", "silu")
    if not isinstance(activation, str) or activation not in ACT2FN:
        raise ValueError(f"--model_config {path}: hidden_act {activation!r} is unknown; use e.g. \"silu\"")


def apply_tokenizer(config: LlamaConfig, tokenizer) -> None:
    """Take bos/eos ids from the tokenizer and check every id it produces fits the embedding.

    The pad id is deliberately not written into the config (see the module docstring).
    """
    vocab = config.vocab_size
    overflow = tokenizer.convert_ids_to_tokens(list(range(vocab, len(tokenizer))))
    if any(not _SENTINEL_TOKEN.fullmatch(str(token)) for token in overflow):
        raise ValueError(f"--tokenizer has {len(tokenizer)} ids but the --model_config vocab_size is {vocab}; "
                         "use a config whose vocab_size covers the tokenizer")
    if overflow:
        warnings.warn(f"tokenizer ids {vocab}..{len(tokenizer) - 1} are T5 sentinels outside the {vocab}-row "
                      "embedding; they never occur in ordinary text (the reference ran the same way)",
                      stacklevel=2)
    for role in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None and not 0 <= token_id < vocab:
            raise ValueError(f"--tokenizer {role} id {token_id} is outside the {vocab}-token vocabulary of "
                             "--model_config; use a matching tokenizer")
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id


def quant_configs_from_args(args: argparse.Namespace) -> tuple[QuantConfig | None, QuantConfig | None]:
    """(weight, activation) quantization of the seven projections, from either flag style.

    `--act_quant`/`--fp4` mean what they meant in the reference; on the INT path the reference's dead
    `--act_bits/--act_group_size/--act_topk/--act_stochastic` now take effect (their defaults reproduce the
    reference). `--weight_format`/`--act_format` pick formats explicitly.
    """
    stochastic_acts = args.act_stochastic or args.stochastic_round
    if args.weight_format is None and args.act_format is None:
        try:
            weight, act = reference_configs(args.act_quant, args.fp4, args.weight_bits, args.weight_group_size,
                                            args.stochastic_round)
            if args.act_quant and not args.fp4:
                act = dataclasses.replace(act, bits=args.act_bits, group_size=args.act_group_size,
                                          topk=args.act_topk, stochastic=stochastic_acts)
        except ValueError as err:
            raise ValueError(f"--act_quant/--fp4 with --weight_*/--act_* settings: {err}") from None
        return weight, act
    weight = act = None
    if args.weight_format is not None:
        weight = _format_config("weight", args.weight_format, bits=args.weight_bits,
                                group_size=args.weight_group_size, symmetric=False,
                                topk=REFERENCE_TOPK if args.weight_format == "fp4_ref" else 0, stochastic=False)
    if args.act_format is not None:
        act = _format_config("act", args.act_format, bits=args.act_bits, group_size=args.act_group_size,
                             symmetric=True, topk=args.act_topk, stochastic=stochastic_acts)
    return weight, act


def _format_config(role: str, fmt: str, *, bits: int, group_size: int | None, symmetric: bool, topk: int,
                   stochastic: bool) -> QuantConfig:
    """QuantConfig for --weight_format/--act_format; the FP4 formats are 4-bit and symmetric by definition."""
    try:
        return QuantConfig(format=fmt, bits=bits if fmt == "int" else 4, group_size=group_size,
                           symmetric=symmetric if fmt == "int" else True, topk=topk, stochastic=stochastic)
    except ValueError as err:
        raise ValueError(f"--{role}_format {fmt} with --{role}_* settings: {err}") from None


def build_model(config: LlamaConfig, *, dtype: str, device: torch.device,
                weight_quant: QuantConfig | None = None, act_quant: QuantConfig | None = None,
                activation_checkpointing: bool = False) -> tuple[LlamaForCausalLM, list[str]]:
    """Build (init N(0, 0.02) on `device`), quantize the projections, cast; returns the model and the
    names of the quantized layers. `dtype='bfloat16'` casts everything like the reference (pure bf16)."""
    with torch.device(device):
        model = LlamaForCausalLM(config)
    quantized = []
    if weight_quant is not None or act_quant is not None:
        quantized = quantize_linears(model, weight_config=weight_quant, activation_config=act_quant)
    if activation_checkpointing:
        # Non-reentrant checkpointing is the one that works with DDP's no_sync accumulation.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.to(dtype=TORCH_DTYPES[dtype])
    return model, quantized


def compile_layers(model: LlamaForCausalLM) -> int:
    """Regional compilation: compile each decoder layer's forward (its quantized linears included) on its own.

    All layers share one compiled graph (torch treats their parameters as inputs), so cold-compile time does
    not grow with depth. Only `forward` is compiled, not the module call: module hooks (FSDP2's all-gathers,
    DDP's) and HF's activation checkpointing stay outside the graph, and parameter names (checkpoints) do
    not change. The embedding, final norm, lm_head and loss stay eager. Returns the number of layers.

    Shapes are static: a run's batches have one shape (evaluation's too), and a graph traced with symbolic
    sizes cannot draw stochastic-rounding noise. A new shape is a new graph; since every model in a process
    shares the layer's code, and with it dynamo's per-code limit on graphs (8, after which it silently runs
    eager), a process that compiles several models or shapes (tests, sweeps, notebooks) gets a higher limit.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, LAYER_RECOMPILE_LIMIT)
    layers = model.model.layers
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=False)
    return len(layers)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
