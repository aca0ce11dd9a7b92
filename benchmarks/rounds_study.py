"""Do rounds help? `python -m benchmarks.rounds_study [--quick]` (`make rounds-study`), on the demo's digits world.

For each method and each number of rounds R, at equal budgets: R rounds of P/R prompts x K images each
(run.prompts_per_round) and S/R training steps each, so every arm generates P x K images and trains S steps in
all. Every run is evaluated like the demo (held-out prompts, the same eval noise for every run): its last
round's model against the base. Over seeds (run.seed and train.seed alike) the table gives the mean delta with
a t-interval over seeds, and the seconds spent generating (model loads included) and training.

Resumable: each run is a tauflow run under --out/<method>-r<R>-s<seed>/ (finished stages are skipped) and
writes timing.json once evaluated; a rerun reads the finished ones. Results: --out/results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from argparse import Namespace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.cli import configured, run_stage  # noqa: E402
from pipeline.config import load_manifest  # noqa: E402
from pipeline.stage import Eval, round_dir, rounds  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def overrides(args: Namespace, method: str, n_rounds: int, seed: int, out: Path) -> list[str]:
    """The demo manifest, cut to one arm of the study."""
    return [
        f"run.output_dir={out}", f"run.seed={seed}", "run.executor=local", f"run.rounds={n_rounds}",
        f"run.prompts_per_round={args.prompts // n_rounds}", f"generate.images_per_prompt={args.images}",
        "generate.num_workers=1", "score.num_workers=1", "train.methods=null", f"train.method={method}",
        "train.per_method={}", f"train.max_steps={args.steps // n_rounds}", f"train.seed={seed}",
        f"train.checkpoint_every={args.steps}", *([f"train.beta={args.tgo_beta}"] if method == "tgo" else []),
        f"eval.images_per_prompt={args.eval_images}", "eval.grid_prompts=1",
    ]


def made_with_hash(args: Namespace, method: str, n_rounds: int, seed: int) -> str:
    """What an arm's result depends on: its resolved manifest and the world's weights (Section.content_hash)."""
    out = args.out / f"{method}-r{n_rounds}-s{seed}"
    return load_manifest(args.manifest, overrides(args, method, n_rounds, seed, out)).content_hash()


def run_arm(args: Namespace, method: str, n_rounds: int, seed: int) -> dict:
    """One tauflow run of the arm (resumed where it stopped), evaluated on its last round's model."""
    out = args.out / f"{method}-r{n_rounds}-s{seed}"
    timing_file = out / "timing.json"
    made_with = made_with_hash(args, method, n_rounds, seed)
    if timing_file.exists():
        record = json.loads(timing_file.read_text())
        if record.get("made_with") != made_with:  # never a finished arm of other settings in this table
            raise SystemExit(f"{timing_file}: an arm run with other settings (manifest, world or budget); use another --out")
        return record
    cli = Namespace(overwrite=False, executor=None, resume=None)
    manifest = load_manifest(args.manifest, [*overrides(args, method, n_rounds, seed, out), "eval=null"])  # eval: below
    seconds: dict[str, float] = {}
    for round_manifest in rounds(manifest):
        for stage in configured(round_manifest):
            start = time.perf_counter()
            run_stage(round_manifest, stage, cli)
            seconds[stage.name] = seconds.get(stage.name, 0.0) + time.perf_counter() - start
    final = round_dir(manifest, n_rounds - 1) / "train" / method
    evaluated = load_manifest(args.manifest, [*overrides(args, method, n_rounds, seed, out), f"eval.models=[{final}]"])
    start = time.perf_counter()
    run_stage(evaluated, Eval, cli)
    seconds["eval"] = time.perf_counter() - start
    results = json.loads((out / "eval/results.json").read_text())
    tuned = results["models"][1]["rewards"]
    record = {"method": method, "rounds": n_rounds, "seed": seed, "made_with": made_with, "seconds": seconds,
              "delta": {name: r["vs_base"]["delta"] for name, r in tuned.items()},
              "delta_ci": {name: r["vs_base"]["delta_ci"] for name, r in tuned.items()}}
    timing_file.write_text(json.dumps(record, indent=1))
    return record


def t_interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    from scipy.stats import t

    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def table(args: Namespace, records: list[dict]) -> str:
    rewards = list(records[0]["delta"])
    head = ["method", "rounds", "steps/round", "images/round"] + [f"{r} delta [95% CI over seeds]" for r in rewards]
    head += [f"{rewards[-1]} vs 1 round [95% CI, paired by seed]", "per-seed " + rewards[-1], "generate s", "train s",
             "all stages s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in args.methods:
        for n in args.rounds:
            arm = [r for r in records if r["method"] == method and r["rounds"] == n]
            if not arm:
                continue
            cells = [method, str(n), str(args.steps // n), str(args.prompts // n * args.images)]
            for reward in rewards:
                mean, lo, hi = t_interval([r["delta"][reward] for r in arm])
                cells.append(f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            one = {r["seed"]: r["delta"][rewards[-1]] for r in records if r["method"] == method and r["rounds"] == 1}
            paired = [r["delta"][rewards[-1]] - one[r["seed"]] for r in arm if r["seed"] in one]
            mean, lo, hi = t_interval(paired) if n != 1 and paired else (float("nan"),) * 3
            cells.append("" if n == 1 or not paired else f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            cells.append(", ".join(f"{r['delta'][rewards[-1]]:+.3f}" for r in arm))
            for key in ("generate", "train"):
                cells.append(f"{statistics.fmean(r['seconds'][key] for r in arm):.0f}")
            cells.append(f"{statistics.fmean(sum(r['seconds'].values()) for r in arm):.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(ROOT / "manifests/demo.yaml"), help="the world run to cut arms from")
    parser.add_argument("--out", type=Path, default=Path("runs/rounds-study"))
    parser.add_argument("--methods", nargs="+", default=["tgo", "dpo"])
    parser.add_argument("--rounds", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--prompts", type=int, default=64, help="prompts over all rounds (P)")
    parser.add_argument("--images", type=int, default=8, help="images per prompt (K)")
    parser.add_argument("--steps", type=int, default=128, help="training steps over all rounds (S)")
    parser.add_argument("--eval-images", type=int, default=2, help="eval images per held-out prompt")
    parser.add_argument("--tgo-beta", type=float, default=0.2, help="TGO's beta (the demo's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tgo, 1 and 2 rounds, one seed, tiny budgets")
    args = parser.parse_args(argv)
    if args.quick:
        args.methods, args.rounds, args.seeds = ["tgo"], [1, 2], [0]
        args.prompts, args.images, args.steps, args.eval_images = 16, 4, 8, 1
        args.out = args.out.with_name(args.out.name + "-quick")
    if bad := [n for n in args.rounds if args.prompts % n or args.steps % n]:
        parser.error(f"--prompts {args.prompts} and --steps {args.steps} must divide by every --rounds (not {bad})")
    args.out.mkdir(parents=True, exist_ok=True)
    import pipeline.evaluation, pipeline.generate, pipeline.score, trainer.recipe  # noqa: E401, F401 - not timed in the first arm
    start = time.perf_counter()
    records = [run_arm(args, m, n, s) for s in args.seeds for m in args.methods for n in args.rounds]
    md = table(args, records)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "runs": records}, indent=1))
    (args.out / "results.md").write_text(md + "\n")
    print(md)
    print(f"\n{len(records)} runs; this invocation took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
