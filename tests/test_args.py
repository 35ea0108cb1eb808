"""Flags: every reference flag parses with its meaning, the seed command lines parse, bad input names the flag."""

import re
import shlex
from pathlib import Path

import pytest
import torch

from galore_torch import OPTIMIZERS
from peft_pretraining import args as args_module
from peft_pretraining.args import flag_warnings, parse_args, parse_token_count, resolve_batch_arithmetic
from quantization import FORMATS

SEED_README = Path(__file__).resolve().parents[1] / "README.md"

# The three command lines of the original Stable-SPAM README, which README.md must show unchanged (checked
# below); this copy is used where README.md is missing.
EMBEDDED_SEED_COMMANDS = [
    """torchrun --standalone --nproc_per_node 4 main_pretrain.py --model_config configs/llama_350m.json
    --eval_every 1000 --save_every 100000 --dtype bfloat16 --batch_size 128 --total_batch_size 512 --lr 0.0004
    --warmup_steps 2000 --num_training_steps 20000 --optimizer stablespam --weight_quant --simulation
    --weight_group_size 256 --weight_decay 0 --project stablespam --name stablespam_350_fp4_500_0.9_0.7_4e-4
    --save_dir saved --restore_optimizer --fp4 --gamma1 0.7 --gamma2 0.9 --gamma3 0.999 --update_proj_gap 500""",
    """torchrun --standalone --nproc_per_node 4 main_pretrain.py --model_config configs/llama_350m.json
    --eval_every 1000 --save_every 100000 --dtype bfloat16 --batch_size 128 --total_batch_size 512 --lr 0.0004
    --warmup_steps 2000 --num_training_steps 20000 --optimizer stablespam --weight_quant --simulation
    --weight_group_size 256 --weight_bits 4 --weight_decay 0 --project stablespam
    --name 350-stablespam-int4_0.9_0.7_0.999_4e-4 --save_dir saved --restore_optimizer --act_quant
    --act_group_size 64 --act_stochastic --gamma1 0.7 --gamma2 0.9 --gamma3 0.999 --update_proj_gap 500""",
    """torchrun --standalone --nproc_per_node 4 main_pretrain.py --model_config configs/llama_130m.json
    --eval_every 1000 --save_every 100000 --dtype bfloat16 --batch_size 128 --total_batch_size 512 --lr 0.0008
    --warmup_steps 2000 --num_training_steps 20000 --optimizer stablespam --weight_decay 0 --project stablespam
    --name stablespam_350_fp4_500_0.9_0.7_4e-4 --save_dir /scratch-shared/saved --restore_optimizer
    --gamma1 0.85 --gamma2 0.99999 --gamma3 0.999 --update_proj_gap 1000""",
]


def seed_commands() -> list[list[str]]:
    """The flags after `main_pretrain.py` of each torchrun command in the seed README (or the copy above)."""
    if not SEED_README.is_file():
        return [shlex.split(command.split("main_pretrain.py")[1]) for command in EMBEDDED_SEED_COMMANDS]
    text = SEED_README.read_text().replace("\\\n", " ")
    commands = re.findall(r"torchrun .*?main_pretrain\.py(.*?)(?:```|$)", text, re.S)
    return [shlex.split(command) for command in commands]


def test_seed_readme_has_three_commands_matching_the_embedded_copy():
    assert [shlex.split(c.split("main_pretrain.py")[1]) for c in EMBEDDED_SEED_COMMANDS] == seed_commands()


def test_seed_fp4_command():
    args = parse_args(seed_commands()[0])
    resolve_batch_arithmetic(args, world_size=4)
    assert args.model_config == "configs/llama_350m.json"
    assert (args.eval_every, args.save_every, args.dtype) == (1000, 100000, "bfloat16")
    assert (args.batch_size, args.total_batch_size, args.gradient_accumulation) == (128, 512, 1)
    assert (args.lr, args.warmup_steps, args.num_training_steps) == (4e-4, 2000, 20000)
    assert args.optimizer == "stablespam" and args.optimizer_variant == "reference"
    assert args.weight_quant and args.simulation and args.fp4 and not args.act_quant
    assert (args.weight_bits, args.weight_group_size) == (8, 256)
    assert (args.gamma1, args.gamma2, args.gamma3, args.update_proj_gap) == (0.7, 0.9, 0.999, 500)
    assert (args.total_T, args.eta) == (20000, 0.5)
    assert args.restore_optimizer and args.continue_from is None
    assert (args.project, args.name, args.save_dir) == ("stablespam", "stablespam_350_fp4_500_0.9_0.7_4e-4", "saved")
    assert (args.dataset, args.tokenizer, args.max_length, args.scheduler) == ("c4", "t5-base", 256, "cosine")


def test_seed_int4_command_activation_flags_now_take_effect():
    args = parse_args(seed_commands()[1])
    resolve_batch_arithmetic(args, world_size=4)
    assert args.act_quant and not args.fp4
    assert (args.weight_bits, args.weight_group_size) == (4, 256)
    # --act_bits defaults to --weight_bits; the seed's --act_group_size 64 --act_stochastic are honoured
    assert (args.act_bits, args.act_group_size, args.act_topk, args.act_stochastic) == (4, 64, 2, True)
    assert not args.stochastic_round


def test_seed_bf16_command():
    args = parse_args(seed_commands()[2])
    resolve_batch_arithmetic(args, world_size=4)
    assert args.model_config == "configs/llama_130m.json" and args.lr == 8e-4
    assert (args.gamma1, args.gamma2, args.gamma3, args.update_proj_gap) == (0.85, 0.99999, 0.999, 1000)
    assert not (args.act_quant or args.fp4 or args.weight_quant)
    assert args.save_dir == "/scratch-shared/saved"


# Every flag of the reference (docs/algorithms.md#d1) with a non-default value, and the parsed value it must give.
REFERENCE_FLAGS = {
    "--eval_every": ("7", 7), "--save_every": ("9", 9), "--dtype": ("bf16", "bfloat16"), "--seed": ("3", 3),
    "--resume_step": ("4", 4), "--restore_optimizer": (None, True), "--continue_from": ("ckpts", "ckpts"),
    "--single_gpu": (None, True), "--save_dir": ("out", "out"), "--use_hf_model": (None, True),
    "--workers": ("2", 2), "--batch_size": ("4", 4), "--gradient_accumulation": ("2", 2),
    "--total_batch_size": ("8", 8), "--lr": ("0.003", 0.003), "--warmup_steps": ("5", 5),
    "--num_training_steps": ("50", 50), "--max_train_tokens": ("100M", 100_000_000), "--optimizer": ("AdamW", "adamw"),
    "--max_length": ("128", 128), "--scheduler": ("linear", "linear"), "--min_lr_ratio": ("0.2", 0.2),
    "--weight_decay": ("0.1", 0.1), "--grad_clipping": ("0.5", 0.5), "--activation_checkpointing": (None, True),
    "--tags": ("a,b", "a,b"), "--name": ("run", "run"), "--project": ("proj", "proj"),
    "--unset_wandb": (None, True), "--entity": ("me", "me"), "--beta1": ("0.8", 0.8), "--beta2": ("0.95", 0.95),
    "--rank": ("64", 64), "--galore_scale": ("0.25", 0.25), "--proj_type": ("left", "left"),
    "--update_proj_gap": ("200", 200), "--proj_quant": (None, True), "--proj_bits": ("4", 4),
    "--proj_group_size": ("128", 128), "--weight_quant": (None, True), "--simulation": (None, True),
    "--weight_bits": ("4", 4), "--weight_group_size": ("128", 128), "--stochastic_round": (None, True),
    "--cos_threshold": ("0.5", 0.5), "--gamma_proj": ("3", 3.0), "--queue_size": ("6", 6),
    "--act_quant": (None, True), "--act_bits": ("6", 6), "--act_group_size": ("32", 32), "--act_topk": ("1", 1),
    "--act_stochastic": (None, True), "--gamma1": ("0.7", 0.7), "--gamma2": ("0.9", 0.9),
    "--gamma3": ("0.99", 0.99), "--total_T": ("1000", 1000), "--eta": ("0.4", 0.4), "--density": ("0.5", 0.5),
}


def test_every_reference_flag_parses_with_its_value():
    argv = ["--model_config", "configs/llama_9m.json"]
    for flag, (value, _) in REFERENCE_FLAGS.items():
        argv += [flag] if value is None else [flag, value]
    args = parse_args(argv)
    for flag, (_, expected) in REFERENCE_FLAGS.items():
        assert getattr(args, flag[2:]) == expected, flag


def base_argv(*extra: str) -> list[str]:
    return ["--model_config", "configs/llama_9m.json", "--batch_size", "4", "--warmup_steps", "2",
            "--num_training_steps", "10", *extra]


def test_reference_defaults():
    args = parse_args(base_argv())
    assert (args.eval_every, args.save_every, args.lr, args.optimizer) == (5000, 10000, 1e-4, "adam")
    assert (args.max_length, args.min_lr_ratio, args.grad_clipping, args.weight_bits) == (256, 0.1, 0.0, 8)
    assert (args.gamma1, args.gamma2, args.gamma3, args.density) == (0.85, 0.999, 0.999, 1.0)
    assert (args.act_bits, args.act_group_size, args.act_topk) == (8, 256, 2)
    assert (args.warmup_epoch, args.threshold, args.grad_accu_steps) == (150, 2000, 20)
    assert args.eval_tokens == 10_000_000
    assert re.fullmatch(r"checkpoints/llama_9m-\d{4}(-\d\d){5}", args.save_dir)


def test_num_workers_is_an_alias_of_workers():
    assert parse_args(base_argv("--num_workers", "3")).workers == 3


def test_sample_dataset_defaults_to_the_builtin_tokenizer_unless_one_is_given():
    assert parse_args(base_argv("--dataset", "sample")).tokenizer == "builtin"
    assert parse_args(base_argv("--dataset", "sample", "--tokenizer", "t5-base")).tokenizer == "t5-base"


def test_token_counts():
    assert parse_token_count("10M") == 10_000_000
    assert parse_token_count("2b") == 2_000_000_000
    assert parse_token_count("1.5K") == 1500
    assert parse_token_count("50_000") == 50_000


def test_max_train_tokens_counts_tokens_not_sequences():
    args = parse_args(base_argv("--max_train_tokens", "2B", "--total_batch_size", "512", "--batch_size", "128"))
    resolve_batch_arithmetic(args, world_size=4)
    assert args.num_training_steps == 2_000_000_000 // (512 * 256)


def test_batch_arithmetic_defaults_count_every_process():
    args = parse_args(base_argv("--gradient_accumulation", "3"))
    resolve_batch_arithmetic(args, world_size=2)
    assert (args.total_batch_size, args.gradient_accumulation) == (4 * 3 * 2, 3)


def test_total_batch_size_gives_accumulation():
    args = parse_args(base_argv("--total_batch_size", "32"))
    resolve_batch_arithmetic(args, world_size=2)
    assert args.gradient_accumulation == 4


@pytest.mark.parametrize("extra, world_size, flag", [
    (["--total_batch_size", "30"], 2, "--total_batch_size"),
    (["--total_batch_size", "32", "--gradient_accumulation", "2"], 2, "--gradient_accumulation"),
    (["--max_train_tokens", "1000", "--total_batch_size", "8"], 1, "--max_train_tokens"),
    (["--warmup_steps", "10"], 1, "--warmup_steps"),
])
def test_batch_arithmetic_errors_name_the_flag(extra, world_size, flag):
    args = parse_args(base_argv(*extra))
    with pytest.raises(ValueError, match=re.escape(flag)):
        resolve_batch_arithmetic(args, world_size)


@pytest.mark.parametrize("extra, flag", [
    (["--lr", "0"], "--lr"),
    (["--lr=-1e-3"], "--lr"),
    (["--num_training_steps", "0"], "--num_training_steps"),
    (["--batch_size", "0"], "--batch_size"),
    (["--dtype", "fp16"], "--dtype"),
    (["--min_lr_ratio", "0"], "--min_lr_ratio"),
    (["--density", "1.5"], "--density"),
    (["--grad_clipping", "-1"], "--grad_clipping"),
    (["--optimizer", "galore_adamw", "--rank", "0"], "--rank"),
    (["--optimizer", "q_galore_adamw8bit", "--update_proj_gap", "0"], "--update_proj_gap"),
    (["--resume_step", "5"], "--resume_step"),
    (["--fp4", "--weight_format", "mxfp4"], "--weight_format"),
    (["--scheduler", "cosine_restarts"], "--cycle_length"),
])
def test_invalid_values_raise_one_line_naming_the_flag(extra, flag):
    with pytest.raises(ValueError, match=re.escape(flag)) as err:
        parse_args(base_argv(*extra))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("extra", [["--scheduler", "step"], ["--weight_format", "int3"], ["--lr", "abc"],
                                   ["--max_train_tokens", "lots"], ["--no_such_flag"]])
def test_argparse_errors_exit_2_with_one_line(extra, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(base_argv(*extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("main_pretrain.py: error:")


def test_block_formats_default_to_their_own_block_and_no_outliers():
    args = parse_args(base_argv("--weight_format", "mxfp4", "--act_format", "nvfp4"))
    assert (args.weight_group_size, args.act_group_size, args.act_topk) == (None, None, 0)
    args = parse_args(base_argv("--weight_format", "int", "--act_format", "fp4_ref", "--weight_group_size", "128"))
    assert (args.weight_group_size, args.act_group_size, args.act_topk) == (128, 128, 2)


def help_text(capsys) -> str:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    return capsys.readouterr().out


def flag_help(text: str, flag: str) -> str:
    """The help of `flag` (from its entry to the next one), on one line: argparse wraps it."""
    entry = re.search(rf"^  {re.escape(flag)}\b(.*?)(?=^  -|^\S|\Z)", text, re.MULTILINE | re.DOTALL)
    return " ".join(entry.group(1).split())


def test_help_shows_defaults_and_the_registries_names(capsys):
    text = help_text(capsys)
    for flag, default in [("--lr LR", "0.0001"), ("--warmup_steps WARMUP_STEPS", "1000"),
                          ("--eval_every EVAL_EVERY", "5000"), ("--total_T TOTAL_T", "20000"),
                          ("--gamma1 GAMMA1", "0.85"), ("--gamma2 GAMMA2", "0.999"),
                          ("--weight_bits WEIGHT_BITS", "8")]:
        assert f"(default: {default})" in flag_help(text, flag), flag
    assert all(name in flag_help(text, "--optimizer OPTIMIZER") for name in OPTIMIZERS)
    assert f"--weight_format {{{','.join(FORMATS)}}}" in " ".join(text.split())


def test_workers_default_is_the_references_16_capped_at_the_cpu_count(monkeypatch):
    monkeypatch.setattr(args_module, "available_cpus", lambda: 2)
    assert parse_args(base_argv()).workers == 2
    monkeypatch.setattr(args_module, "available_cpus", lambda: 64)
    assert parse_args(base_argv()).workers == 16


def test_update_proj_gap_zero_means_never_reset_and_both_optimizers_take_it():
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_pretraining.optim import build_optimizer

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, pad_token_id=None))
    ids = torch.randint(0, 32, (2, 8))
    for name in ("spam", "stablespam"):
        args = parse_args(base_argv("--optimizer", name, "--update_proj_gap", "0"))
        assert args.update_proj_gap == 0
        optimizer = build_optimizer(model, args)
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    with pytest.raises(ValueError, match="--update_proj_gap -1"):
        parse_args(base_argv("--update_proj_gap", "-1"))


@pytest.mark.parametrize("abbreviation", [["--num_train", "5"], ["--max_len=128"], ["--pack"]])
def test_abbreviated_flags_are_refused(abbreviation, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(base_argv(*abbreviation))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and abbreviation[0].split("=")[0] in err


@pytest.mark.parametrize("extra, warned", [
    (["--act_quant"], True),
    (["--act_quant", "--weight_bits", "4"], False),
    (["--act_quant", "--weight_bits=8"], False),
    (["--fp4"], False),
])
def test_act_quant_without_weight_bits_warns_that_it_trains_int8(extra, warned):
    argv = base_argv(*extra)
    warnings = flag_warnings(parse_args(argv), argv)
    assert bool(warnings) == warned
    if warned:
        assert "INT8" in warnings[0] and "--weight_bits 4" in warnings[0] and "\n" not in warnings[0]


@pytest.mark.parametrize("argv", [["--dtype", "\n"], ["--optimizer", "adam\nw"], ["--scheduler", "a\tb"]])
def test_values_with_control_characters_give_one_line_errors(argv, capsys):
    """Found by the flag fuzzer: a value holding a newline made a two-line error."""
    base = ["--model_config", "configs/llama_9m.json", "--batch_size", "1"]
    try:
        parse_args([*base, *argv])
    except SystemExit as exit_:
        assert exit_.code == 2
        message = capsys.readouterr().err
        assert message.count("\n") == 1 and "\\" in message
    except ValueError as err:
        assert "\n" not in str(err) and "\\" in str(err)
    else:
        raise AssertionError(f"{argv} was accepted")
