"""nccl smoke test on one GPU: a process group of one rank, DDP over a compiled INT4 LLaMA, a few updates.

`main_pretrain.py` starts a process group only for 2+ processes, so a one-GPU machine never touches nccl
through it; this script does, so the GPU suite checks the nccl build, DDP's gradient all-reduce and no_sync
on the device before a multi-GPU job does. Exit 0 and one summary line when all is well.

    python benchmarks/gpu_ddp_smoke.py
"""

import os
import socket

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from galore_torch import StableSPAM
from peft_pretraining.model import build_model, compile_layers, load_llama_config
from quantization import W4A4_FORMATS

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "llama_20m.json")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_ddp_smoke.py: needs a CUDA GPU")
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        config = load_llama_config(CONFIG, max_length=256)
        torch.manual_seed(0)
        model, _ = build_model(config, dtype="bfloat16", device=torch.device("cuda"),
                               weight_quant=W4A4_FORMATS["int"][0], act_quant=W4A4_FORMATS["int"][1])
        compile_layers(model)
        wrapped = DistributedDataParallel(model, device_ids=[0])
        optimizer = StableSPAM(model.parameters(), lr=1e-3, compile=True)
        ids = torch.randint(0, config.vocab_size, (8, 256), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(0))
        losses = []
        for _ in range(4):
            with wrapped.no_sync():  # accumulation: the first micro-batch does not all-reduce
                wrapped(input_ids=ids[:4], labels=ids[:4]).loss.div(2).backward()
            loss = wrapped(input_ids=ids[4:], labels=ids[4:]).loss
            loss.div(2).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        total = torch.ones(1, device="cuda")
        dist.all_reduce(total)
        values = torch.stack(losses).float().tolist()
        assert total.item() == 1.0 and all(v == v for v in values) and values[-1] < values[0], values
        print(f"nccl DDP smoke: ok ({dist.get_backend()}, torch {torch.__version__}, nccl "
              f"{'.'.join(map(str, torch.cuda.nccl.version()))}; losses {' '.join(f'{v:.3f}' for v in values)})")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
