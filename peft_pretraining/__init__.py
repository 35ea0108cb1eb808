"""The training run: arguments, data, model, optimizer groups, schedules, checkpoints, evaluation, loop."""


def run(argv: list[str] | None = None):
    """Run `main_pretrain.py argv` in this process (see `peft_pretraining.pretrain.run`).

    Imported lazily so `import peft_pretraining.data` (or any one module) does not load the whole run.
    """
    from peft_pretraining.pretrain import run as run_training

    return run_training(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line: exit status 0 done, 2 unusable flags, 1 diverged (see `peft_pretraining.pretrain`)."""
    from peft_pretraining.pretrain import main as command_line

    return command_line(argv)
