"""Pretrain a LLaMA model (the Stable-SPAM / SPAM papers' entry point, same flags).

One process (CPU or one GPU):
    python main_pretrain.py --model_config configs/llama_9m.json --dataset sample --batch_size 8 ...
Data parallel over N GPUs (or N CPU processes with gloo):
    torchrun --standalone --nproc_per_node N main_pretrain.py --model_config configs/llama_350m.json ...

`python main_pretrain.py --help` lists every flag; README.md compares them with the original's.
Exit status: 0 done, 2 unusable flags or files (one line on stderr), 1 the loss diverged.
"""

import sys

from peft_pretraining import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
