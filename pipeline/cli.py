"""`tauflow` command line: one subcommand per stage, plus run, validate, inspect and regenerate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.config import Manifest, dump_manifest, load_manifest
from pipeline.errors import TauflowError
from pipeline.shards import write_bytes_atomic
from pipeline.stage import STAGES, Eval, Stage, rounds


def _save_resolved(manifest: Manifest) -> None:
    manifest.output_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(manifest.output_dir / "manifest.resolved.yaml", dump_manifest(manifest).encode())


def run_stage(manifest: Manifest, stage: type[Stage], args: argparse.Namespace) -> Path:
    """One stage with the command line's --overwrite and whichever of its own options the command has."""
    job = stage(manifest)
    options = {name: getattr(args, name) for name in stage.options if hasattr(args, name)}
    path = job.execute(overwrite=args.overwrite, **options)
    _save_resolved(manifest)  # only a configuration that ran: a refused one never replaces it
    return path


def _load(args: argparse.Namespace) -> Manifest:
    manifest = load_manifest(args.manifest, args.overrides)
    if getattr(args, "address", None):
        os.environ["RAY_ADDRESS"] = args.address
    return manifest


def configured(manifest: Manifest) -> list[type[Stage]]:
    return [stage for stage in STAGES if getattr(manifest, stage.name) is not None]


def cmd_stage(args: argparse.Namespace) -> None:
    if getattr(args, "dry_run", False):  # `train --dry-run`: the memory a run would need, nothing trained
        from trainer.memory import estimate_for_manifest

        print(estimate_for_manifest(_load(args)))
        return
    print(f"{args.stage.name}: {run_stage(_load(args), args.stage, args)}")


def cmd_run(args: argparse.Namespace) -> None:
    """Every configured stage, round after round (run.rounds); with several rounds, eval once at the end."""
    if args.rounds is not None:
        args.overrides.append(f"run.rounds={args.rounds}")
    manifest = _load(args)
    for round_manifest in rounds(manifest):
        for stage in configured(round_manifest):
            print(f"{stage.name}: {run_stage(round_manifest, stage, args)}")
    if manifest.run.rounds > 1:
        if manifest.eval is not None:
            print(f"eval: {run_stage(manifest, Eval, args)}")
        _save_resolved(manifest)


def cmd_validate(args: argparse.Namespace) -> None:
    manifest = load_manifest(args.manifest, args.overrides)
    stages = [stage.name for stage in configured(manifest)]
    print(f"{args.manifest}: valid; stages: {', '.join(stages)}; output: {manifest.output_dir}")
    if args.print:
        print(dump_manifest(manifest))


def cmd_inspect(args: argparse.Namespace) -> None:
    from pipeline.inspect import describe

    print(describe(Path(args.dataset), verify=args.verify, rows=args.rows))


def cmd_world(args: argparse.Namespace) -> None:
    from world.build import build_world

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

    for stage in STAGES:
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help)
        manifest_args(p)
        p.add_argument("--overwrite", action="store_true", help="replace an existing output instead of resuming")
        p.add_argument("--executor", choices=["ray", "local"], help="override run.executor")
        p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
        if "resume" in stage.options:
            p.add_argument("--resume", help="'latest' or a checkpoint directory to continue from")
        if stage.name == "train":
            p.add_argument("--dry-run", action="store_true", help="print the estimated GPU memory per method and exit")
        p.set_defaults(func=cmd_stage, stage=stage)

    p = sub.add_parser("run", help="all configured stages in order, skipping completed ones")
    manifest_args(p)
    p.add_argument("--overwrite", action="store_true", help="redo every stage")
    p.add_argument("--rounds", type=int, help="override run.rounds: generate -> ... -> train N times, each round from the last model")
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


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Options may come before, between or after the dotted overrides (`tauflow train m.yaml a=1 --resume latest`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        args.func(args)
    except TauflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run(argv: list[str] | None = None) -> None:
    """The `tauflow` command: `main`, then an exit that skips the interpreter's teardown of native thread pools.
    pyarrow's can abort a process at that point ("terminate called without an active exception", exit 134: 6 of
    20 error exits of `regenerate` measured here) after every result is written; nothing is left to tear down but
    Ray's local instance and the log handlers, released first."""
    code = main(argv)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
