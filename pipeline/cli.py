"""`tauflow` command line: one subcommand per stage, plus run, validate, inspect and regenerate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Manifest, dump_manifest, load_manifest
from pipeline.errors import TauflowError
from pipeline.shards import write_bytes_atomic

log = logging.getLogger("tauflow")

STAGE_HELP = {
    "generate": "generate K images per prompt, recording each image's prior noise (-> samples)",
    "score": "score every image with the manifest's reward bank (-> scored)",
    "threshold": "percentile threshold tau, labels and confidence weights for TGO (-> labeled)",
    "pair": "winner/loser pairs per prompt with both prior noises for PNAPO/DPO (-> pairs)",
    "train": "fine-tune the generator with TGO, PNAPO, Diffusion-DPO, KTO or SFT",
    "eval": "fixed-noise before/after comparison on held-out prompts",
}


def _stage_runner(stage: str) -> Callable[..., Path]:
    if stage == "generate":
        from pipeline.generate import run_generate

        return run_generate
    if stage == "score":
        from pipeline.score import run_score

        return run_score
    if stage == "threshold":
        from pipeline.threshold import run_threshold

        return run_threshold
    if stage == "pair":
        from pipeline.pair import run_pair

        return run_pair
    if stage == "train":
        from trainer.recipe import train

        return train
    if stage == "eval":
        from pipeline.evaluation import run_eval

        return run_eval
    raise TauflowError(f"the '{stage}' stage is not available in this version of tauflow")


def _save_resolved(manifest: Manifest) -> None:
    manifest.output_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(manifest.output_dir / "manifest.resolved.yaml", dump_manifest(manifest).encode())


def run_stage(manifest: Manifest, stage: str, *, overwrite: bool = False, executor: str | None = None,
              resume: str | None = None) -> Path:
    manifest.require(stage)
    _save_resolved(manifest)
    kwargs: dict = {"overwrite": overwrite}
    if stage in ("generate", "score"):
        kwargs["executor"] = executor
    if stage == "train":
        kwargs["resume"] = resume
        paths = [_stage_runner(stage)(job, **kwargs) for job in train_jobs(manifest)]
        return paths[0].parent if len(paths) > 1 else paths[0]
    return _stage_runner(stage)(manifest, **kwargs)


def train_jobs(manifest: Manifest) -> list[Manifest]:
    """The manifest once per training method (train.methods), each with a single-method train section."""
    jobs = []
    for section in manifest.require("train").jobs():
        job = manifest.model_copy(update={"train": section})
        job._source = manifest.source
        jobs.append(job)
    return jobs


def cmd_stage(args: argparse.Namespace) -> None:
    manifest = load_manifest(args.manifest, args.overrides)
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    path = run_stage(manifest, args.command, overwrite=args.overwrite, executor=args.executor,
                     resume=getattr(args, "resume", None))
    print(f"{args.command}: {path}")


def cmd_run(args: argparse.Namespace) -> None:
    manifest = load_manifest(args.manifest, args.overrides)
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    stages = [s for s in STAGE_HELP if getattr(manifest, s) is not None]
    for stage in stages:
        path = run_stage(manifest, stage, overwrite=args.overwrite, executor=args.executor)
        print(f"{stage}: {path}")


def cmd_validate(args: argparse.Namespace) -> None:
    manifest = load_manifest(args.manifest, args.overrides)
    stages = [s for s in STAGE_HELP if getattr(manifest, s) is not None]
    print(f"{args.manifest}: valid; stages: {', '.join(stages)}; output: {manifest.output_dir}")
    if args.print:
        print(dump_manifest(manifest))


def cmd_inspect(args: argparse.Namespace) -> None:
    from pipeline.inspect import describe

    print(describe(Path(args.dataset), verify=args.verify, rows=args.rows))


def cmd_world(args: argparse.Namespace) -> None:
    from pipeline.digits_world import build_world

    path = build_world(args.directory, seed=args.seed)
    print(f"world: {path}")


def cmd_regenerate(args: argparse.Namespace) -> None:
    import numpy as np

    from pipeline.generate import regenerate

    stored, fresh = regenerate(args.dataset, args.sample_id, device=args.device)
    diff = int(np.abs(stored.astype(np.int16) - fresh.astype(np.int16)).max())
    print(json.dumps({"sample_id": args.sample_id, "max_abs_diff": diff, "shape": list(stored.shape)}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tauflow", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def manifest_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("manifest", help="run manifest (YAML)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generate.images_per_prompt=4")

    for stage, help_ in STAGE_HELP.items():
        p = sub.add_parser(stage, help=help_, description=help_)
        manifest_args(p)
        p.add_argument("--overwrite", action="store_true", help="replace an existing output instead of resuming")
        p.add_argument("--executor", choices=["ray", "local"], help="override run.executor")
        p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
        if stage == "train":
            p.add_argument("--resume", help="'latest' or a checkpoint directory to continue from")
        p.set_defaults(func=cmd_stage)

    p = sub.add_parser("run", help="all configured stages in order, skipping completed ones")
    manifest_args(p)
    p.add_argument("--overwrite", action="store_true", help="redo every stage")
    p.add_argument("--executor", choices=["ray", "local"], help="override run.executor")
    p.add_argument("--address", help="Ray cluster address")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a manifest without running anything")
    manifest_args(p)
    p.add_argument("--print", action="store_true", help="print the resolved manifest")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("inspect", help="schema, rows, stats and a few rows of a dataset directory")
    p.add_argument("dataset", help="dataset directory (holds manifest.json)")
    p.add_argument("--verify", action="store_true", help="re-hash every shard against the manifest")
    p.add_argument("--rows", type=int, default=3, help="rows to show")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("world", help="build (or reuse) the embedded digits world used by manifests/demo.yaml")
    p.add_argument("directory", nargs="?", default="runs/world", help="where to build it (default: runs/world)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("regenerate", help="re-run one sample from its stored noise and compare with its image")
    p.add_argument("dataset", help="samples (or scored/labeled) dataset directory")
    p.add_argument("--sample-id", required=True)
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help="default: the device the sample was generated on (CPU if the dataset does not record it)")
    p.set_defaults(func=cmd_regenerate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except TauflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
