"""scripts/plot_runs.py on hand-written runs: the figures, the seed-grouped perplexity table, legends,
resumed logs, and the errors."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_runs.py"
_spec = importlib.util.spec_from_file_location("plot_runs", SCRIPT)
plot_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_runs)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 10


def write_run(directory: Path, config: dict | None, final_ppl: float | None = None, spikes: bool = False,
              last_eval_loss: float | None = None) -> Path:
    """A run directory like the trainer writes: per-update records, an eval at step 5 and at the end (the
    last one with `final_eval_loss` when `final_ppl` is given, plain with `last_eval_loss`)."""
    directory.mkdir(parents=True)
    records = []
    for step in range(1, STEPS + 1):
        record = {"step": step, "loss": 10.0 / step, "lr": 1e-3 * step / STEPS, "tokens_seen": 512 * step,
                  "grad_norm": 2.0 / step, "grad_norm_afterclip": 1.0 / step}
        if spikes:
            record.update({"spikes/total": float(step % 3), "spikes/q_proj": float(step % 2), "gss_max": 9.5})
        records.append(record)
        if step == 5 and final_ppl is not None:
            records.append({"step": 5, "eval_loss": math.log(final_ppl) + 1, "eval_ppl": final_ppl * math.e})
    if final_ppl is not None:
        records.append({"step": STEPS, "eval_loss": math.log(final_ppl), "eval_ppl": final_ppl,
                        "final_eval_loss": math.log(final_ppl)})
    if last_eval_loss is not None:
        records.append({"step": STEPS, "eval_loss": last_eval_loss})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    if config is not None:
        (directory / "run_config.json").write_text(json.dumps(config))
    return directory


def config(optimizer: str, seed: int, **overrides) -> dict:
    return {"optimizer": optimizer, "optimizer_variant": "reference", "lr": 1e-3, "seed": seed,
            "model_config": "configs/llama_9m.json", "name": f"{optimizer}-s{seed}",
            "save_dir": f"checkpoints/{optimizer}-s{seed}", **overrides}


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.strip().splitlines()
            if not line.startswith("|---")]


def test_figures_and_final_ppl_table_over_two_seeds(tmp_path, capsys):
    runs = [write_run(tmp_path / "adam_s0", config("adam", 0), final_ppl=20.0),
            write_run(tmp_path / "adam_s1", config("adam", 1), final_ppl=22.0),
            write_run(tmp_path / "stablespam_s0", config("stablespam", 0), final_ppl=18.0, spikes=True)]
    out = tmp_path / "plots"
    assert plot_runs.main([*map(str, runs), "--out", str(out), "--smooth", "0.9"]) == 0

    expected = {"train_loss_vs_step.png", "train_loss_vs_tokens.png", "eval_loss.png", "lr.png", "grad_norm.png",
                "spikes.png", "final_ppl.md"}
    assert {path.name for path in out.iterdir()} == expected
    for name in expected - {"final_ppl.md"}:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "skipped optimizer_stats.png" in capsys.readouterr().out  # no run logged stablespam/* keys

    header, *rows = table_rows((out / "final_ppl.md").read_text())
    assert header == ["optimizer", "final eval ppl", "n", "seeds", "step"]  # name/save_dir/seed do not split
    # adam: mean of 20 and 22, sample std sqrt(((20 - 21)^2 + (22 - 21)^2) / 1) = 1.41
    assert rows == [["adam", "21.00 ± 1.41", "2", "0, 1", "10"], ["stablespam", "18.00", "1", "0", "10"]]


def test_a_setting_other_than_seed_splits_groups_and_shows_as_a_column(tmp_path):
    runs = [write_run(tmp_path / "a", config("adam", 0), final_ppl=30.0),
            write_run(tmp_path / "b", config("adam", 1, weight_format="int"), final_ppl=40.0)]
    table = plot_runs.final_ppl_table([plot_runs.load_run(run) for run in runs])
    header, *rows = table_rows(table)
    assert header == ["weight_format", "final eval ppl", "n", "seeds", "step"]
    assert rows == [["-", "30.00", "1", "0", "10"], ["int", "40.00", "1", "1", "10"]]


def test_unfinished_run_uses_its_last_eval_with_a_note(tmp_path, capsys):
    run = write_run(tmp_path / "live", config("adam", 0), last_eval_loss=math.log(50.0))
    assert plot_runs.final_perplexity(plot_runs.load_run(run)) == (pytest.approx(50.0), STEPS)
    assert "no final evaluation" in capsys.readouterr().out


def test_legend_shows_only_differing_settings_else_the_directory(tmp_path):
    adam = plot_runs.Run(tmp_path / "run_a", config("adam", 0), [])
    adam_seed1 = plot_runs.Run(tmp_path / "run_b", config("adam", 1), [])
    stable = plot_runs.Run(tmp_path / "run_c", config("stablespam", 0, lr=4e-4), [])
    assert plot_runs.run_labels([adam, adam_seed1, stable]) == [
        "optimizer=adam lr=0.001 seed=0", "optimizer=adam lr=0.001 seed=1", "optimizer=stablespam lr=0.0004 seed=0"]
    assert plot_runs.run_labels([adam]) == ["run_a"]
    same = plot_runs.Run(tmp_path / "run_d", config("adam", 0, warmup_steps=5), [])
    assert plot_runs.run_labels([adam, same]) == ["run_a", "run_d"]
    assert plot_runs.run_labels([adam, stable], ["model_config", "lr"]) == [
        "model_config=llama_9m lr=0.001", "model_config=llama_9m lr=0.0004"]
    assert plot_runs.run_labels([adam, adam], ["lr"]) == ["lr=0.001 (run_a)", "lr=0.001 (run_a)"]
    plain = plot_runs.Run(tmp_path / "run_e", config("adam", 0, grad_clipping=0.0), [])
    clipped = plot_runs.Run(tmp_path / "run_f", config("adam", 0, grad_clipping=1.0), [])
    assert plot_runs.run_labels([plain, clipped]) == ["grad_clipping=0", "grad_clipping=1"]  # Adam+GradClip


def test_resumed_log_keeps_each_step_once_from_the_latest_segment():
    records = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4)] + [{"step": 4, "eval_loss": 9.0}]
    records += [{"step": s, "loss": 2.0} for s in (3, 4, 5)]  # resumed from the step-2 checkpoint
    kept = plot_runs.drop_replayed(records)
    assert [(r["step"], r.get("loss")) for r in kept] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 2.0)]


def test_unreadable_lines_are_skipped_with_a_note(tmp_path, capsys):
    run = write_run(tmp_path / "run", None)
    with (run / "metrics.jsonl").open("a") as file:
        file.write('{"step": 11, "loss": 0.5}\n{"step": 12, "lo')
    records = plot_runs.read_metrics(run / "metrics.jsonl")
    assert [record["step"] for record in records] == list(range(1, 12))
    assert f"{run / 'metrics.jsonl'}:12" in capsys.readouterr().out


def test_ema_is_bias_corrected():
    # beta 0.5: average 1.0 -> 1.0 / 0.5 = 2; then 0.5 * 1.0 + 0.5 * 4 = 2.5 -> 2.5 / 0.75
    assert plot_runs.ema([2.0, 4.0], 0.5) == pytest.approx([2.0, 2.5 / 0.75])
    assert plot_runs.ema([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])


def test_missing_metrics_skip_their_figures_and_the_table(tmp_path, capsys):
    run = write_run(tmp_path / "no_eval", None)
    out = tmp_path / "plots"
    assert plot_runs.main([str(run), "--out", str(out)]) == 0
    assert {path.name for path in out.iterdir()} == {"train_loss_vs_step.png", "train_loss_vs_tokens.png",
                                                      "lr.png", "grad_norm.png"}
    printed = capsys.readouterr().out
    for skipped in ("eval_loss.png", "spikes.png", "optimizer_stats.png", "final_ppl.md"):
        assert skipped in printed


def test_run_dir_without_metrics_exits_2_naming_it(tmp_path):
    good = write_run(tmp_path / "good", None)
    missing = tmp_path / "not_a_run"
    missing.mkdir()
    done = subprocess.run([sys.executable, str(SCRIPT), str(good), str(missing), "--out", str(tmp_path / "p")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("plot_runs.py: error:")]
    assert len(errors) == 1 and str(missing) in errors[0] and "metrics.jsonl" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "p").exists()


def test_bad_smooth_is_a_one_line_error(tmp_path, capsys):
    run = write_run(tmp_path / "run", None)
    assert plot_runs.main([str(run), "--smooth", "1.0"]) == 2
    assert "--smooth" in capsys.readouterr().err


def test_a_folder_of_runs_is_read_like_its_runs(tmp_path):
    root = tmp_path / "sweep"
    write_run(root / "adam-s0", config("adam", 0), final_ppl=20.0)
    write_run(root / "stablespam-s0", config("stablespam", 0), final_ppl=18.0)
    (root / "notes").mkdir()  # not a run: ignored
    assert plot_runs.main([str(root), "--out", str(tmp_path / "plots")]) == 0
    rows = table_rows((tmp_path / "plots" / "final_ppl.md").read_text())
    assert [row[0] for row in rows[1:]] == ["adam", "stablespam"]


def test_figures_have_titles_and_dashed_lines_drawn_above_solid_ones(tmp_path, monkeypatch):
    figures = {}

    def keep(fig, path: Path) -> Path:
        figures[path.name] = fig
        return path

    monkeypatch.setattr(plot_runs, "_save", keep)
    runs = [write_run(tmp_path / f"run{seed}", config("adam", seed), final_ppl=20.0, spikes=True) for seed in (0, 1)]
    assert plot_runs.main([str(run) for run in runs] + ["--out", str(tmp_path / "plots")]) == 0
    for name, fig in figures.items():
        assert fig.get_suptitle() or all(axes.get_title() for axes in fig.axes), name
    lines = figures["grad_norm.png"].axes[0].get_lines()
    solid = [line.get_zorder() for line in lines if line.get_linestyle() == "-"]
    dashed = [line.get_zorder() for line in lines if line.get_linestyle() == "--"]
    assert len(solid) == len(dashed) == 2 and min(dashed) > max(solid)


def test_final_ppl_table_shows_lr_once(tmp_path):
    runs = [plot_runs.load_run(write_run(tmp_path / f"lr{lr}", config("adam", 0, lr=lr, max_lr=lr), final_ppl=20.0))
            for lr in (1e-3, 3e-3)]
    header = table_rows(plot_runs.final_ppl_table(runs))[0]
    assert "lr" in header and "max_lr" not in header
