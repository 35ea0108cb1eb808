"""Where logged values go (rank 0 only): `metrics.jsonl` always, wandb when enabled, a tqdm progress bar.

wandb is imported only when it will be used (not with --unset_wandb or WANDB_MODE=disabled), so tests and
offline runs do not pay for it. The run directory also gets the resolved configuration (`run_config.json`,
named so it cannot clash with HF's `config.json` in model directories) and the code/library versions
(`run_env.json`), so every run describes itself. The wandb run id is kept in `wandb_run.json`, so a run resumed
into the same directory continues the same wandb run instead of starting a new one.
"""

import json
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.json"
RUN_ENV_FILE = "run_env.json"
WANDB_RUN_FILE = "wandb_run.json"
_VERSIONED_PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "safetensors", "wandb", "numpy")


@dataclass(frozen=True)
class WandbSettings:
    project: str
    name: str
    entity: str | None = None
    tags: list[str] | None = None


def wandb_wanted(unset_wandb: bool) -> bool:
    return not unset_wandb and os.environ.get("WANDB_MODE", "").lower() != "disabled"


class RunLogger:
    """Every `log` call appends one JSON object (with `step`) to metrics.jsonl and, if on, goes to wandb.

    A resumed run appends to the file (see `truncate_metrics`) and continues the wandb run recorded in the
    directory; a new run in the same directory starts both afresh.
    """

    def __init__(self, save_dir: str | Path, *, is_main: bool, run_config: dict,
                 wandb_settings: WandbSettings | None = None, resume: bool = False):
        self.is_main = is_main
        self._wandb_run = None
        self._progress = None
        self._file = None
        if not is_main:
            return
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = save_dir / METRICS_FILE
        self._file = self.metrics_path.open("a" if resume else "w")
        if wandb_settings is not None:
            import wandb  # here, so runs without wandb never pay for importing it

            continued = saved_wandb_run_id(save_dir) if resume else None
            resume_options = {"id": continued, "resume": "allow"} if continued else {}
            self._wandb_run = wandb.init(project=wandb_settings.project, name=wandb_settings.name,
                                         entity=wandb_settings.entity, tags=wandb_settings.tags,
                                         config=run_config, **resume_options)
            (save_dir / WANDB_RUN_FILE).write_text(json.dumps({"id": self._wandb_run.id}) + "\n")

    def log(self, values: dict, step: int) -> None:
        if not self.is_main:
            return
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def start_progress(self, total: int, initial: int = 0) -> None:
        if self.is_main:
            self._progress = tqdm(total=total, initial=initial, desc="update steps", dynamic_ncols=True)

    def advance_progress(self, **postfix) -> None:
        if self._progress is not None:
            self._progress.set_postfix(postfix, refresh=False)
            self._progress.update(1)

    def close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def close(self) -> None:
        self.close_progress()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def saved_wandb_run_id(save_dir: str | Path) -> str | None:
    """The wandb run id an earlier run in `save_dir` recorded (None: there is none)."""
    path = Path(save_dir) / WANDB_RUN_FILE
    try:
        return json.loads(path.read_text())["id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def truncate_metrics(save_dir: str | Path, after_step: int) -> None:
    """Drop the metrics.jsonl records of steps after `after_step` (and a line cut short by a kill), so a run
    resumed from that step's checkpoint appends without duplicating what the killed run logged past it."""
    path = Path(save_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= after_step:
            kept.append(line)
    partial = path.with_name(f".{METRICS_FILE}.tmp")
    partial.write_text("".join(f"{line}\n" for line in kept))
    partial.replace(path)


def git_state(repo_dir: Path) -> dict:
    """Commit and dirty flag of the code that runs (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "--no-optional-locks", "-C", str(repo_dir), *args],
                                  capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def write_run_record(save_dir: str | Path, run_config: dict, argv: list[str]) -> None:
    """run_config.json (the resolved configuration) and run_env.json (git state, versions, command line)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=2, default=str) + "\n")
    environment = {"git": git_state(Path(__file__).resolve().parents[1]), "versions": library_versions(),
                   "argv": argv, "host": platform.node()}
    (save_dir / RUN_ENV_FILE).write_text(json.dumps(environment, indent=2) + "\n")
