"""Dataset directories: Parquet shards written atomically, resumable, sealed by `manifest.json`.

A dataset directory holds `part-00000.parquet`, ... and `manifest.json`, written last: a dataset is complete
only when its manifest exists. Each shard is written under a hidden temp name and renamed into place, then
its completion (rows, bytes, sha256) is recorded under `.progress/`, so a rerun skips finished shards and a
writer killed mid-shard leaves nothing that passes verification.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features

from pipeline.errors import DatasetError
from pipeline.faults import crash_point

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROGRESS_DIR = ".progress"
ROW_GROUP_BYTES = 32 * 2**20  # about 32 MiB of data per row group: a few image rows, a million scores
LIBRARIES = ("torch", "diffusers", "transformers", "datasets", "pyarrow", "ray", "open_clip_torch", "accelerate")


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class ShardRecord:
    file: str
    rows: int
    bytes: int
    sha256: str


def row_group_rows(table: pa.Table) -> int:
    """Rows per Parquet row group, sized by bytes so that column reads stay fast for any row width."""
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    return int(min(1_000_000, max(64, ROW_GROUP_BYTES // per_row)))


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding (ids, prompts, settings). Image bytes and noise arrays are unique per
    row: trying dictionaries on them made writes 2.5x slower."""
    return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_integer(f.type)]


def statistics_columns(schema: pa.Schema) -> list[str]:
    """Columns that get min/max statistics (ids, settings, scores: what readers filter on). Statistics over
    nested noise arrays cost a fifth of a shard's write time and serve no query."""
    return [f.name for f in schema if pa.types.is_primitive(f.type) or pa.types.is_string(f.type)]


class ShardWriter:
    """Streams tables into one shard as row groups; the shard appears (atomically) only on `commit`.

    Used as a context manager: leaving the block without a commit (an exception) removes the temp file, so a
    failed or killed writer never leaves a file under a shard's name.
    """

    def __init__(self, dataset_dir: Path, index: int, schema: pa.Schema):
        self.dataset_dir = Path(dataset_dir)
        self.final = self.dataset_dir / shard_name(index)
        self.tmp = self.dataset_dir / f".{self.final.name}.tmp-{uuid.uuid4().hex}"
        self.schema, self.rows = schema, 0
        self._writer = pq.ParquetWriter(
            self.tmp, schema, compression="snappy",  # zstd: 3.5x slower, about the same size here
            use_dictionary=dictionary_columns(schema), write_statistics=statistics_columns(schema),
        )

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table, row_group_size=row_group_rows(table))
        self.rows += table.num_rows
        crash_point(f"shard-writing:{self.final.name}")

    def commit(self) -> ShardRecord:
        self._writer.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        record = ShardRecord(self.final.name, self.rows, self.tmp.stat().st_size, sha256_file(self.tmp))
        os.replace(self.tmp, self.final)
        crash_point(f"shard-renamed:{self.final.name}")
        progress = self.dataset_dir / PROGRESS_DIR
        progress.mkdir(exist_ok=True)
        write_json_atomic(progress / f"{self.final.name}.json", asdict(record))
        return record

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tmp.exists():  # not committed
            self._writer.close()
            self.tmp.unlink(missing_ok=True)


def write_shard(dataset_dir: Path, index: int, table: pa.Table) -> ShardRecord:
    """Write one shard atomically and record its completion. Safe to call from any worker process."""
    with ShardWriter(dataset_dir, index, table.schema) as writer:
        writer.write(table)
        return writer.commit()


def code_version() -> str:
    version = metadata.version("tauflow")
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version}+g{sha}" if sha else version


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class StageOutput:
    """The dataset a stage is writing: refuses to mix configurations, resumes, seals with the manifest."""

    def __init__(self, path: Path, *, kind: str, stage: str, config_hash: str, overwrite: bool = False):
        self.path = Path(path)
        self.kind, self.stage, self.config_hash = kind, stage, config_hash
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / PROGRESS_DIR).mkdir(exist_ok=True)
        plan = self.path / PROGRESS_DIR / "plan.json"
        if plan.exists() and not any(self.path.glob("part-*.parquet")):
            plan.unlink()  # a start that wrote nothing (a bad model path, a typo) must not block the corrected rerun
        if plan.exists():
            started = json.loads(plan.read_text())["config_hash"]
            if started != config_hash:
                raise DatasetError(
                    f"{self.path}: this dataset was started with a different configuration "
                    f"(hash {started[:12]}, now {config_hash[:12]}); rerun with --overwrite to replace it"
                )
        elif any(self.path.glob("part-*.parquet")):
            raise DatasetError(f"{self.path}: holds shards of unknown origin; rerun with --overwrite to replace them")
        else:
            write_json_atomic(plan, {"config_hash": config_hash, "kind": kind, "stage": stage})
        for stale in [*self.path.glob(".part-*.tmp-*"), *(self.path / PROGRESS_DIR).glob("attempts-*")]:
            stale.unlink(missing_ok=True)

    @property
    def complete(self) -> bool:
        return (self.path / MANIFEST_NAME).exists()

    def completed(self) -> dict[int, ShardRecord]:
        """Shards whose completion was recorded and whose file is still there, byte for byte."""
        done = {}
        for rec_file in (self.path / PROGRESS_DIR).glob("part-*.parquet.json"):
            record = ShardRecord(**json.loads(rec_file.read_text()))
            shard = self.path / record.file
            # the recorded sha256, not just the size: a shard changed after its record must be redone
            if shard.exists() and shard.stat().st_size == record.bytes and sha256_file(shard) == record.sha256:
                done[int(record.file[5:10])] = record
        return done

    def pending(self, num_shards: int) -> list[int]:
        done = self.completed()
        return [i for i in range(num_shards) if i not in done]

    def write(self, index: int, table: pa.Table) -> ShardRecord:
        return write_shard(self.path, index, table)

    def finalize(
        self,
        *,
        num_shards: int,
        features: Features,
        config: dict[str, Any],
        inputs: list[Path] = (),
        stats: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Check every planned shard is there, then write manifest.json (last, atomically)."""
        done = self.completed()
        missing = [shard_name(i) for i in range(num_shards) if i not in done]
        if missing:
            raise DatasetError(f"{self.path}: cannot seal the dataset, shards missing: {missing[:5]}")
        shards = [asdict(done[i]) for i in range(num_shards)]
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "stage": self.stage,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": config,
            "config_hash": self.config_hash,
            "code_version": code_version(),
            "libraries": library_versions(),
            "inputs": [{"path": str(p), "manifest_sha256": sha256_file(Path(p) / MANIFEST_NAME)} for p in inputs],
            "num_rows": sum(s["rows"] for s in shards),
            "shards": shards,
            "features": features.to_dict(),
            "stats": stats or {},
        }
        write_json_atomic(self.path / MANIFEST_NAME, manifest)
        return manifest


def _swap_names(target: Path) -> tuple[Path, Path]:
    return target.with_name(target.name + ".adding"), target.with_name(f".{target.name}.old")


def replace_dataset(target: Path) -> None:
    """Swap the complete dataset `<target>.adding` in for `target`. Two renames cannot be one atomic step, so
    the names are fixed and `finish_replace` completes or undoes a swap that a crash cut in half."""
    new, old = _swap_names(target)
    os.replace(target, old)
    crash_point(f"dataset-swapping:{target.name}")
    os.replace(new, target)
    shutil.rmtree(old)


def finish_replace(target: Path) -> None:
    """Complete a `replace_dataset` interrupted by a crash: afterwards `target` exists (the new dataset if it was
    complete, else the old one) and no `.old` copy is left."""
    new, old = _swap_names(target)
    if not old.exists():
        return
    if not target.exists():
        os.replace(new if (new / MANIFEST_NAME).exists() else old, target)
    shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class Dataset:
    """A complete dataset directory, opened through its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def features(self) -> Features:
        return Features.from_dict(self.manifest["features"])

    @property
    def num_rows(self) -> int:
        return self.manifest["num_rows"]

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest["shards"]]

    @property
    def stats(self) -> dict[str, Any]:
        return self.manifest.get("stats", {})

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """All shards as one table (only `columns` if given), each shard's schema checked."""
        return pa.concat_tables([self.read_shard(i, columns) for i in range(len(self.shard_paths))])

    def read_shard(self, index: int, columns: list[str] | None = None) -> pa.Table:
        path = self.shard_paths[index]
        expected = self.features.arrow_schema
        if columns:
            unknown = [c for c in columns if c not in expected.names]
            if unknown:
                raise DatasetError(f"{self.path}: no column {unknown} in this {self.kind} dataset ({expected.names})")
        try:
            table = pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError) as err:
            raise DatasetError(f"{path}: cannot read shard: {err}") from None
        for field in table.schema:
            want = expected.field(field.name).type
            if not field.type.equals(want) and not field.type.equals(getattr(want, "storage_type", want)):
                raise DatasetError(f"{path}: column '{field.name}' has type {field.type}, expected {want}")
        return table


def _manifest_fields(manifest: Any, where: Path) -> None:
    """The fields every reader relies on, with their types; one clear line for the first that is wrong."""
    if not isinstance(manifest, dict):
        raise DatasetError(f"{where}: not a valid dataset manifest (a JSON object is expected)")
    expected = {"kind": str, "shards": list, "features": dict, "num_rows": int}
    for key, kind in expected.items():
        if key not in manifest:
            raise DatasetError(f"{where}: not a valid dataset manifest: '{key}' is missing")
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            raise DatasetError(f"{where}: '{key}' must be a {kind.__name__}, got {type(manifest[key]).__name__}")
    fields = {"file": str, "rows": int, "bytes": int, "sha256": str}
    for n, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or any(not isinstance(shard.get(k), t) for k, t in fields.items()):
            raise DatasetError(f"{where}: shards[{n}] must have file (str), rows, bytes (int) and sha256 (str), got {shard!r}")


def _check_shard_list(path: Path, manifest: dict[str, Any]) -> None:
    """The shard list names part-00000 ... part-(N-1) once each, every file there is listed, and the rows add up."""
    where = path / MANIFEST_NAME
    listed = [s["file"] for s in manifest["shards"]]
    expected = [shard_name(i) for i in range(len(listed))]
    if listed != expected:
        repeated = sorted({f for f in listed if listed.count(f) > 1})
        detail = f"repeated {repeated}" if repeated else f"expected {expected[:3]}{'...' if len(expected) > 3 else ''}"
        raise DatasetError(f"{where}: the shard list is not part-00000 ... in order ({detail}, got {listed[:5]})")
    extra = sorted(p.name for p in path.glob("part-*.parquet") if p.name not in set(listed))
    if extra:
        raise DatasetError(f"{where}: shards on disk that the manifest does not list: {extra[:5]}")
    total = sum(s["rows"] for s in manifest["shards"])
    if total != manifest["num_rows"]:
        raise DatasetError(f"{where}: num_rows is {manifest['num_rows']} but the shards hold {total} rows")


def open_dataset(path: str | Path, *, kind: str | tuple[str, ...] | None = None, verify: bool = False) -> Dataset:
    """Open a complete dataset, checking its shard list against the files. `verify` also re-hashes every shard
    and checks its rows and schema against the manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise DatasetError(f"{path}: no such dataset directory")
    if not manifest_path.exists():
        raise DatasetError(f"{manifest_path}: missing: the dataset is incomplete (its stage has not finished)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{manifest_path}: not a valid dataset manifest ({err})") from None
    _manifest_fields(manifest, manifest_path)
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and manifest["kind"] not in kinds:
        raise DatasetError(f"{path}: is a '{manifest['kind']}' dataset, expected {' or '.join(kinds)}")
    _check_shard_list(path, manifest)
    dataset = Dataset(path, manifest)
    try:
        schema = dataset.features.arrow_schema
    except Exception as err:  # datasets raises several types for a malformed features dict
        raise DatasetError(f"{manifest_path}: 'features' is not a valid feature description ({err})") from None
    for shard in manifest["shards"]:
        file = path / shard["file"]
        if not file.exists():
            raise DatasetError(f"{file}: shard listed in the manifest is missing")
        size = file.stat().st_size
        if size != shard["bytes"]:
            raise DatasetError(f"{file}: size {size} bytes, manifest says {shard['bytes']} (truncated or replaced)")
        if verify:
            digest = sha256_file(file)
            if digest != shard["sha256"]:
                raise DatasetError(f"{file}: sha256 {digest[:16]}… does not match the manifest's {shard['sha256'][:16]}…")
            try:
                meta = pq.ParquetFile(file)
            except (pa.ArrowException, OSError) as err:
                raise DatasetError(f"{file}: not a readable Parquet file: {err}") from None
            if meta.metadata.num_rows != shard["rows"]:
                raise DatasetError(f"{file}: {meta.metadata.num_rows} rows, manifest says {shard['rows']}")
            if meta.schema_arrow.names != schema.names:
                missing = [c for c in meta.schema_arrow.names if c not in schema.names]
                unknown = [c for c in schema.names if c not in meta.schema_arrow.names]
                raise DatasetError(f"{file}: columns do not match the manifest's features "
                                   f"(in the shard only: {missing}, in the manifest only: {unknown})")
    return dataset
