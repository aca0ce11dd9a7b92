"""Prompt files: .txt (one per line), .jsonl/.csv/.parquet with a prompt column, or a saved HF dataset dir."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import StageError


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str
    negative_prompt: str | None = None


def prompt_id_of(text: str) -> str:
    """Stable id of a prompt's text: the first 16 hex digits of its sha256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _rows(path: Path, column: str) -> list[dict]:
    suffix = path.suffix.lower()
    if path.is_dir():
        import datasets

        return datasets.load_from_disk(str(path)).to_list()
    if suffix == ".txt":
        return [{column: line} for line in path.read_text(encoding="utf-8").splitlines()]
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise StageError(f"{path}: line {n}: invalid JSON ({err.msg})") from None
        return rows
    if suffix == ".csv":
        return pacsv.read_csv(path).to_pylist()
    if suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    raise StageError(f"{path}: unsupported prompt file type '{suffix}' (use .txt, .jsonl, .csv, .parquet or a HF dataset dir)")


def _read_rows(path: Path, column: str) -> list[dict]:
    try:
        return _rows(path, column)
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise StageError(f"{path}: line {line}: not UTF-8 text (byte {err.start})") from None
    except (OSError, ValueError) as err:  # pyarrow's CSV/Parquet readers raise ArrowInvalid (a ValueError)
        raise StageError(f"{path}: cannot read the prompt file: {err}") from None


def load_prompts(path: str | Path, column: str = "prompt", dedupe: bool = True) -> tuple[list[Prompt], dict[str, int]]:
    """Prompts in file order; blank ones dropped and (by default) repeats removed, both counted."""
    path = Path(path)
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    stats = {"read": 0, "blank": 0, "duplicates": 0}
    for n, row in enumerate(_read_rows(path, column), 1):
        stats["read"] += 1
        if column not in row:
            raise StageError(f"{path}: row {n} has no '{column}' column (columns: {sorted(row)})")
        text = row[column]
        if text is None or not str(text).strip():
            stats["blank"] += 1
            continue
        text = str(text).strip()
        repeat = seen.get(text, 0)
        if dedupe and repeat:
            stats["duplicates"] += 1
            continue
        seen[text] = repeat + 1
        # A kept repeat (dedupe off) is its own prompt: its id also hashes its occurrence number.
        pid = str(row.get("prompt_id") or prompt_id_of(text if not repeat else f"{text}#{repeat}"))
        prompts.append(Prompt(pid, text, row.get("negative_prompt") or None))
    if not prompts:
        raise StageError(f"{path}: no prompts (read {stats['read']} rows, {stats['blank']} blank)")
    ids = [p.prompt_id for p in prompts]
    if len(set(ids)) != len(ids):
        raise StageError(f"{path}: prompt_id values repeat; give unique ids or leave them out")
    stats["kept"] = len(prompts)
    return prompts, stats
