"""Command-line flags of the training run.

Every flag of the reference `main_pretrain.py` keeps its name and meaning (docs/algorithms.md#d1), so old command lines
parse and mean what they did; the few new flags are grouped at the end of `build_parser`. `parse_args` does the
checks that need nothing but the flags; `resolve_batch_arithmetic` does the ones that need the world size.
Every user error is a ValueError naming the flag and the fix (the entry point turns it into one line, exit 2).
"""

import argparse
import math
import os
import re
import sys
from datetime import datetime
from pathlib import Path

import torch

from galore_torch import OPTIMIZERS
from galore_torch.galore_projector import PROJ_TYPES
from quantization import FORMATS, REFERENCE_GROUP_SIZE, REFERENCE_TOPK

DTYPE_ALIASES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32",
                 "bf16_mixed": "bf16_mixed"}
QUANT_FORMATS = FORMATS
SCHEDULERS = ("linear", "cosine", "cosine_restarts")
# GaLore / Q-GaLore optimizers: their attn/mlp matrices are trained in a rank-r subspace (docs/galore.md).
GALORE_PREFIXES = ("galore", "q_galore")
# The reference's INT and "fp4" paths use quantization's REFERENCE_GROUP_SIZE and REFERENCE_TOPK. The block
# formats (e2m1, mxfp4, nvfp4) default to their own block size (None lets the quantization package pick it)
# and keep no outliers.
_REFERENCE_STYLE_FORMATS = (None, "int", "fp4_ref")  # None: the --act_quant/--fp4 path
_TOKEN_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_FLOAT_FLAGS = ("lr", "min_lr_ratio", "weight_decay", "grad_clipping", "threshold", "density", "eta", "beta1",
                "beta2", "gamma1", "gamma2", "gamma3", "galore_scale", "cos_threshold", "gamma_proj")
# Decay rates of moving averages: 1 would freeze them for good. StableSPAM reads --gamma1 -1 as "use beta1".
_DECAY_FLAGS = ("beta1", "beta2", "gamma1", "gamma2", "gamma3")
_GAMMA1_FROM_BETA1 = -1.0


def parse_token_count(text: str) -> int:
    """'100M', '2B', '10_000' -> int (the reference's --max_train_tokens syntax, K and T added)."""
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([KMBT]?)\s*", str(text), re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 10M, 2B, 50000)")
    return int(float(match.group(1).replace("_", "")) * _TOKEN_SUFFIXES[match.group(2).upper()])


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, which a container or taskset may narrow), as torch counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# The reference's DataLoader workers per rank; the default is capped at the CPUs, since torch warns about (and the
# machine thrashes on) more workers than cores.
REFERENCE_WORKERS = 16


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage (80 flags) before an error; we print only the error line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each flag's default, except where there is none (None, off) or the help text explains it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or re.search(r"\bdefault\b", text):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `--num_train 5` must not silently mean --num_training_steps (nor break when a flag with
    # that prefix is added); launchers that set flags can then tell them apart by their full name.
    p = _OneLineErrorParser(prog="main_pretrain.py", description="Pretrain LLaMA on C4 (Stable-SPAM / SPAM).",
                            allow_abbrev=False, formatter_class=_DefaultsHelpFormatter)
    add = p.add_argument

    # --- the reference's flags (docs/algorithms.md#d1), same names, types and defaults ---
    add("--model_config", type=str, required=True, help="LLaMA JSON config, e.g. configs/llama_130m.json")
    add("--eval_every", type=int, default=5_000, help="evaluate every N updates (and at the end)")
    add("--save_every", type=int, default=10_000, help="checkpoint every N updates (and at the end)")
    add("--dtype", type=str, default=None,
        help="bfloat16 (pure bf16, the papers' setting), float32, or bf16_mixed (fp32 weights, bf16 autocast); "
             "default bfloat16 on a bf16 GPU else float32")
    add("--seed", type=int, default=0, help="seeds the initialisation (the data order has its own fixed seed)")
    add("--resume_step", type=int, default=None, help="checkpoint step to resume (default: the latest)")
    add("--restore_optimizer", action="store_true", help="with --continue_from: also load optimizer+scheduler")
    add("--continue_from", type=str, default=None, help="directory holding model_<step>/ checkpoints")
    add("--single_gpu", action="store_true", help="one process without DDP (also under torchrun with 1 proc)")
    add("--save_dir", type=str, default=None, help="run directory (default checkpoints/<config>-<date>)")
    add("--use_hf_model", action="store_true", help="accepted; the HF LlamaForCausalLM is always used")
    add("--workers", "--num_workers", dest="workers", type=int, default=min(REFERENCE_WORKERS, available_cpus()),
        help="DataLoader workers per rank (the reference's 16, capped at this machine's CPU count)")
    add("--batch_size", type=int, required=True, help="micro-batch per process (sequences)")
    add("--gradient_accumulation", type=int, default=None, help="micro-batches per update (derived if omitted)")
    add("--total_batch_size", type=int, default=None, help="sequences per update over all processes")
    add("--lr", type=float, default=1e-4, help="peak learning rate")
    add("--warmup_steps", type=int, default=1_000, help="linear lr warm-up updates")
    add("--num_training_steps", type=int, default=10_000, help="optimizer updates (exactly this many)")
    add("--max_train_tokens", type=parse_token_count, default=None,
        help="token budget (e.g. 2B): overrides --num_training_steps as tokens // (total_batch_size*max_length)")
    add("--optimizer", type=str, default="Adam", help=f"any case of: {', '.join(sorted(OPTIMIZERS))}")
    add("--max_length", type=int, default=256, help="tokens per sequence")
    add("--scheduler", type=str, default="cosine", choices=SCHEDULERS, help="lr schedule after the warm-up")
    add("--min_lr_ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    add("--weight_decay", type=float, default=0.0, help="decoupled (adamw) or L2 weight decay")
    add("--grad_clipping", type=float, default=0.0, help="clip the global grad norm to this value (0: off)")
    add("--activation_checkpointing", action="store_true",
        help="recompute each decoder layer in backward: less activation memory, the same losses")
    add("--tags", type=str, default=None, help="comma-separated wandb tags")
    add("--name", type=str, default="test", help="wandb run name")
    add("--project", type=str, default="test", help="wandb project")
    add("--unset_wandb", action="store_true", help="no wandb at all (metrics.jsonl is always written)")
    add("--entity", type=str, default=None, help="wandb entity")
    add("--beta1", type=float, default=0.9, help="SGD momentum and Adafactor's beta1 (as in the reference; Adam-type use defaults)")
    add("--beta2", type=float, default=0.999, help="accepted for compatibility (GaLore-8bit only)")
    add("--update_proj_gap", type=int, default=500,
        help="GaLore: steps between SVD recomputations of the projection; StableSPAM/SPAM: momentum-reset period "
             "(0: never reset)")
    add("--weight_quant", action="store_true", help="accepted; inert like in the reference")
    add("--simulation", action="store_true", help="accepted; inert like in the reference")
    add("--weight_bits", type=int, default=8, help="INT bits for weights (and activations unless --act_bits)")
    add("--weight_group_size", type=int, default=None,
        help=f"weight group size (default {REFERENCE_GROUP_SIZE} for int/fp4_ref, the block size of "
             "e2m1/mxfp4/nvfp4)")
    add("--stochastic_round", action="store_true", help="stochastic rounding of INT activations")
    add("--act_quant", action="store_true", help="simulate INT weights and activations")
    add("--act_bits", type=int, default=None, help="INT activation bits (default --weight_bits)")
    add("--act_group_size", type=int, default=None,
        help="activation group size (default --weight_group_size, else as for weights)")
    add("--act_topk", type=int, default=None,
        help=f"largest-|x| activations per group kept exact (default {REFERENCE_TOPK} for int/fp4_ref, 0 for "
             "e2m1/mx/nv)")
    add("--act_stochastic", action="store_true", help="stochastic rounding of activations")
    add("--fp4", action="store_true",
        help=f"simulate the reference 'fp4' (9-level grid, group {REFERENCE_GROUP_SIZE}, top-{REFERENCE_TOPK})")
    add("--gamma1", type=float, default=0.85, help="StableSPAM AdaGN momentum")
    add("--gamma2", type=float, default=0.999, help="StableSPAM AdaGN second moment")
    add("--gamma3", type=float, default=0.999, help="StableSPAM AdaClip momentum")
    add("--total_T", type=int, default=20_000, help="StableSPAM cosine horizon (set to the update count)")
    add("--eta", type=float, default=0.5, help="StableSPAM eta_min")
    add("--density", type=float, default=1.0, help="SPAM density of the attn/mlp matrix group")

    galore = p.add_argument_group("GaLore / Q-GaLore (galore_* and q_galore_* optimizers; see docs/galore.md)")
    galore.add_argument("--rank", type=int, default=128, help="rank r of the subspace (below min(m, n) of every "
                                                             "attn/mlp matrix)")
    galore.add_argument("--galore_scale", type=float, default=1.0, help="multiplier of the projected-back update")
    galore.add_argument("--proj_type", type=str, default="std", choices=PROJ_TYPES,
                        help="which side of each matrix is projected (std: the smaller one)")
    galore.add_argument("--proj_quant", action="store_true",
                        help="store projection factors quantized and refresh them lazily (Q-GaLore)")
    galore.add_argument("--proj_bits", type=int, default=8, choices=(4, 8), help="--proj_quant: INT bits")
    galore.add_argument("--proj_group_size", type=int, default=256, help="--proj_quant: entries per scale")
    galore.add_argument("--cos_threshold", type=float, default=1.0,
                        help="--proj_quant: grow the gap when the queued cosine similarities average this much")
    galore.add_argument("--gamma_proj", type=float, default=2.0, help="--proj_quant: gap multiplier")
    galore.add_argument("--queue_size", type=int, default=5, help="--proj_quant: cosine similarities averaged")

    new = p.add_argument_group("new flags (not in the reference)")
    new.add_argument("--dataset", type=str, default="c4", help="c4 (streamed), sample (built-in), or a path")
    new.add_argument("--tokenizer", type=str, default=None,
                     help="t5-base (default), builtin (default with --dataset sample), or a directory")
    new.add_argument("--optimizer_variant", type=str, default="reference", choices=("reference", "corrected"),
                     help="spam/stablespam/galore: reproduce the research code, or fix its numerics bugs (GaLore: "
                          "carry the moments into each new subspace)")
    new.add_argument("--momentum_reset_gap", type=int, default=None,
                     help="galore_stablespam/galore_spam: momentum-reset period in the subspace (default: "
                          "--update_proj_gap, which there is the projection period)")
    new.add_argument("--state_bits", type=int, default=32, choices=(8, 32),
                     help="spam/stablespam: store Adam's moments blockwise 8-bit (8) or at full precision (32)")
    new.add_argument("--weight_format", type=str, default=None, choices=QUANT_FORMATS,
                     help="quantize projection weights in this format (instead of --act_quant/--fp4)")
    new.add_argument("--act_format", type=str, default=None, choices=QUANT_FORMATS,
                     help="quantize projection inputs in this format (instead of --act_quant/--fp4)")
    new.add_argument("--eval_tokens", type=parse_token_count, default=10_000_000,
                     help="non-pad tokens per evaluation (the reference's fixed 10M)")
    new.add_argument("--packing", action="store_true", help="pack documents into full sequences")
    new.add_argument("--fsdp", action="store_true",
                     help="shard weights, gradients and optimizer state over the processes (FSDP2) instead of DDP")
    new.add_argument("--fsdp_param_dtype", type=str, default="float32", choices=("float32", "bfloat16"),
                     help="with --fsdp: dtype the layers compute in (bfloat16: fp32 master weights gathered in "
                          "bf16, gradients reduced in fp32)")
    new.add_argument("--keep_last", type=int, default=0,
                     help="keep only the K newest checkpoints, pruning older ones after each save (0: keep all)")
    new.add_argument("--warmup_epoch", type=int, default=150, help="SPAM post-reset warm-up steps")
    new.add_argument("--threshold", type=float, default=2000, help="SPAM spike threshold")
    new.add_argument("--grad_accu_steps", type=int, default=20, help="SPAM steps after a reset without clipping")
    new.add_argument("--cycle_length", type=int, default=None, help="cosine_restarts: updates per cycle")
    new.add_argument("--restart_warmup_steps", type=int, default=None,
                     help="cosine_restarts: warm-up after each restart (default --warmup_steps)")
    new.add_argument("--max_skipped_updates", type=int, default=10,
                     help="non-finite (NaN/inf) updates skipped in a row before the run stops with a checkpoint "
                          "of the last good state (0: stop at the first)")
    new.add_argument("--spike_monitor", action="store_true",
                     help="log SPAM's gradient spike counts per layer type, the largest spike score and "
                          "StableSPAM's clipping statistics")
    new.add_argument("--spike_every", type=int, default=10, help="--spike_monitor: observe every N updates")
    new.add_argument("--spike_threshold", type=float, default=50.0,
                     help="--spike_monitor: a gradient element is a spike above this score (SPAM: 50)")
    new.add_argument("--compile", action="store_true",
                     help="torch.compile each decoder layer (with its quantized linears) and use the optimizer's "
                          "compiled (StableSPAM, SPAM) or fused (Adam, AdamW) step (off by default: see the README)")
    new.add_argument("--peak_tflops", type=float, default=None,
                     help="peak TFLOP/s of one device, for the logged MFU (default: the bf16 peak of a known GPU; "
                          "none on CPU)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the flags; resolve the defaults that depend on other flags."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _resolve_defaults(args)
        _validate(args)
    except ValueError as err:  # messages quote the user's values, which may hold newlines
        raise ValueError(one_line(str(err))) from None
    return args


def one_line(text: str) -> str:
    """`text` with control characters (newlines, tabs, ...) escaped: an error stays one line whatever a
    flag's value holds."""
    return "".join(char if char.isprintable() or char == " " else repr(char)[1:-1] for char in text)


def flag_warnings(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """Flags that parse but may not mean what was intended (one line each, printed when the run starts)."""
    given = {token.split("=", 1)[0] for token in argv}  # full names only: the parser takes no abbreviations
    warnings = []
    if args.act_quant and "--weight_bits" not in given:
        warnings.append(f"--act_quant without --weight_bits trains INT{args.weight_bits} weights and activations "
                        "(the reference's default); add --weight_bits 4 for the papers' INT4 (W4A4)")
    return warnings


def _resolve_defaults(args: argparse.Namespace) -> None:
    args.optimizer = args.optimizer.lower()
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    elif args.dtype.lower() in DTYPE_ALIASES:
        args.dtype = DTYPE_ALIASES[args.dtype.lower()]
    if args.tokenizer is None:
        args.tokenizer = "builtin" if args.dataset == "sample" else "t5-base"
    if args.act_bits is None:
        args.act_bits = args.weight_bits
    if args.act_group_size is None:
        args.act_group_size = args.weight_group_size
    if args.weight_group_size is None and args.weight_format in _REFERENCE_STYLE_FORMATS:
        args.weight_group_size = REFERENCE_GROUP_SIZE
    if args.act_group_size is None and args.act_format in _REFERENCE_STYLE_FORMATS:
        args.act_group_size = REFERENCE_GROUP_SIZE
    if args.act_topk is None:
        args.act_topk = REFERENCE_TOPK if args.act_format in _REFERENCE_STYLE_FORMATS else 0
    if args.restart_warmup_steps is None:
        args.restart_warmup_steps = args.warmup_steps
    if args.save_dir is None:
        stamp = datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
        args.save_dir = str(Path("checkpoints") / f"{Path(args.model_config).stem}-{stamp}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _validate(args: argparse.Namespace) -> None:
    _require(args.dtype in DTYPE_ALIASES.values(),
             f"--dtype {args.dtype}: unsupported (fp16 is not supported); use bfloat16, float32 or bf16_mixed")
    for flag in _FLOAT_FLAGS:  # argparse's float() accepts nan and inf, which slip through range checks
        value = getattr(args, flag)
        _require(math.isfinite(value), f"--{flag} {value}: must be a finite number")
    for flag in ("lr", "batch_size", "num_training_steps", "eval_every", "save_every", "total_T", "eval_tokens"):
        value = getattr(args, flag)
        _require(value > 0, f"--{flag} {value}: must be positive")
    for flag in ("total_batch_size", "gradient_accumulation", "max_train_tokens", "cycle_length",
                 "weight_group_size", "act_group_size"):
        value = getattr(args, flag)
        _require(value is None or value > 0, f"--{flag} {value}: must be positive")
    for flag in ("warmup_steps", "weight_decay", "grad_clipping", "workers", "act_topk", "restart_warmup_steps",
                 "warmup_epoch", "threshold", "grad_accu_steps", "seed", "keep_last", "update_proj_gap"):
        value = getattr(args, flag)
        _require(value >= 0, f"--{flag} {value}: must be >= 0")
    _require(0.0 < args.min_lr_ratio <= 1.0, f"--min_lr_ratio {args.min_lr_ratio}: must be in (0, 1]")
    _require(0.0 < args.density <= 1.0, f"--density {args.density}: must be in (0, 1]")
    _require(args.max_skipped_updates >= 0,
             f"--max_skipped_updates {args.max_skipped_updates}: must be >= 0 (0: stop at the first non-finite update)")
    _require(args.spike_every >= 1, f"--spike_every {args.spike_every}: must be >= 1 (observe every N updates)")
    _require(0.0 < args.spike_threshold < float("inf"),
             f"--spike_threshold {args.spike_threshold}: must be a positive number (SPAM uses 50)")
    _require(args.peak_tflops is None or 0.0 < args.peak_tflops < float("inf"),
             f"--peak_tflops {args.peak_tflops}: must be a positive number (TFLOP/s of one device)")
    _require(args.max_length >= 2, f"--max_length {args.max_length}: must be at least 2 (a token and EOS)")
    for flag in _DECAY_FLAGS:
        value = getattr(args, flag)
        allowed = 0.0 <= value < 1.0 or (flag == "gamma1" and value == _GAMMA1_FROM_BETA1)
        _require(allowed, f"--{flag} {value}: must be in [0, 1)" + (" (or -1: use beta1)" if flag == "gamma1" else ""))
    _require(0.0 <= args.eta <= 1.0, f"--eta {args.eta}: must be in [0, 1] (the lowest StableSPAM scale)")
    _require(args.resume_step is None or args.continue_from is not None,
             "--resume_step needs --continue_from DIR (the directory holding model_<step>/)")
    _require(args.optimizer != "", "--optimizer: empty name; use e.g. adamw or stablespam")
    _require(args.optimizer in OPTIMIZERS,
             f"--optimizer {args.optimizer}: unknown; use one of {', '.join(sorted(OPTIMIZERS))}")
    legacy_quant = args.act_quant or args.fp4
    explicit_quant = args.weight_format is not None or args.act_format is not None
    _require(not (legacy_quant and explicit_quant),
             "--weight_format/--act_format replace --act_quant/--fp4: pass one style, not both")
    _require(not (args.fsdp and args.single_gpu), "--fsdp shards over several processes: drop --single_gpu")
    _require(args.fsdp or args.fsdp_param_dtype == "float32",
             f"--fsdp_param_dtype {args.fsdp_param_dtype} needs --fsdp (without it use --dtype bf16_mixed)")
    _require(not (args.fsdp and args.spike_monitor),
             "--spike_monitor does not support --fsdp's sharded parameters yet: drop one of them")
    if args.optimizer.startswith(GALORE_PREFIXES):
        _validate_galore(args)
    if args.scheduler == "cosine_restarts":
        _require(args.cycle_length is not None,
                 "--scheduler cosine_restarts needs --cycle_length N (updates per cosine cycle)")
        _require(args.cycle_length > max(args.warmup_steps, args.restart_warmup_steps),
                 f"--cycle_length {args.cycle_length}: must exceed --warmup_steps and --restart_warmup_steps")


def _validate_galore(args: argparse.Namespace) -> None:
    """GaLore's flags, and what its projection or per-layer updates rule out."""
    _require(args.rank >= 1, f"--rank {args.rank}: must be >= 1 (and below min(m, n) of every attn/mlp matrix)")
    _require(args.update_proj_gap >= 1,
             f"--update_proj_gap {args.update_proj_gap}: GaLore recomputes its projection every N >= 1 steps")
    _require(args.momentum_reset_gap is None or args.momentum_reset_gap >= 0,
             f"--momentum_reset_gap {args.momentum_reset_gap}: must be >= 0 (0: never reset)")
    for flag in ("proj_group_size", "queue_size"):
        _require(getattr(args, flag) >= 1, f"--{flag} {getattr(args, flag)}: must be >= 1")
    _require(not args.fsdp, f"--optimizer {args.optimizer} needs each matrix's whole gradient for its SVD; --fsdp "
                            "shards it: drop --fsdp (several processes train with DDP)")
    _require("8bit" not in args.optimizer or args.optimizer_variant == "reference",
             f"--optimizer_variant {args.optimizer_variant}: {args.optimizer}'s 8-bit moments cannot be carried into a "
             "new subspace; drop it or use galore_adamw")
    if args.optimizer.endswith("_per_layer"):
        _require(args.grad_clipping == 0, f"--optimizer {args.optimizer} updates each layer during backward, "
                                          "before a global norm exists: drop --grad_clipping")
        _require(not args.spike_monitor, f"--optimizer {args.optimizer} frees each gradient during backward: "
                                         "drop --spike_monitor")


def resolve_batch_arithmetic(args: argparse.Namespace, world_size: int) -> None:
    """Fill in total_batch_size / gradient_accumulation for this world size and the step budget.

    The reference defaulted total_batch_size to batch_size*accumulation (ignoring the world size, so a
    multi-GPU run without --total_batch_size failed its assert); here the default counts every process.
    """
    per_pass = args.batch_size * world_size
    if args.total_batch_size is None:
        args.gradient_accumulation = args.gradient_accumulation or 1
        args.total_batch_size = per_pass * args.gradient_accumulation
    _require(args.total_batch_size % per_pass == 0,
             f"--total_batch_size {args.total_batch_size} is not a multiple of --batch_size {args.batch_size} x "
             f"{world_size} process(es) = {per_pass}; change --total_batch_size or --batch_size")
    accumulation = args.total_batch_size // per_pass
    _require(args.gradient_accumulation in (None, accumulation),
             f"--gradient_accumulation {args.gradient_accumulation} contradicts --total_batch_size "
             f"{args.total_batch_size} / (--batch_size {args.batch_size} x {world_size}) = {accumulation}; "
             "drop one of them")
    args.gradient_accumulation = accumulation
    if args.optimizer.endswith("_per_layer"):
        _require(accumulation == 1 and world_size == 1,
                 f"--optimizer {args.optimizer} steps each layer in backward: it needs one process and no gradient "
                 f"accumulation (got {world_size} process(es) x {accumulation} micro-batches); use "
                 f"{args.optimizer.removesuffix('_per_layer')}")
    if args.max_train_tokens is not None:
        tokens_per_update = args.total_batch_size * args.max_length
        args.num_training_steps = args.max_train_tokens // tokens_per_update
        _require(args.num_training_steps > 0,
                 f"--max_train_tokens {args.max_train_tokens} is less than one update "
                 f"({tokens_per_update} tokens = total_batch_size x max_length); raise it")
    _require(args.warmup_steps < args.num_training_steps or args.scheduler == "cosine_restarts",
             f"--warmup_steps {args.warmup_steps} must be smaller than the {args.num_training_steps} updates; "
             "lower --warmup_steps")
