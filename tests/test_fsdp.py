"""FSDP2 on CPU with gloo, 2 processes: StableSPAM and SPAM over sharded parameters give the unsharded
results (their per-tensor statistics span whole tensors, in a constant number of collectives per step),
quantized layers train under FSDP2, gathered checkpoints restore exactly, and main_pretrain.py --fsdp runs.

The optimizer-level scenarios run in one `torch.multiprocessing` spawn (a module fixture) that writes what it
measured to a file; each test then checks one part of it.
"""

import copy
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

import peft_pretraining
from galore_torch import SPAM, StableSPAM
from galore_torch.sharded import local
from peft_pretraining.distributed import DistributedContext
from peft_pretraining.fsdp import shard_model
from peft_pretraining.optim import spam_param_groups
from quantization import QuantConfig, quantize_linears
from optimizer_table import make_optimizer

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
STEPS = 6
SPIKE_STEP = 4  # a planted spike in rank 0's rows of one matrix, once the max |g| EMA has settled
SPIKE = 50.0
SPIKED_PARAM = "model.layers.0.self_attn.q_proj.weight"
FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)

# Sharded-vs-unsharded cases: (table optimizer, its arguments beyond the few-step ones of optimizer_table).
_STABLESPAM = {"gamma3": 0.9, "update_proj_gap": 3, "total_T": STEPS}
_SPAM = {"grad_accu_steps": 1, "threshold": 5.0}
OPTIMIZERS = {
    "stablespam_reference": ("stablespam", _STABLESPAM),
    "stablespam_corrected": ("stablespam", {**_STABLESPAM, "variant": "corrected", "weight_decay": 0.1,
                                            "amsgrad": True}),
    "spam_dense": ("spam", {**_SPAM, "density": 1.0}),
    "spam_sparse": ("spam", {**_SPAM, "density": 0.5, "variant": "corrected", "weight_decay": 0.1}),
}


def tiny_llama(num_layers: int = 2) -> LlamaForCausalLM:
    """hidden 64, 4 heads, vocab 96: 2 layers give 21 parameter tensors."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=96, max_position_embeddings=32,
                         pad_token_id=None, use_cache=False)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def build_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    optimizer_name, kwargs = OPTIMIZERS[name]
    if optimizer_name == "stablespam":
        return make_optimizer(optimizer_name, model.parameters(), **kwargs)
    kwargs = dict(kwargs)
    groups = spam_param_groups(model, density=kwargs.pop("density"), update_proj_gap=3)
    return make_optimizer(optimizer_name, groups, **kwargs)


def global_batch(step: int) -> torch.Tensor:
    """4 full sequences of 16 tokens (no padding: every rank's mean loss weighs the same)."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 96, (4, 16), generator=generator)


def rank_slice(batch: torch.Tensor, rank: int) -> torch.Tensor:
    per_rank = batch.shape[0] // WORLD_SIZE
    return batch[rank * per_rank:(rank + 1) * per_rank]


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextmanager
def counted_all_reduces(counts: list[int], reduce: bool = True):
    """Count dist.all_reduce calls (appended per use); with reduce=False each rank keeps its own value, which
    is what a shard-local statistic would be."""
    original = dist.all_reduce
    calls = [0]

    def counting(tensor, *args, **kwargs):
        calls[0] += 1
        return original(tensor, *args, **kwargs) if reduce else None

    dist.all_reduce = counting
    try:
        yield
    finally:
        dist.all_reduce = original
        counts.append(calls[0])


def backward_like_two_ranks(model: torch.nn.Module, batch: torch.Tensor) -> None:
    """The gradient FSDP2 makes of 2 ranks' halves (their sum, then / 2): the unsharded model's matches it
    bit for bit, so any difference left after the optimizer steps is the optimizer's own."""
    for rank in range(WORLD_SIZE):
        part = rank_slice(batch, rank)
        model(input_ids=part, labels=part).loss.backward()
    for p in model.parameters():
        p.grad.div_(WORLD_SIZE)


def train_pair(name: str, ctx: DistributedContext, reduce: bool = True, num_layers: int = 2) -> dict:
    """An FSDP2 model trains on this rank's half of each batch; an unsharded copy of its init is stepped by
    an unsharded optimizer with the same (gathered) gradients and RNG draws. Returns the largest parameter
    difference and the collective counts of each step.

    The reference gets the sharded run's gradients rather than computing its own: through the model, a
    round-off difference in the weights changes the next gradients, and Adam's m / sqrt(v) blows that up for
    entries with near-zero gradients (at a corrected reset, where the update is sign(g), to 2 lr).
    """
    torch.manual_seed(0)
    reference = tiny_llama(num_layers)
    sharded = shard_model(copy.deepcopy(reference), ctx)
    torch.manual_seed(1)
    reference_optimizer = build_optimizer(name, reference)
    torch.manual_seed(1)  # SPAM draws its masks at construction: the same ones for both
    sharded_optimizer = build_optimizer(name, sharded)
    counts: list[int] = []
    norms = []
    for step in range(1, STEPS + 1):
        part = rank_slice(global_batch(step), ctx.rank)
        sharded(input_ids=part, labels=part).loss.backward()
        if step == SPIKE_STEP and ctx.rank == 0:
            local(sharded.get_parameter(SPIKED_PARAM).grad)[0, 0] += SPIKE
        for p, q in zip(sharded.parameters(), reference.parameters()):
            q.grad = full(p.grad).clone()
        torch.manual_seed(100 + step)  # SPAM refreshes masks from the global RNG
        reference_optimizer.step()
        torch.manual_seed(100 + step)
        with counted_all_reduces(counts, reduce=reduce):
            sharded_optimizer.step()
        if isinstance(sharded_optimizer, SPAM):
            norms.append((float(sharded_optimizer.last_grad_norm), float(reference_optimizer.last_grad_norm)))
        for optimizer in (reference_optimizer, sharded_optimizer):
            optimizer.zero_grad(set_to_none=True)
    reference_params = dict(reference.named_parameters())
    differences = {n: (full(p.detach()) - reference_params[n].detach()).abs().max().item()
                   for n, p in sharded.named_parameters()}
    result = {"max_difference": max(differences.values()), "counts": counts, "norms": norms,
              "num_tensors": len(differences)}
    if name.startswith("spam"):
        result["masks_equal"] = all(
            torch.equal(full(sharded_optimizer.state[p]["mask"]), reference_optimizer.state[q]["mask"])
            for p, q in zip(sharded.parameters(), reference.parameters()) if "mask" in reference_optimizer.state[q])
    if name.startswith("stablespam"):
        q = reference.get_parameter(SPIKED_PARAM)
        result["threshold"] = float(reference_optimizer.state[q]["clip_threshold"])
    return result


def quantized_gradients(ctx: DistributedContext, weight: QuantConfig, activation: QuantConfig) -> float:
    """Largest gradient difference between a quantized FSDP2 model and the same model unsharded."""
    torch.manual_seed(0)
    reference = tiny_llama()
    quantize_linears(reference, weight_config=weight, activation_config=activation)
    sharded = shard_model(copy.deepcopy(reference), ctx)
    batch = global_batch(0)
    backward_like_two_ranks(reference, batch)
    part = rank_slice(batch, ctx.rank)
    sharded(input_ids=part, labels=part).loss.backward()
    reference_params = dict(reference.named_parameters())
    return max((full(p.grad) - reference_params[n].grad).abs().max().item() for n, p in sharded.named_parameters())


def checkpoint_round_trip(ctx: DistributedContext, name: str, directory: Path) -> dict:
    """Gather model + optimizer state on rank 0 (the checkpoint format), load it into a fresh sharded model
    and optimizer on every rank, and take one more step on both: they must agree exactly."""
    torch.manual_seed(0)
    model = shard_model(tiny_llama(), ctx)
    torch.manual_seed(1)
    optimizer = build_optimizer(name, model)
    for step in (1, 2):
        part = rank_slice(global_batch(step), ctx.rank)
        model(input_ids=part, labels=part).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model_state = get_model_state_dict(model, options=FULL_ON_CPU)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL_ON_CPU)
    path = directory / f"{name}.pt"
    if ctx.rank == 0:
        torch.save({"model": model_state, "optimizer": optimizer_state}, path)
    dist.barrier()
    saved = torch.load(path, weights_only=True)
    whole = all(not isinstance(value, DTensor) and (value.dim() == 0 or value.shape == saved["model"][key].shape)
                for key, state in saved["optimizer"]["state"].items() if key in saved["model"]
                for value in state.values() if isinstance(value, torch.Tensor))

    torch.manual_seed(7)  # a different init, replaced by the checkpoint
    restored = shard_model(tiny_llama(), ctx)
    restored_optimizer = build_optimizer(name, restored)
    set_model_state_dict(restored, saved["model"], options=FULL_ON_CPU)
    set_optimizer_state_dict(restored, restored_optimizer, saved["optimizer"], options=FULL_ON_CPU)
    part = rank_slice(global_batch(3), ctx.rank)
    for m, o in ((model, optimizer), (restored, restored_optimizer)):
        m(input_ids=part, labels=part).loss.backward()
        torch.manual_seed(3)
        o.step()
    restored_params = dict(restored.named_parameters())
    difference = max((full(p.detach()) - full(restored_params[n].detach())).abs().max().item()
                     for n, p in model.named_parameters())
    return {"difference": difference, "saved_whole": whole, "sharded_state": all(
        isinstance(state["exp_avg"], DTensor) for state in restored_optimizer.state.values() if "exp_avg" in state)}


def compiled_matches_eager(ctx: DistributedContext) -> float:
    """StableSPAM compile=True over shards (the collectives traced into the graph) against eager."""
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    results = []
    for compile_core in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 1))
        fully_shard(model, mesh=mesh)
        optimizer = StableSPAM(model.parameters(), lr=1e-2, gamma3=0.9, compile=compile_core)
        for step in range(3):
            inputs = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            model(rank_slice(inputs, ctx.rank)).square().sum().backward()
            if step == 2 and ctx.rank == 1:
                local(model[0].weight.grad)[-1, 0] += SPIKE
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results.append([full(p.detach()) for p in model.parameters()])
    return max((a - b).abs().max().item() for a, b in zip(*results))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A rank that fails leaves the other waiting in a collective: time out instead of hanging the suite.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    ctx = DistributedContext(rank=rank, local_rank=rank, world_size=WORLD_SIZE, device=torch.device("cpu"))
    try:
        results = {name: train_pair(name, ctx) for name in OPTIMIZERS}
        results["stablespam_shard_local"] = train_pair("stablespam_reference", ctx, reduce=False)
        results["stablespam_more_layers"] = train_pair("stablespam_reference", ctx, num_layers=3)
        results["quantized"] = {
            "int4": quantized_gradients(ctx, QuantConfig("int", bits=4, group_size=32),
                                        QuantConfig("int", bits=4, group_size=32, symmetric=True, topk=2)),
            "fp4_ref": quantized_gradients(ctx, QuantConfig("fp4_ref", bits=4, group_size=64, topk=2),
                                           QuantConfig("fp4_ref", bits=4, group_size=64, topk=2)),
            "mxfp4": quantized_gradients(ctx, QuantConfig("mxfp4", bits=4), QuantConfig("mxfp4", bits=4)),
        }
        results["checkpoint"] = {name: checkpoint_round_trip(ctx, name, Path(out_dir))
                                 for name in ("stablespam_corrected", "spam_sparse")}
        results["compiled"] = compiled_matches_eager(ctx)
        if rank == 0:
            torch.save(results, Path(out_dir) / "results.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return torch.load(out_dir / "results.pt", weights_only=False)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sharded_optimizer_matches_unsharded(fsdp_results, name):
    result = fsdp_results[name]
    assert result["max_difference"] < 1e-6, result
    for sharded_norm, reference_norm in result["norms"]:
        assert sharded_norm == pytest.approx(reference_norm, rel=1e-5)
    if name.startswith("spam"):
        assert result["masks_equal"]


def test_spike_is_clipped_by_whole_tensor_statistics(fsdp_results):
    """The spike sits in rank 0's rows only: with shard-local max |g| and norms (no reduction), rank 1 would
    clip and normalise its shard by other numbers and the run would leave the unsharded one."""
    reduced, shard_local = fsdp_results["stablespam_reference"], fsdp_results["stablespam_shard_local"]
    assert reduced["threshold"] < SPIKE / 2  # AdaClip's threshold stayed far below the spike: it was clipped
    assert shard_local["max_difference"] > 1000 * max(reduced["max_difference"], 1e-7)


def test_collectives_per_step_do_not_grow_with_tensors(fsdp_results):
    """StableSPAM: one all_reduce(MAX) and one all_reduce(SUM) per step; SPAM: one (the logged norm)."""
    two_layers, three_layers = fsdp_results["stablespam_reference"], fsdp_results["stablespam_more_layers"]
    assert three_layers["num_tensors"] > two_layers["num_tensors"]
    assert two_layers["counts"] == three_layers["counts"] == [2] * STEPS
    assert fsdp_results["stablespam_corrected"]["counts"] == [2] * STEPS
    assert fsdp_results["spam_sparse"]["counts"] == fsdp_results["spam_dense"]["counts"] == [1] * STEPS


@pytest.mark.parametrize("fmt", ["int4", "fp4_ref", "mxfp4"])
def test_quantized_layers_match_unsharded(fsdp_results, fmt):
    assert fsdp_results["quantized"][fmt] < 1e-5


@pytest.mark.parametrize("name", ["stablespam_corrected", "spam_sparse"])
def test_gathered_checkpoint_restores_sharded_state(fsdp_results, name):
    result = fsdp_results["checkpoint"][name]
    assert result["saved_whole"] and result["sharded_state"]
    assert result["difference"] == 0.0


def test_compiled_core_matches_eager_over_shards(fsdp_results):
    assert fsdp_results["compiled"] < 1e-6


# ------------------------------------------------------------------ main_pretrain.py --fsdp (torchrun, gloo)

def write_documents(directory: Path) -> Path:
    """Documents of very different lengths, so ranks see different token counts per batch: evaluation must
    keep the ranks in step (FSDP2's forward is collective)."""
    words = "alpha beta gamma delta stone river light green house music paper window garden cloud".split()
    generator = torch.Generator().manual_seed(0)
    directory.mkdir()
    for name, count in (("train.jsonl", 64), ("validation.jsonl", 24)):
        lengths = torch.randint(2, 60, (count,), generator=generator).tolist()
        indices = torch.randint(0, len(words), (sum(lengths),), generator=generator).tolist()
        lines, start = [], 0
        for length in lengths:
            lines.append(json.dumps({"text": " ".join(words[i] for i in indices[start:start + length])}))
            start += length
        (directory / name).write_text("\n".join(lines) + "\n")
    return directory


def torchrun(argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """main_pretrain.py on 2 gloo processes, in its own session so a hang kills the ranks too."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD_SIZE),
               str(REPO / "main_pretrain.py"), *argv]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def update_lines(save_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
def test_main_pretrain_fsdp_trains_evaluates_and_resumes(tmp_path):
    config = tmp_path / "llama_tiny.json"
    config.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "vocab_size": 32000, "max_sequence_length": 64,
                                  "model_type": "llama"}))
    common = ["--model_config", str(config), "--dataset", str(write_documents(tmp_path / "docs")),
              "--tokenizer", "builtin", "--batch_size", "2", "--total_batch_size", "8", "--max_length", "32",
              "--lr", "1e-2", "--warmup_steps", "1", "--num_training_steps", "4", "--eval_tokens", "600",
              "--workers", "0", "--unset_wandb", "--optimizer", "stablespam", "--grad_clipping", "1.0",
              "--fsdp"]
    full = torchrun([*common, "--save_dir", str(tmp_path / "full"), "--save_every", "2"])
    assert full.returncode == 0, full.stderr[-3000:]
    assert "Final eval: loss" in full.stdout
    run_config = json.loads((tmp_path / "full" / "run_config.json").read_text())
    assert (run_config["world_size"], run_config["gradient_accumulation"], run_config["fsdp"]) == (2, 2, True)
    updates = update_lines(tmp_path / "full")
    assert [r["step"] for r in updates] == [1, 2, 3, 4] and all(r["grad_norm"] > 0 for r in updates)

    resumed = torchrun([*common, "--save_dir", str(tmp_path / "resumed"), "--continue_from", str(tmp_path / "full"),
                        "--resume_step", "2", "--restore_optimizer"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_updates = update_lines(tmp_path / "resumed")
    assert [r["step"] for r in resumed_updates] == [3, 4]
    assert [r["loss"] for r in resumed_updates] == pytest.approx([r["loss"] for r in updates[2:]], rel=1e-6)
    final, continued = (load_file(tmp_path / run / "model_4" / "model.safetensors") for run in ("full", "resumed"))
    for name, tensor in final.items():
        torch.testing.assert_close(continued[name], tensor, rtol=1e-6, atol=1e-7)


def test_fsdp_flag_errors_are_one_line(tmp_path, capsys):
    base = ["--model_config", "configs/llama_9m.json", "--batch_size", "2", "--dataset", "sample",
            "--unset_wandb", "--save_dir", str(tmp_path / "run")]
    for flags, message in ((["--fsdp"], "--fsdp needs 2 or more processes"),
                           (["--fsdp", "--single_gpu"], "--fsdp shards over several processes"),
                           (["--fsdp_param_dtype", "bfloat16"], "--fsdp_param_dtype bfloat16 needs --fsdp"),
                           (["--fsdp", "--spike_monitor"], "--spike_monitor does not support --fsdp")):
        assert peft_pretraining.main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_slurm_example_is_valid_bash():
    script = REPO / "scripts" / "slurm_example.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert "--nnodes" in text and "--rdzv_backend c10d" in text and "--fsdp" in text and "--continue_from" in text
