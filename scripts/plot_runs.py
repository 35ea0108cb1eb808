"""Turn training runs into PNG figures and a Markdown table of final perplexities.

Each RUN_DIR is a training run's `--save_dir`, holding `metrics.jsonl` (one JSON object per log call, each with
`step`) and maybe `run_config.json` (the resolved flags), or a folder of such runs (a sweep's --root: its
sub-directories with a metrics.jsonl are the runs). Runs are overlaid in one figure per
metric; the legend names each run by the settings that differ between the runs (optimizer, variant, formats,
lr, seed, ...), or by its directory name when nothing tells them apart. `final_ppl.md` groups runs whose
settings are equal except for the seed and reports mean ± std of the final eval perplexity over them.

    python scripts/plot_runs.py checkpoints/adam_s0 checkpoints/adam_s1 checkpoints/stablespam_s0 \\
        --out plots --smooth 0.9
    python scripts/plot_runs.py runs/lr_sweep --out plots

A metric no run logged is skipped with a note. A resumed run appends to its metrics.jsonl; the records
that the resume replayed are dropped, so each step appears once.
"""

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"
TABLE_FILE = "final_ppl.md"
# Candidate legend keys, in legend order; only those whose values differ between the runs are shown.
DEFAULT_LABEL_KEYS = ("model_config", "optimizer", "optimizer_variant", "grad_clipping", "update_proj_gap",
                      "weight_format", "act_format", "fp4", "act_quant", "weight_bits", "dtype", "lr", "seed")
# Flags that name, place or schedule a run's bookkeeping without changing what it learns: ignored when
# grouping runs for the table (the seed too: groups are the seeds of one setting).
NOT_SETTINGS = frozenset({"seed", "name", "save_dir", "tags", "project", "entity", "unset_wandb", "workers",
                          "continue_from", "resume_step", "restore_optimizer", "single_gpu", "eval_every",
                          "save_every"})
# run_config keys that copy another (max_lr is lr, under the reference's wandb name): never a column of their own.
COPIES = frozenset({"max_lr"})


@dataclass(frozen=True)
class LineFigure:
    """One PNG: `y_keys` against `x_key`, every run overlaid (one line style per y key)."""
    file: str
    title: str
    x_key: str
    y_keys: tuple[str, ...]
    x_label: str
    y_label: str
    smooth: bool = False
    log_y: bool = False


LINE_FIGURES = (
    LineFigure("train_loss_vs_step.png", "Training loss", "step", ("loss",), "update step", "train loss",
               smooth=True),
    LineFigure("train_loss_vs_tokens.png", "Training loss by tokens seen", "tokens_seen", ("loss",), "tokens seen",
               "train loss", smooth=True),
    LineFigure("eval_loss.png", "Evaluation loss", "step", ("eval_loss",), "update step", "eval loss"),
    LineFigure("lr.png", "Learning rate", "step", ("lr",), "update step", "learning rate"),
    LineFigure("grad_norm.png", "Gradient norm: before clipping (solid), after (dashed)", "step",
               ("grad_norm", "grad_norm_afterclip"), "update step", "gradient norm", log_y=True),
)
# Figures with one panel per key starting with one of the prefixes (keys set by the spike monitor).
PANEL_FIGURES = {"spikes.png": ("spikes/total", "spikes/", "gss_max"),
                 "optimizer_stats.png": ("stablespam/", "spam/")}
_PANEL_TITLES = {"spikes.png": "Gradient spikes", "optimizer_stats.png": "Optimizer statistics"}


@dataclass
class Run:
    directory: Path
    config: dict
    records: list[dict]

    def series(self, x_key: str, y_key: str) -> tuple[list[float], list[float]]:
        """(x, y) of the records that logged both keys as numbers."""
        points = [(record[x_key], record[y_key]) for record in self.records
                  if _is_number(record.get(x_key)) and _is_number(record.get(y_key))]
        return [x for x, _ in points], [y for _, y in points]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def drop_replayed(records: list[dict]) -> list[dict]:
    """A step lower than the previous record's marks a resume from an earlier checkpoint: the records at or
    after that step written before the resume are superseded by the new ones."""
    kept: list[dict] = []
    for record in records:
        if kept and record["step"] < kept[-1]["step"]:
            kept = [old for old in kept if old["step"] < record["step"]]
        kept.append(record)
    return kept


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; unreadable lines (e.g. cut off by a crash) are skipped with a note."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            print(f"note: {path}:{number} is not a JSON object with a step; skipped")
            continue
        records.append(record)
    return drop_replayed(records)


def run_directories(directory: Path) -> list[Path]:
    """`directory` if it is a run, else its sub-directories that are (a sweep root), in name order."""
    if (directory / METRICS_FILE).is_file():
        return [directory]
    runs = sorted(child for child in directory.iterdir() if (child / METRICS_FILE).is_file()) \
        if directory.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"{directory}: no {METRICS_FILE} in it or in its sub-directories; pass the --save_dir "
                                "of a training run or a folder of runs")
    return runs


def load_run(directory: Path) -> Run:
    metrics = directory / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(f"{directory}: no {METRICS_FILE} in it; pass the --save_dir of a training run")
    config_path = directory / RUN_CONFIG_FILE
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path}: not valid JSON ({error}); fix or delete it") from None
    return Run(directory=directory, config=config, records=read_metrics(metrics))


def ema(values: Sequence[float], beta: float) -> list[float]:
    """Exponential moving average with bias correction (so the first points are not pulled towards 0)."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        smoothed.append(average / (1 - beta**count))
    return smoothed


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and value.endswith(".json"):
        return Path(value).stem  # configs/llama_130m.json -> llama_130m
    return str(value)


def _differing(runs: Sequence[Run], keys) -> list[str]:
    return [key for key in keys if len({json.dumps(run.config.get(key), sort_keys=True) for run in runs}) > 1]


def run_labels(runs: Sequence[Run], label_keys: Sequence[str] | None = None) -> list[str]:
    """Legend labels: the given keys, or else the default keys whose values differ between the runs; the
    directory name where that leaves nothing, and appended where two labels would be equal."""
    keys = list(label_keys) if label_keys else _differing(runs, DEFAULT_LABEL_KEYS)
    labels = [" ".join(f"{key}={format_value(run.config[key])}" for key in keys if key in run.config)
              or run.directory.name for run in runs]
    return [f"{label} ({run.directory.name})" if labels.count(label) > 1 else label
            for label, run in zip(labels, runs)]


def plot_lines(runs: Sequence[Run], labels: Sequence[str], figure: LineFigure, out: Path,
               smooth: float) -> Path | None:
    if not any(run.series(figure.x_key, figure.y_keys[0])[0] for run in runs):
        print(f"note: no run logged {figure.y_keys[0]} with {figure.x_key}; skipped {figure.file}")
        return None
    fig, axes = plt.subplots(figsize=(8, 5))
    for index, (run, label) in enumerate(zip(runs, labels)):
        color = f"C{index % 10}"
        # Each later key is drawn above every run's earlier ones: a dashed line that equals a solid one (no
        # clipping) stays visible on top of it.
        for layer, (key, style) in enumerate(zip(figure.y_keys, ("-", "--", ":"))):
            x, y = run.series(figure.x_key, key)
            if not x:
                continue
            name = label if len(figure.y_keys) == 1 else f"{label} [{key}]"
            if figure.smooth and smooth > 0:
                axes.plot(x, y, color=color, alpha=0.2, linewidth=0.8)
                y = ema(y, smooth)
            axes.plot(x, y, style, color=color, label=name, linewidth=1.2 + 0.4 * layer, zorder=2 + layer)
    axes.set(xlabel=figure.x_label, ylabel=figure.y_label)
    axes.set_title(figure.title + (f" (EMA {smooth:g}, raw faint)" if figure.smooth and smooth > 0 else ""))
    if figure.log_y:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(fig, out / figure.file)


def plot_panels(runs: Sequence[Run], labels: Sequence[str], file: str, prefixes: Sequence[str],
                out: Path) -> Path | None:
    """One panel per logged key that starts with one of `prefixes` (in prefix order), runs overlaid."""
    logged = {key for run in runs for record in run.records for key in record}
    keys: list[str] = []
    for prefix in prefixes:
        keys += sorted(key for key in logged if key.startswith(prefix) and key not in keys)
    if not keys:
        print(f"note: no run logged {' / '.join(prefixes)}; skipped {file}")
        return None
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, grid = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    handles = {}  # one legend entry per run that logged any of the keys
    for axes, key in zip(grid.flat, keys):
        for index, (run, label) in enumerate(zip(runs, labels)):
            x, y = run.series("step", key)
            if x:
                handles[label], = axes.plot(x, y, color=f"C{index % 10}", linewidth=1.0)
        axes.set(title=key, xlabel="update step")
        axes.grid(alpha=0.3)
    for axes in list(grid.flat)[len(keys):]:
        axes.set_visible(False)
    fig.suptitle(_PANEL_TITLES[file])
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.95),
               ncol=min(4, len(handles)), fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    return _save(fig, out / file)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def final_perplexity(run: Run) -> tuple[float, int] | None:
    """(perplexity, step) of the final evaluation, else of the last one (with a note); None without any."""
    evaluations = [record for record in run.records if _is_number(record.get("eval_loss"))
                   or _is_number(record.get("final_eval_loss"))]
    if not evaluations:
        return None
    finals = [record for record in evaluations if _is_number(record.get("final_eval_loss"))]
    record = finals[-1] if finals else evaluations[-1]
    if not finals:
        print(f"note: {run.directory} has no final evaluation; its last eval (step {record['step']}) is used")
    if _is_number(record.get("eval_ppl")):
        return record["eval_ppl"], record["step"]
    return math.exp(record.get("final_eval_loss", record.get("eval_loss"))), record["step"]


def settings(run: Run) -> dict:
    """What a run learns under: its config without bookkeeping and seed (the directory name without one)."""
    if not run.config:
        return {"run": run.directory.name}
    return {key: value for key, value in run.config.items() if key not in NOT_SETTINGS | COPIES}


def final_ppl_table(runs: Sequence[Run]) -> str | None:
    """Markdown: one row per setting, mean ± std (sample std, n >= 2) of the final eval perplexity."""
    results = [final_perplexity(run) for run in runs]
    evaluated = [(run, result) for run, result in zip(runs, results) if result is not None]
    skipped = [run.directory.name for run, result in zip(runs, results) if result is None]
    if skipped:
        print(f"note: no evaluation in {', '.join(skipped)}; left out of {TABLE_FILE}")
    if not evaluated:
        return None
    run_settings = [settings(run) for run, _ in evaluated]
    all_keys = sorted({key for setting in run_settings for key in setting})
    varying = [key for key in all_keys if len({json.dumps(s.get(key), sort_keys=True) for s in run_settings}) > 1]
    columns = [key for key in DEFAULT_LABEL_KEYS if key in varying] + [k for k in varying
                                                                        if k not in DEFAULT_LABEL_KEYS]
    groups: dict[str, list[tuple[Run, float, int]]] = {}
    for (run, (ppl, step)), setting in zip(evaluated, run_settings):
        groups.setdefault(json.dumps(setting, sort_keys=True), []).append((run, ppl, step))
    header = [*columns, "final eval ppl", "n", "seeds", "step"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for members in groups.values():
        setting = settings(members[0][0])
        values = [ppl for _, ppl, _ in members]
        spread = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 \
            else f"{values[0]:.2f}"
        seeds = ", ".join(format_value(run.config.get("seed", "?")) for run, _, _ in members)
        steps = sorted({step for _, _, step in members})
        cells = [format_value(setting.get(key, "-")) for key in columns]
        cells += [spread, str(len(values)), seeds, ", ".join(str(step) for step in steps)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="plot_runs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a training run's --save_dir, or a folder of them (a sweep's --root)")
    parser.add_argument("--out", type=Path, default=Path("plots"), help="output directory (default: plots)")
    parser.add_argument("--label-keys", default=None,
                        help="comma-separated run_config keys for the legend, shown even where equal "
                             "(default: those of optimizer, variant, formats, lr, seed, ... that differ)")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="EMA factor in [0, 1) for the train loss, e.g. 0.9 (default 0: raw)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        raise ValueError(f"--smooth {args.smooth}: must be in [0, 1), e.g. 0.9")
    args.label_keys = [key.strip() for key in args.label_keys.split(",") if key.strip()] \
        if args.label_keys else None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        runs = [load_run(run) for directory in args.run_dirs for run in run_directories(directory)]
    except (FileNotFoundError, ValueError) as error:
        print(f"plot_runs.py: error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs, args.label_keys)
    written = [plot_lines(runs, labels, figure, args.out, args.smooth) for figure in LINE_FIGURES]
    written += [plot_panels(runs, labels, file, prefixes, args.out) for file, prefixes in PANEL_FIGURES.items()]
    table = final_ppl_table(runs)
    if table is not None:
        (args.out / TABLE_FILE).write_text(table)
        written.append(args.out / TABLE_FILE)
    for path in written:
        if path is not None:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
