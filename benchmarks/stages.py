"""One benchmark per stage. Each returns a flat dict of figures; ratios are stage / bare baseline."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import child, ratio, timed, timed_pair


def _generate_manifest(tmp: Path, steps: int, size: int, batch: int, prompts: int, executor: str = "local",
                       per_shard: int = 2) -> Path:
    import yaml
    from tests.tiny_models import save_tiny

    model = tmp / "model"
    if not model.exists():
        save_tiny("sd3", model)
    (tmp / "prompts.txt").write_text("\n".join(f"a photo of object {i}" for i in range(prompts)) + "\n")
    data = {
        "run": {"name": "bench", "output_dir": str(tmp / f"out-{executor}"), "executor": executor},
        "generate": {"model": str(model), "prompts": str(tmp / "prompts.txt"), "images_per_prompt": batch,
                     "num_inference_steps": steps, "height": size, "width": size, "batch_size": batch,
                     "prompts_per_shard": per_shard, "num_workers": 2, "cpus_per_worker": 1},
    }
    path = tmp / f"{executor}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def bench_generate(tmp: Path) -> dict:
    """Stage worker (unit -> PNG shard, as each Ray actor runs it) vs a bare loop over the same pipeline calls."""
    import torch

    from pipeline.config import load_manifest
    from pipeline.generate import GenerateWorker, plan_units
    from pipeline.prompts import load_prompts
    from pipeline.seeds import prior_noise, sample_seed

    torch.set_num_threads(1)
    manifest = load_manifest(_generate_manifest(tmp, steps=30, size=64, batch=8, prompts=4))
    cfg = manifest.generate
    out = tmp / "gen-shards"
    out.mkdir()
    (out / ".progress").mkdir()
    worker = GenerateWorker(cfg.model_dump(mode="json"), 0, str(out))  # model load excluded from both timings
    prompts, _ = load_prompts(cfg.prompts)
    units = plan_units(prompts, cfg.prompts_per_shard)
    pipe, family = worker.generator.pipe, worker.generator.family

    def bare():
        for p in prompts:
            seeds = [sample_seed(0, p.prompt_id, i) for i in range(cfg.images_per_prompt)]
            noise = torch.stack([prior_noise(s, family.noise_shape) for s in seeds]).float()
            pipe(prompt=[p.text] * len(seeds), num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                 height=cfg.height, width=cfg.width, latents=noise, output_type="pil")

    def stage():
        for u in units:
            worker.process(u)

    images = len(prompts) * cfg.images_per_prompt
    t_stage, t_bare = timed_pair(stage, bare)
    return {"images": images, "batch_seconds_bare": t_bare["median"] / len(prompts),
            "bare_images_per_s": images / t_bare["median"], "stage_images_per_s": images / t_stage["median"],
            "ratio": ratio(t_stage, t_bare)}


def decode_rates(rewards: list, batches, images: int, threads: int) -> dict:
    """Images/s of decode + preprocessing alone (the bank's `prepare`, no forward pass) on one thread and on
    `threads`: what the score stage's decode pool gains."""
    from rewards.bank import RewardBank

    out = {}
    for n in sorted({1, threads}):
        bank = RewardBank([], "cpu", one_at_a_time=True, threads=n)  # loads nothing: only its decode pool
        t = timed(lambda b=bank: [b.prepare(ims, prompts, rewards) for ims, prompts in batches()], 2)
        out[f"decode_preprocess_images_per_s_{n}_thread{'s' if n > 1 else ''}"] = images / t["median"]
    return out


def bench_score(tmp: Path) -> dict:
    """Score worker (decode on its thread a batch ahead, shared preprocessing, shard write) vs a bare loop over
    the same rewards; and decode + preprocessing alone on one thread and on every CPU."""
    import torch

    from pipeline.config import RewardSpec, load_manifest
    from pipeline.generate import run_generate
    from pipeline.score import ScoreWorker, decode_images
    from pipeline.shards import open_dataset
    from rewards.bank import RewardBank, available_cpus
    from tests.tiny_rewards import reward_specs

    torch.set_num_threads(1)
    manifest = load_manifest(_generate_manifest(tmp, steps=2, size=64, batch=8, prompts=64, per_shard=16))
    samples = open_dataset(run_generate(manifest))  # 4 shards of 128 rows
    specs = [RewardSpec(name=k, **v) for k, v in reward_specs(tmp / "rewards").items()]
    out = tmp / "scored-shards"
    (out / ".progress").mkdir(parents=True)
    worker = ScoreWorker([s.model_dump(mode="json") for s in specs], str(samples.path), str(out), 32, "cpu", False, 1)
    bank = RewardBank(specs)
    tables = [samples.read_shard(i) for i in range(len(samples.shard_paths))]
    per_reward = {}

    def bare():
        for t in tables:
            for lo in range(0, t.num_rows, 32):
                part = t.slice(lo, 32)
                images, prompts = decode_images(part["image"]), part["prompt"].to_pylist()
                for reward in bank.loaded.values():
                    reward.score(images, prompts)

    def stage():
        for i in range(len(tables)):
            worker.process({"unit": i})

    for name, reward in bank.loaded.items():
        images = [im for t in tables for im in decode_images(t["image"])]
        prompts = [p for t in tables for p in t["prompt"].to_pylist()]
        t = timed(lambda r=reward: [r.score(images[i:i + 32], prompts[i:i + 32]) for i in range(0, len(images), 32)], 2)
        per_reward[f"{name}_images_per_s"] = len(images) / t["median"]
    n = samples.num_rows
    t_stage, t_bare = timed_pair(stage, bare)

    def batches():
        for t in tables:
            for lo in range(0, t.num_rows, 32):
                yield decode_images(t["image"].slice(lo, 32)), t["prompt"].slice(lo, 32).to_pylist()

    return {"images": n, "rewards": len(specs), "bare_images_per_s": n / t_bare["median"],
            "stage_images_per_s": n / t_stage["median"], "ratio": ratio(t_stage, t_bare), **per_reward,
            **decode_rates(list(bank.loaded.values()), batches, n, available_cpus())}


WRITE_SCORES = """
import numpy as np, pyarrow as pa, sys
from datasets import Features, Value
from pipeline.shards import StageOutput
path, rows, per, prompts = sys.argv[1], int(sys.argv[2]), 1_000_000, int(sys.argv[3])
feats = Features({"prompt_id": Value("string"), "score_r": Value("float32")} if prompts else {"score_r": Value("float32")})
out = StageOutput(path, kind="scored", stage="bench", config_hash="bench")
rng = np.random.default_rng(0)
for i in range(rows // per):
    cols = {"score_r": pa.array(rng.random(per, dtype=np.float32))}
    if prompts:
        ids = np.arange(i * per, (i + 1) * per) // 8
        cols = {"prompt_id": pa.array(ids.astype(str)), **cols}
    out.write(i, pa.table(cols, schema=feats.arrow_schema))
out.finalize(num_shards=rows // per, features=feats, config={})
"""

TAU_STAGE = """
import json, sys, time
from pipeline.config import ThresholdSection
from pipeline.shards import open_dataset
from pipeline.threshold import global_tau, read_scores, row_taus, score_rule
cfg = ThresholdSection(reward="r", mode=sys.argv[2])
start = time.perf_counter()
ds = open_dataset(sys.argv[1])
rule = score_rule(cfg, ds)
shards = read_scores(ds, rule, cfg, cfg.mode != "global")
tau = global_tau(shards, cfg.percentile, "bench")
taus = row_taus(shards, cfg, tau, "bench")
print(json.dumps({"seconds": time.perf_counter() - start, "tau": tau}))
"""

TAU_BARE = """
import json, sys, time, glob, numpy as np, pyarrow.parquet as pq, pyarrow as pa
start = time.perf_counter()
col = pa.concat_arrays([c for f in sorted(glob.glob(sys.argv[1] + "/part-*.parquet")) for c in pq.read_table(f, columns=["score_r"])["score_r"].chunks])
tau = float(np.percentile(col.to_numpy(), 50))
print(json.dumps({"seconds": time.perf_counter() - start, "tau": tau}))
"""


def _write_scores(path: Path, rows: int, prompts: bool) -> None:
    import subprocess
    import sys

    from benchmarks.common import ROOT

    subprocess.run([sys.executable, "-c", WRITE_SCORES, str(path), str(rows), str(int(prompts))], check=True, cwd=ROOT)


def bench_threshold(tmp: Path, sizes: tuple[int, ...] = (10_000_000, 100_000_000)) -> dict:
    """Exact tau read from Parquet (score column only) in a fresh process: seconds and peak RSS."""
    out = {}
    for rows in sizes:
        path = tmp / f"scores-{rows}"
        _write_scores(path, rows, prompts=False)
        stage = [child(TAU_STAGE.replace("sys.argv[1]", repr(str(path))).replace("sys.argv[2]", "'global'")) for _ in range(3)]
        bare = [child(TAU_BARE.replace("sys.argv[1]", repr(str(path)))) for _ in range(3)]
        assert stage[0]["tau"] == bare[0]["tau"]
        s = sorted(r["seconds"] for r in stage)
        b = sorted(r["seconds"] for r in bare)
        tag = f"{rows // 1_000_000}M"
        out[f"global_{tag}_seconds"] = s[1]
        out[f"global_{tag}_rows_per_s"] = rows / s[1]
        out[f"global_{tag}_peak_rss_mib"] = max(r["peak_rss_mib"] for r in stage)
        out[f"global_{tag}_ratio_vs_numpy"] = {"median": s[1] / b[1], "min": s[0] / b[2], "max": s[2] / b[0]}
        import shutil

        shutil.rmtree(path)
    path = tmp / "scores-prompts"
    _write_scores(path, sizes[0], prompts=True)
    r = child(TAU_STAGE.replace("sys.argv[1]", repr(str(path))).replace("sys.argv[2]", "'per_prompt'"))
    out["per_prompt_10M_seconds"], out["per_prompt_10M_peak_rss_mib"] = r["seconds"], r["peak_rss_mib"]
    return out


PAIR_CORE = """
import json, sys, time, numpy as np
from pipeline.config import PairSection
from pipeline.groups import Groups, check_prompts_unique_across
from pipeline.pair import choose_pairs, pair_id
from pipeline.shards import open_dataset
cfg = PairSection(reward="r", strategy="best_worst")
start = time.perf_counter()
ds = open_dataset(sys.argv[1])
pairs, ids = 0, []
for i in range(len(ds.shard_paths)):
    t = ds.read_shard(i, ["prompt_id", "score_r"])
    g = Groups.of(t["prompt_id"])
    ids.append(g.prompt_ids)
    s = t["score_r"].to_numpy()
    w, l = choose_pairs(s, g, cfg)
    keep = (s[w] - s[l]) > 0
    pid = np.asarray(t["prompt_id"])
    [pair_id(a, b) for a, b in zip(pid[w[keep]], pid[l[keep]])]
    pairs += int(keep.sum())
check_prompts_unique_across(ids, "bench")
print(json.dumps({"seconds": time.perf_counter() - start, "pairs": pairs}))
"""


def bench_pair(tmp: Path, rows: int = 10_000_000) -> dict:
    """Grouping, best/worst choice, gap filter and pair ids over 10 M samples (K = 8), streamed per shard."""
    path = tmp / "pair-scores"
    _write_scores(path, rows, prompts=True)
    runs = [child(PAIR_CORE.replace("sys.argv[1]", repr(str(path)))) for _ in range(3)]
    secs = sorted(r["seconds"] for r in runs)
    return {"rows": rows, "pairs": runs[0]["pairs"], "seconds": secs[1], "rows_per_s": rows / secs[1],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "seconds_min_max": [secs[0], secs[2]]}


def bench_io(tmp: Path, rows: int = 4000) -> dict:
    """Samples shards through tauflow (atomic write + sha256 + fsync; read with schema checks, and verified)
    vs raw pyarrow.parquet.write_table / read_table of the same table."""
    import pyarrow.parquet as pq
    from datasets import Features
    from tests.synthetic import samples_table

    from pipeline.shards import StageOutput, open_dataset

    table, _ = samples_table(rows)
    mb = table.nbytes / 2**20
    n = [0]

    def ours_write():
        n[0] += 1
        out = StageOutput(tmp / f"io-{n[0]}", kind="samples", stage="bench", config_hash="h")
        out.write(0, table)
        out.finalize(num_shards=1, features=Features.from_arrow_schema(table.schema), config={})

    t_w = timed(ours_write)
    t_raw_w = timed(lambda: pq.write_table(table, tmp / "raw.parquet"))
    path = tmp / "io-1"
    t_r = timed(lambda: open_dataset(path).read())
    t_rv = timed(lambda: open_dataset(path, verify=True).read())
    t_raw_r = timed(lambda: pq.read_table(tmp / "raw.parquet"))
    return {"table_mib": mb, "write_mib_per_s": mb / t_w["median"], "raw_write_mib_per_s": mb / t_raw_w["median"],
            "write_ratio_throughput": t_raw_w["median"] / t_w["median"],
            "read_mib_per_s": mb / t_r["median"], "raw_read_mib_per_s": mb / t_raw_r["median"],
            "read_ratio_throughput": t_raw_r["median"] / t_r["median"],
            "read_verified_ratio_throughput": t_raw_r["median"] / t_rv["median"]}
