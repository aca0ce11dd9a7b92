"""Pair stage: winner/loser pairs per prompt for PNAPO and Diffusion-DPO, each carrying both prior noises.

Strategies over a prompt's K scored samples (ties broken by sample order):
  best_worst    the highest against the lowest score (one pair per prompt);
  all           every ordered pair (i, j) with s_i > s_j;
  top_bottom_k  each of the k highest against each of the k lowest (k*k pairs, k <= K/2).
A pair whose gap s_w - s_l is below `min_gap`, or zero (a tie), is dropped and counted.

`pair.external` imports a paired dataset without prior noise (e.g. Pick-a-Pic: jpg_0, jpg_1, label_0,
caption); ties (label 0.5) are dropped. Such pairs suit Diffusion-DPO; PNAPO refuses them (no noise).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import ExternalPairs, Manifest, PairSection
from pipeline.errors import StageError
from pipeline.groups import Groups, check_prompts_unique_across
from pipeline.schema import pairs_features, score_column
from pipeline.shards import Dataset, StageOutput, open_dataset
from pipeline.stage import Pair, Written

EXTERNAL_ROWS_PER_SHARD = 4096


def pair_id(winner: str, loser: str) -> str:
    return hashlib.blake2b(f"{winner}>{loser}".encode(), digest_size=8).hexdigest()


def choose_pairs(scores: np.ndarray, groups: Groups, cfg: PairSection) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of winners and losers, prompt by prompt, before the gap filter."""
    order, offsets = groups.sorted_by(-scores)  # descending score within each group, stable on row order
    if cfg.strategy == "best_worst":  # vectorised: first and last row of every group of two or more
        multi = np.diff(offsets) >= 2
        return order[offsets[:-1][multi]], order[offsets[1:][multi] - 1]
    winners, losers = [], []
    for g in range(groups.count):
        rows = order[offsets[g] : offsets[g + 1]]
        n = len(rows)
        if n < 2:
            continue
        if cfg.strategy == "top_bottom_k":
            k = min(cfg.k, n // 2)
            w, l = np.repeat(rows[:k], k), np.tile(rows[n - k :], k)
        else:
            i, j = np.triu_indices(n, k=1)
            w, l = rows[i], rows[j]
        winners.append(w)
        losers.append(l)
    if not winners:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(winners), np.concatenate(losers)


def pair_table(table: pa.Table, w: np.ndarray, l: np.ndarray, scores: np.ndarray, features) -> pa.Table:
    wt, lt = table.take(pa.array(w)), table.take(pa.array(l))
    cols: dict[str, Any] = {
        "pair_id": [pair_id(a, b) for a, b in zip(wt["sample_id"].to_pylist(), lt["sample_id"].to_pylist(), strict=True)],
        "prompt_id": wt["prompt_id"],
        "prompt": wt["prompt"],
        "winner_id": wt["sample_id"],
        "loser_id": lt["sample_id"],
        "winner_image": wt["image"],
        "loser_image": lt["image"],
    }
    if "winner_noise" in features:
        cols["winner_noise"], cols["loser_noise"] = wt["noise"], lt["noise"]
        cols["winner_latent"], cols["loser_latent"] = wt["latent"], lt["latent"]
    cols.update(
        winner_seed=wt["seed"], loser_seed=lt["seed"],
        winner_score=pa.array(scores[w]), loser_score=pa.array(scores[l]), gap=pa.array(scores[w] - scores[l]),
    )
    return pa.table(cols, schema=features.arrow_schema)


def _score_of(cfg: PairSection, manifest: Manifest, ds: Dataset) -> str:
    if cfg.reward is not None:
        column = score_column(cfg.reward)
    elif ds.kind == "labeled":
        column = "score"
    elif manifest.threshold is not None and manifest.threshold.reward is not None:
        column = score_column(manifest.threshold.reward)
    else:
        raise StageError(f"{manifest.source}: pair.reward: name the reward to pair on")
    if column not in ds.features:
        have = [c for c in ds.features if c.startswith("score")]
        raise StageError(f"{ds.path}: no score column '{column}'; this dataset has {have}")
    return column


def run_pair(manifest: Manifest, *, overwrite: bool = False) -> Path:
    """The pair stage (pipeline.stage.Pair): skipped when complete."""
    return Pair(manifest).execute(overwrite=overwrite)


def write_pairs(stage: Pair, out: StageOutput) -> Written:
    """Pairs of every prompt's samples, shard by shard, from the stage's input (labeled or scored)."""
    cfg, manifest = stage.cfg, stage.manifest
    (source,) = stage.inputs()
    src = open_dataset(source.path, kind=source.kinds, verify=True)
    column = _score_of(cfg, manifest, src)
    features = pairs_features(src.features.get("noise"))
    ids, gaps = [], []
    counts = {"candidates": 0, "ties": 0, "below_min_gap": 0, "single_sample_prompts": 0}
    for i in range(len(src.shard_paths)):
        table = src.read_shard(i)
        scores = table[column].to_numpy().astype(np.float32)
        if not np.isfinite(scores).all():
            bad = np.asarray(table["sample_id"])[~np.isfinite(scores)][:5].tolist()
            raise StageError(f"{src.shard_paths[i]}: NaN/inf in '{column}' (sample ids {bad})")
        groups = Groups.of(table["prompt_id"])
        ids.append(groups.prompt_ids)
        counts["single_sample_prompts"] += int((groups.sizes < 2).sum())
        w, l = choose_pairs(scores, groups, cfg)
        gap = scores[w] - scores[l]
        counts["candidates"] += len(w)
        counts["ties"] += int((gap <= 0).sum())
        counts["below_min_gap"] += int(((gap > 0) & (gap < cfg.min_gap)).sum())
        keep = (gap > 0) & (gap >= cfg.min_gap)
        out.write(i, pair_table(table, w[keep], l[keep], scores, features))
        gaps.append(gap[keep])
    check_prompts_unique_across(ids, str(src.path))
    gap_all = np.concatenate(gaps)
    if not len(gap_all):
        raise StageError(f"{src.path}: no pairs survived (ties {counts['ties']}, below min_gap {counts['below_min_gap']})")
    stats = {
        "score_column": column, "strategy": cfg.strategy, "min_gap": cfg.min_gap, "pairs": int(len(gap_all)), **counts,
        "gap_quantiles": dict(zip(["min", "p25", "p50", "p75", "max"], np.quantile(gap_all, [0, 0.25, 0.5, 0.75, 1]).tolist())),
        "has_noise": "winner_noise" in features,
    }
    return Written(len(src.shard_paths), features, stats)


def _read_external(path: Path):
    import datasets

    if path.is_dir():
        return datasets.load_from_disk(str(path))
    kind = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}.get(path.suffix.lower())
    if kind is None:
        raise StageError(f"{path}: unsupported paired-dataset file (use .parquet, .jsonl, .csv or a HF dataset dir)")
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def _image_bytes(value: Any, where: str) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"]
    if hasattr(value, "save"):  # a decoded PIL image
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise StageError(f"{where}: expected image bytes, got {type(value).__name__}")


def import_external(cfg: ExternalPairs, out: StageOutput) -> Written:
    """Pairs from an external preference dataset (no prior noise): label_0 = 1 means image_0 won."""
    cols = cfg.columns
    src = _read_external(Path(cfg.path))
    missing = [c for c in cols.values() if c not in src.column_names]
    if missing:
        raise StageError(f"{cfg.path}: columns {missing} not found (has {src.column_names}); set pair.external.columns")
    features = pairs_features(None)
    rows, ties, shard = [], 0, 0
    for n, ex in enumerate(src):
        label = float(ex[cols["label_0"]])
        if label == 0.5:
            ties += 1
            continue
        if label not in (0.0, 1.0):
            raise StageError(f"{cfg.path}: row {n}: {cols['label_0']} must be 0, 0.5 or 1, got {label}")
        where = f"{cfg.path}: row {n}"
        images = [_image_bytes(ex[cols["image_0"]], where), _image_bytes(ex[cols["image_1"]], where)]
        win = 0 if label == 1.0 else 1
        prompt = str(ex[cols["prompt"]])
        ids = [f"ext-{n}-0", f"ext-{n}-1"]
        rows.append({
            "pair_id": pair_id(ids[win], ids[1 - win]), "prompt_id": hashlib.sha256(prompt.encode()).hexdigest()[:16],
            "prompt": prompt, "winner_id": ids[win], "loser_id": ids[1 - win],
            "winner_image": {"bytes": images[win], "path": None}, "loser_image": {"bytes": images[1 - win], "path": None},
            "winner_seed": None, "loser_seed": None, "winner_score": 1.0, "loser_score": 0.0, "gap": 1.0,
        })
        if len(rows) == EXTERNAL_ROWS_PER_SHARD:
            out.write(shard, pa.Table.from_pylist(rows, schema=features.arrow_schema))
            rows, shard = [], shard + 1
    if rows or shard == 0:
        out.write(shard, pa.Table.from_pylist(rows, schema=features.arrow_schema))
        shard += 1
    kept = len(src) - ties
    return Written(shard, features, {"source": str(cfg.path), "rows": len(src), "pairs": kept, "ties": ties, "has_noise": False})
