"""Threshold stage: the TGO dataset. Scores become labels l = 1[s >= tau] and weights w = 1 + c * |s - tau|.

tau is the exact p-th percentile (numpy's linear method) of the score:
  global      one tau over the whole dataset (the TGO paper's rule);
  per_prompt  tau(x) from prompt x's own K samples;
  shrunk      (K / (K + k0)) * tau(x) + (k0 / (K + k0)) * tau_global: per-prompt thresholds pulled toward the
              global one, since the optimal baseline depends on the prompt but K samples estimate it noisily.
With `normalize_gap`, |s - tau| is divided by the score's standard deviation, so that c means the same for
rewards on different scales. A score equal to tau gets label 1 and weight 1 (counted as a tie).

The score is one reward's column or a composite: the weighted sum of per-reward normalised scores (z-score,
or rank = the empirical CDF), fitted on this dataset or on `composite.reference`. Only the score columns (and
prompt ids, for per-prompt modes) are read to find tau; rows are labelled shard by shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import Manifest, ThresholdSection
from pipeline.errors import StageError
from pipeline.groups import Groups, check_prompts_unique_across, group_percentile
from pipeline.schema import labeled_features, score_column
from pipeline.shards import Dataset, StageOutput, open_dataset, write_json_atomic
from pipeline.stage import Threshold, Written

THRESHOLDS_FILE = "thresholds.json"


@dataclass(frozen=True)
class ScoreRule:
    """How the thresholded score is computed from a dataset's score columns."""

    weights: dict[str, float]  # reward -> weight; a single reward is {name: 1.0} with no normalisation
    normalize: str | None  # None, "zscore" or "rank"
    fit: dict[str, np.ndarray]  # zscore: [mean, std]; rank: the sorted reference scores

    @property
    def columns(self) -> list[str]:
        return [score_column(r) for r in self.weights]

    def apply(self, table: pa.Table) -> np.ndarray:
        if self.normalize is None:
            (reward,) = self.weights
            return table[score_column(reward)].to_numpy().astype(np.float32)
        total = np.zeros(table.num_rows, dtype=np.float64)
        for reward, weight in self.weights.items():
            s = table[score_column(reward)].to_numpy().astype(np.float64)
            if self.normalize == "zscore":
                mean, std = self.fit[reward]
                s = (s - mean) / std
            else:
                ref = self.fit[reward]
                s = np.searchsorted(ref, s, side="right") / len(ref)
            total += weight * s
        return total.astype(np.float32)

    def describe(self) -> dict[str, Any]:
        fit = {r: [float(v[0]), float(v[1])] for r, v in self.fit.items()} if self.normalize == "zscore" else {}
        return {"weights": self.weights, "normalize": self.normalize, "zscore_fit": fit}


def _require_columns(ds: Dataset, columns: list[str]) -> None:
    missing = [c for c in columns if c not in ds.features]
    if missing:
        have = [c for c in ds.features if c.startswith("score_")]
        raise StageError(f"{ds.path}: no score column {missing}; this dataset has {have} (score it first)")


def score_rule(cfg: ThresholdSection, ds: Dataset) -> ScoreRule:
    if cfg.reward is not None:
        rule = ScoreRule({cfg.reward: 1.0}, None, {})
        _require_columns(ds, rule.columns)
        return rule
    comp = cfg.composite
    reference = open_dataset(comp.reference, kind=("scored", "labeled"), verify=True) if comp.reference else ds
    columns = [score_column(r) for r in comp.weights]
    _require_columns(ds, columns)
    _require_columns(reference, columns)
    table = reference.read(columns)
    fit = {}
    for reward in comp.weights:
        s = table[score_column(reward)].to_numpy().astype(np.float64)
        s = s[np.isfinite(s)]
        if not len(s):
            raise StageError(f"{reference.path}: reward '{reward}' has no finite scores to fit the composite on")
        if comp.normalize == "zscore":
            std = s.std()
            fit[reward] = np.array([s.mean(), std if std > 0 else 1.0])
        else:
            fit[reward] = np.sort(s)
    return ScoreRule(dict(comp.weights), comp.normalize, fit)


@dataclass
class ShardScores:
    scores: np.ndarray
    keep: np.ndarray  # rows with a finite score
    groups: Groups | None


def read_scores(ds: Dataset, rule: ScoreRule, cfg: ThresholdSection, per_prompt: bool) -> list[ShardScores]:
    out = []
    for i in range(len(ds.shard_paths)):
        table = ds.read_shard(i, rule.columns + (["prompt_id"] if per_prompt else []))  # only what tau needs
        scores = rule.apply(table)
        keep = np.isfinite(scores)
        if not keep.all() and cfg.nan_policy == "error":
            bad = np.asarray(ds.read_shard(i, ["sample_id"])["sample_id"])[~keep][:5].tolist()
            raise StageError(
                f"{ds.shard_paths[i]}: {int((~keep).sum())} rows have a NaN/inf score (sample ids {bad}); "
                "set threshold.nan_policy=drop to drop them"
            )
        groups = Groups.of(table["prompt_id"].filter(pa.array(keep))) if per_prompt else None
        out.append(ShardScores(scores, keep, groups))
    return out


def global_tau(shards: list[ShardScores], p: float, where: str) -> float:
    finite = np.concatenate([s.scores[s.keep] for s in shards])
    if not len(finite):
        raise StageError(f"{where}: no finite scores to threshold")
    return float(np.percentile(finite, p))


def row_taus(shards: list[ShardScores], cfg: ThresholdSection, tau_g: float, where: str) -> list[np.ndarray]:
    """tau for every kept row of every shard, by mode."""
    if cfg.mode == "global":
        return [np.full(int(s.keep.sum()), tau_g, dtype=np.float32) for s in shards]
    check_prompts_unique_across([s.groups.prompt_ids for s in shards], where)
    taus = []
    for s in shards:
        sizes = s.groups.sizes
        if cfg.mode == "per_prompt" and (sizes < 2).any():
            lone = s.groups.prompt_ids[int(np.argmax(sizes < 2))].as_py()
            raise StageError(f"{where}: per_prompt thresholds need >= 2 samples per prompt; prompt {lone!r} has 1")
        tau_x = group_percentile(s.scores[s.keep], s.groups, cfg.percentile).astype(np.float64)
        if cfg.mode == "shrunk":
            k = sizes.astype(np.float64)
            tau_x = (k / (k + cfg.k0)) * tau_x + (cfg.k0 / (k + cfg.k0)) * tau_g
        taus.append(tau_x.astype(np.float32)[s.groups.codes])
    return taus


def label_shard(table: pa.Table, scores: np.ndarray, tau: np.ndarray, c: float, scale: float, features) -> pa.Table:
    label = (scores >= tau).astype(np.int8)
    weight = (1.0 + c * np.abs(scores.astype(np.float64) - tau) / scale).astype(np.float32)
    for name, values in (("score", scores), ("tau", tau), ("label", label), ("weight", weight)):
        table = table.append_column(name, pa.array(values))
    return table.cast(features.arrow_schema)


def load_tau_from(path: Path, rule: ScoreRule, cfg: ThresholdSection) -> float:
    """tau estimated on a proxy dataset (its thresholds.json), for a global threshold on a large dataset."""
    file = Path(path) / THRESHOLDS_FILE if Path(path).is_dir() else Path(path)
    try:
        saved = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StageError(f"{file}: cannot read thresholds ({err})") from None
    if cfg.mode != "global":
        raise StageError(f"threshold.tau_from: a proxy tau applies to mode 'global', not '{cfg.mode}'")
    if saved["score"]["weights"] != rule.weights or saved["score"]["normalize"] != rule.normalize:
        raise StageError(f"{file}: its tau is for score {saved['score']}, not for {rule.describe()}")
    if saved["percentile"] != cfg.percentile:
        raise StageError(f"{file}: its tau is the {saved['percentile']}th percentile, not the {cfg.percentile}th")
    return float(saved["tau_global"])


def plot_histograms(ds: Dataset, rule: ScoreRule, shards: list[ShardScores], tau_g: float, taus: list[np.ndarray], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.concatenate([s.scores[s.keep] for s in shards])
    row_tau = np.concatenate(taus)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(scores, bins=60, color="#4c72b0", alpha=0.8, label="score")
    if not np.all(row_tau == tau_g):
        ax.hist(row_tau, bins=60, color="#dd8452", alpha=0.5, label="per-prompt tau")
    ax.axvline(tau_g, color="#c44e52", lw=2, label=f"global tau = {tau_g:.4g}")
    name = "+".join(rule.weights) if rule.normalize else next(iter(rule.weights))
    ax.set_title(f"{ds.path.name}: {name}")
    ax.set_xlabel("score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    file = f"hist_{name.replace('+', '_')}.png"
    fig.savefig(out / file, dpi=100)
    plt.close(fig)
    return [file]


def run_threshold(manifest: Manifest, *, overwrite: bool = False) -> Path:
    """The threshold stage (pipeline.stage.Threshold): skipped when complete."""
    return Threshold(manifest).execute(overwrite=overwrite)


def write_labels(stage: Threshold, out: StageOutput) -> Written:
    """Find tau on the scored dataset, then label it shard by shard (with thresholds.json and histograms)."""
    cfg, out_path = stage.cfg, out.path
    src = open_dataset(stage.manifest.stage_dir("score"), kind="scored", verify=True)
    rule = score_rule(cfg, src)
    per_prompt = cfg.mode != "global"
    shards = read_scores(src, rule, cfg, per_prompt)
    where = str(src.path)
    tau_g = load_tau_from(cfg.tau_source, rule, cfg) if cfg.tau_source else global_tau(shards, cfg.percentile, where)
    taus = row_taus(shards, cfg, tau_g, where)
    kept = np.concatenate([s.scores[s.keep] for s in shards])
    if len(kept) and kept.min() == kept.max():  # every row would be a positive of weight 1: no signal to train on
        raise StageError(f"{where}: all {len(kept)} scores of {rule.describe()['weights']} equal {kept[0]:.6g}; "
                         "a threshold cannot separate them (check the reward)")
    scale = float(kept.std()) if cfg.normalize_gap else 1.0
    features = labeled_features(src.features)
    labels, weights, ties = [], [], 0
    for i, (s, tau) in enumerate(zip(shards, taus, strict=True)):
        table = src.read_shard(i).filter(pa.array(s.keep))
        labeled = label_shard(table, s.scores[s.keep], tau, cfg.c, scale, features)
        out.write(i, labeled)
        labels.append(labeled["label"].to_numpy())
        weights.append(labeled["weight"].to_numpy())
        ties += int(np.sum(s.scores[s.keep] == tau))
    labels_all, weights_all, taus_all = np.concatenate(labels), np.concatenate(weights), np.concatenate(taus)
    stats = {
        "score": rule.describe(),
        "mode": cfg.mode,
        "percentile": cfg.percentile,
        "tau_global": tau_g,
        "tau_source": str(cfg.tau_source) if cfg.tau_source else "this dataset",
        "tau_per_prompt_quantiles": np.quantile(taus_all, [0, 0.25, 0.5, 0.75, 1]).tolist() if per_prompt else None,
        "n": int(len(kept)),
        "dropped_nan": int(sum((~s.keep).sum() for s in shards)),
        "ties": ties,
        "positives": int(labels_all.sum()),
        "label_balance": float(labels_all.mean()),
        "c": cfg.c,
        "gap_scale": scale,
        "weight_quantiles": dict(zip(["min", "p25", "p50", "p75", "p95", "max"],
                                     np.quantile(weights_all, [0, 0.25, 0.5, 0.75, 0.95, 1]).tolist())),
    }
    stats["plots"] = plot_histograms(src, rule, shards, tau_g, taus, out_path)
    write_json_atomic(out_path / THRESHOLDS_FILE, stats)
    return Written(len(shards), features, stats)
