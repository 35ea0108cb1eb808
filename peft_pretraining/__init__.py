"""The training run: arguments, data, model, optimizer groups, schedules, checkpoints, evaluation, loop."""
