"""Calibration and evaluation corpora: the built-in ones (package data), a user's own, and expert specs.

An expert is named by up to three dimensions, e.g. `language=fr,domain=medical,task=qa`. Each value is
a built-in category (data/calib/<dimension>/<category>.jsonl) or a path to the user's own data (a folder of
.txt files, a .jsonl with a text field, or a `datasets` source).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import UserError

DIMENSIONS = ("language", "domain", "task")
ALIASES = {"summarisation": "summarization", "mc": "multiple-choice", "code_completion": "code-completion"}


def calib_root() -> Path:
    """The built-in corpora and prompts: package data, so an installed wheel has them too."""
    return Path(str(resources.files("cusprun_edge") / "data" / "calib"))


MIN_HELD_OUT_DOCS = 4  # a user's corpus smaller than this is all calibration, none held out
TUNE_EVERY = 5  # every 5th calibration document is held apart from scoring, for choosing hyper-parameters


@dataclass
class Corpus:
    """Documents of one category in three disjoint parts:
    - `calib`: scoring and reconstruction statistics;
    - `tune`: calibration documents held apart from scoring, the only text any hyper-parameter
      (ridge term, allocation, ratio search) may be chosen on;
    - `eval` (and `mc`): held out for evaluation, never used by any decision.
    """

    name: str  # "language/fr", "domain/medical" or "user:<path>"
    calib: list[str]
    eval: list[str] = field(default_factory=list)
    mc: list[dict] = field(default_factory=list)  # held-out multiple-choice items
    tune: list[str] = field(default_factory=list)

    def sha256(self) -> str:
        return hashlib.sha256("\x00".join(self.calib).encode()).hexdigest()


def builtin_categories() -> dict[str, list[str]]:
    root = calib_root()
    return {
        dim: sorted(p.stem for p in (root / dim).glob("*.jsonl") if not p.name.endswith(".mc.jsonl"))
        for dim in DIMENSIONS
    }


def _read_jsonl(path: Path, text_field: str | None = "text") -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:  # its lineno counts within the line: name the file's line
                    raise UserError(f"{path}:{lineno} is not valid JSON Lines ({exc.msg})") from None
                if text_field and not isinstance(row, dict):
                    raise UserError(f"{path}:{lineno} is not a JSON object with a '{text_field}' field")
                if text_field and not isinstance(row.get(text_field), str):
                    raise UserError(f"{path}:{lineno} has no string field '{text_field}'")
                rows.append(row)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    return rows


def builtin_corpus(dimension: str, category: str) -> Corpus:
    category = ALIASES.get(category, category)
    path = calib_root() / dimension / f"{category}.jsonl"
    if not path.exists():
        known = ", ".join(builtin_categories().get(dimension, [])) or "none"
        raise UserError(f"no corpus for {dimension}={category}; built-in {dimension} categories: {known}")
    rows = _read_jsonl(path)
    mc_path = path.with_name(f"{category}.mc.jsonl")
    mc = _read_jsonl(mc_path, text_field=None) if mc_path.exists() else []
    calib, tune = split_tune([r["text"] for r in rows if r.get("split") == "calib"])
    return Corpus(
        name=f"{dimension}/{category}",
        calib=calib,
        eval=[r["text"] for r in rows if r.get("split") == "eval"],
        mc=mc,
        tune=tune,
    )


def split_tune(docs: list[str]) -> tuple[list[str], list[str]]:
    """(scoring documents, held-apart tuning documents): every TUNE_EVERY-th document is held apart,
    so both parts span the whole file; corpora under 2*TUNE_EVERY documents are all used for scoring."""
    if len(docs) < 2 * TUNE_EVERY:
        return docs, []
    tune = [d for i, d in enumerate(docs) if i % TUNE_EVERY == TUNE_EVERY - 1]
    return [d for i, d in enumerate(docs) if i % TUNE_EVERY != TUNE_EVERY - 1], tune


def read_texts(source: str, text_field: str = "text") -> list[str]:
    """A user's texts: a folder of .txt, a .txt or .jsonl file, or a `datasets` source (file or hub)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(f"{path} has no .txt files")
        texts = [_read_text_file(f) for f in files]
    elif path.is_file() and path.suffix == ".jsonl":
        texts = [r[text_field] for r in _read_jsonl(path, text_field)]
    elif path.is_file() and path.suffix == ".txt":
        texts = [t.strip() for t in _read_text_file(path).split("\n\n")]  # blank-line separated documents
    elif path.exists():
        texts = _datasets_texts(str(path), text_field, local=True)
    elif source.startswith((".", "/", "~")):
        raise UserError(f"no such file or directory: {source}")
    else:
        texts = _datasets_texts(source, text_field, local=False)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise UserError(f"{source} holds no text")
    return texts


def _read_text_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    if "\x00" in text:  # a binary file (or one of NUL bytes only) decodes as UTF-8 but is no text
        raise UserError(f"{path} is not a text file (it contains NUL bytes)")
    return text


def _datasets_texts(source: str, text_field: str, local: bool) -> list[str]:
    import datasets

    datasets.disable_progress_bars()  # one line per problem on stderr: no "Generating train split" bar
    datasets.logging.set_verbosity_error()

    try:
        if local:
            kind = {".csv": "csv", ".json": "json", ".parquet": "parquet"}.get(Path(source).suffix)
            if kind is None:
                raise UserError(f"{source}: unsupported file type; use .txt, .jsonl, .json, .csv or .parquet")
            ds = datasets.load_dataset(kind, data_files=source, split="train")
        else:
            ds = datasets.load_dataset(source, split="train")
    except UserError:
        raise
    except Exception as exc:
        where = "read" if local else "fetch from the hub (offline?)"
        raise UserError(f"could not {where} dataset '{source}': {str(exc).splitlines()[0][:160]}") from None
    if text_field not in ds.column_names:
        raise UserError(f"dataset '{source}' has no column '{text_field}' (columns: {', '.join(ds.column_names)})")
    return list(ds[text_field])


def user_corpus(source: str, eval_fraction: float = 0.25) -> Corpus:
    """A user's corpus; the last quarter of its documents is held out for evaluation, and every
    TUNE_EVERY-th of the rest is held apart from scoring for tuning."""
    texts = read_texts(source)
    n_eval = int(len(texts) * eval_fraction) if len(texts) >= MIN_HELD_OUT_DOCS else 0
    cut = len(texts) - n_eval
    calib, tune = split_tune(texts[:cut])
    return Corpus(name=f"user:{source}", calib=calib, eval=texts[cut:], tune=tune)


@dataclass
class ExpertSpec:
    """Which corpus stands for each chosen dimension."""

    dims: dict[str, str]  # dimension -> category name or user path

    @classmethod
    def parse(cls, text: str) -> "ExpertSpec":
        dims: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "=" not in part:
                raise UserError(f"--expert item '{part}' is not DIMENSION=CATEGORY (e.g. language=fr,domain=medical)")
            dim, value = (s.strip() for s in part.split("=", 1))
            if dim not in DIMENSIONS:
                raise UserError(f"unknown expert dimension '{dim}'; use {', '.join(DIMENSIONS)}")
            if dim in dims:
                raise UserError(f"expert dimension '{dim}' given twice")
            if not value:
                raise UserError(f"expert dimension '{dim}' has no category")
            dims[dim] = ALIASES.get(value, value)
        if not dims:
            raise UserError("--expert names no dimension; e.g. --expert language=en,domain=general")
        return cls(dims)

    def __str__(self) -> str:
        return ",".join(f"{d}={c}" for d, c in self.dims.items())

    def user_paths(self) -> list[str]:
        """The values that are paths to the user's own data: an output may not be written inside one."""
        return [v for v in self.dims.values() if Path(v).expanduser().exists()]

    def corpora(self) -> dict[str, Corpus]:
        """corpus name ("domain/medical", "user:PATH") -> Corpus; each must have calibration text."""
        out = {}
        for dim, value in self.dims.items():
            is_path = Path(value).expanduser().exists() or value.startswith((".", "/", "~"))
            corpus = user_corpus(value) if is_path else builtin_corpus(dim, value)
            if not corpus.calib:
                raise UserError(f"corpus {corpus.name} has no calibration documents")
            out[corpus.name] = corpus
        return out


def calibration_documents(corpora: dict[str, Corpus]) -> list[str]:
    """The documents an export fits its rounding on: the scoring ones. The held-apart ones (`tune`) judge that
    rounding in the export's gate, and the eval split judges the artifact."""
    return [t for c in corpora.values() for t in c.calib]


def all_builtin_corpora() -> dict[str, Corpus]:
    """Every built-in category, keyed by name: scoring them all once serves any expert later."""
    return {
        f"{dim}/{cat}": builtin_corpus(dim, cat) for dim, cats in builtin_categories().items() for cat in cats
    }
