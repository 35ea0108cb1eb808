"""The README and docs/: the README stays a front door, every relative link and anchor resolves, no file points
outside the repository, every citation of docs/algorithms.md names an anchor it has, and every command block
marked runnable runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
ALGORITHMS = DOCS / "algorithms.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
MAX_README_LINES = 200

# A fenced block whose info string is exactly this is run by `test_runnable_block_runs`, from the repository
# root, with `python` and $PYTHON the interpreter running the tests. Keep such blocks cheap (--help,
# --dry-run): the whole file must stay under a minute on 2 CPU cores.
RUNNABLE = "bash runnable"
INFO_STRINGS = {"", "bash", RUNNABLE, "python", "console", "text"}

# Directories that are not the project's own text: git's, the virtual environment's, caches, run outputs.
SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".hypothesis", "runs", "checkpoints",
                "wandb", "node_modules"}

# Something outside the repository: the team's shared folder, at any depth above it. Written so that this file
# does not match itself. The papers' own command lines save to their cluster's scratch folder, which is no link.
OUTSIDE = re.compile(r"(?<![\w-])shared[/\\]|\.\./\.\./shared")
CITATION = re.compile(r"docs/algorithms\.md#([\w-]+)")
FENCE = re.compile(r"^(\s*)```(.*)$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def blocks(text: str) -> tuple[str, list[tuple[str, str, int]]]:
    """(the text with fenced blocks blanked out, [(info string, block body, line number of the fence)])."""
    prose, found, info, body, start, fence_indent = [], [], None, [], 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if info is None:
            if fence:
                info, body, start, fence_indent = fence.group(2).strip(), [], number, fence.group(1)
                prose.append("")
            else:
                prose.append(line)
        elif fence and not fence.group(2).strip():
            found.append((info, "\n".join(body), start))
            info = None
            prose.append("")
        else:
            body.append(line.removeprefix(fence_indent))
            prose.append("")
    assert info is None, f"a fenced block opened at line {start} is never closed"
    return "\n".join(prose), found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a Markdown page: its headings' slugs (duplicates numbered as GitHub does) and the ids of
    its `<a id="...">` tags."""
    prose, _ = blocks(page.read_text())
    found, seen = set(HTML_ANCHOR.findall(prose)), {}
    for line in prose.splitlines():
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    """The link targets of a page's prose (code blocks and inline code excluded)."""
    prose, _ = blocks(page.read_text())
    return LINK.findall(re.sub(r"`[^`\n]*`", "", prose))


def repo_text_files() -> list[Path]:
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [name for name in dirs if name not in SKIPPED_DIRS and not name.endswith(".egg-info")]
        for name in names:
            path = Path(root) / name
            data = path.read_bytes()
            if b"\0" not in data[:8192]:
                files.append(path)
    return files


def runnable_blocks() -> list[tuple[str, str]]:
    return [(f"{page.relative_to(REPO)}:{line}", body)
            for page in PAGES for info, body, line in blocks(page.read_text())[1] if info == RUNNABLE]


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_shows_the_ci_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    command = next(line.strip() for line in ci if line.strip().startswith("python -m pytest"))
    assert command in README.read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if destination != REPO and REPO not in destination.parents:
            broken.append(f"{target}: outside the repository")
            continue
        relative = destination.relative_to(REPO).as_posix()
        if not destination.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading or anchor '{anchor}' in {relative}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_fenced_blocks_have_known_info_strings(page):
    unknown = [f"line {line}: ```{info}" for info, _, line in blocks(page.read_text())[1] if info not in INFO_STRINGS]
    assert not unknown, f"{page.relative_to(REPO)}: {unknown}; runnable blocks are marked ```{RUNNABLE}"


def test_nothing_points_outside_the_repository():
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}"
                 for path in repo_text_files()
                 for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
                 if OUTSIDE.search(line)]
    assert not offenders, "cite docs/ instead:\n" + "\n".join(offenders)


def test_algorithms_citations_name_existing_anchors():
    known = anchors(ALGORITHMS)
    missing = [f"{path.relative_to(REPO)}:{number}: #{anchor}"
               for path in repo_text_files()
               for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
               for anchor in CITATION.findall(line)
               if anchor not in known]
    assert not missing, "no such anchor in docs/algorithms.md:\n" + "\n".join(missing)


def test_algorithms_numbers_every_quirk_and_fix():
    """The anchors code comments cite: every item of the quirk lists and of the reproduce/fix lists."""
    expected = ({f"a5-{i}" for i in range(1, 10)} | {f"b4-{i}" for i in range(1, 12)}
                | {f"g1-{i}" for i in range(1, 6)} | {f"g2-{i}" for i in range(1, 15)}
                | {"a", "b", "c", "d", "e", "f", "g"} | {f"d{i}" for i in range(1, 9)} | {f"c{i}" for i in range(1, 6)})
    assert expected <= anchors(ALGORITHMS)


def test_slug_follows_github():
    assert slug("FSDP2: models that do not fit one GPU") == "fsdp2-models-that-do-not-fit-one-gpu"
    assert slug("`variant`: the original's numbers, or its fix") == "variant-the-originals-numbers-or-its-fix"
    assert slug("Non-finite steps (NaN/inf)") == "non-finite-steps-naninf"
    assert slug("a.5 Other quirks of the [original](x.md)") == "a5-other-quirks-of-the-original"


def test_docs_have_runnable_blocks():
    assert len(runnable_blocks()) >= 5


def _tree() -> set[str]:
    names = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [name for name in dirs if name not in SKIPPED_DIRS - {"runs", "checkpoints", "wandb"}]
        names.update(os.path.relpath(os.path.join(root, name), REPO) for name in dirs + files)
    return names


@pytest.mark.parametrize("where,commands", runnable_blocks(), ids=[where for where, _ in runnable_blocks()])
def test_runnable_block_runs(where, commands):
    launcher_settings = ("DRY_RUN", "NGPU", "NNODES", "RDZV_ENDPOINT", "RDZV_ID", "BATCH_SIZE", "SEED", "LR", "STEPS",
                         "WARMUP", "RESET", "RUNS_DIR", "SAVE_EVERY", "FRESH", "MINI_PAPER_DIR", "CUDA_VISIBLE_DEVICES",
                         "SLURM_GPUS_ON_NODE")
    env = {key: value for key, value in os.environ.items() if key not in launcher_settings}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHON=sys.executable,
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    before = _tree()
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", commands], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{where} failed:\n{commands}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert _tree() == before, f"{where} wrote into the repository: {sorted(_tree() - before)}"
