"""The six stages, declared once: what each is called, what it reads, what it writes and what identifies it.

A stage's identity is its configuration hash plus the sha256 of every input's record (a dataset's manifest.json,
a trained model's done.json). It is stored in the stage's own record, written last, so `execute` runs the same
sequence for every stage: complete with the same identity -> skip; complete with another -> refuse (the user
passes --overwrite); otherwise run, resuming where the stage can, and seal. A relabelled dataset therefore
never meets a "complete; skipping" from the models trained on the old labels, nor from their evaluation.

`STAGES` is the one ordered list the CLI subcommands, `tauflow run`, `tauflow validate` and the output folder
names come from. Stage work (torch, diffusers, Ray) is imported only when a stage runs, so the CLI stays light.
A new stage: subclass `DatasetStage` (it writes Parquet shards through `StageOutput`: implement `write`) or
`Stage` (implement `run` and end it with `seal`), declare its name (the manifest section and the subcommand),
help, folder, kind, record and `inputs`, and add it to `STAGES`.

Rounds (run.rounds, issue #19) loop over the same stages with one manifest per round (`rounds`): round 0 is the
run itself, written where a one-round run writes; round r >= 1 writes under <output_dir>/round-<r>/, generates
from and trains on round r-1's model (generate.model names its train/<method> output, which the data manifests
then record as their parent), with a seed of its own (pipeline/seeds.round_seed). `threshold.tau_from: round0`
names round 0's labeled dataset in later rounds; `train.reference: base` keeps the run's generate.model.
The eval stage runs once over every round's model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Iterator

from datasets import Features

from pipeline.config import Manifest, files_fingerprint, parse_manifest
from pipeline.errors import DatasetError, StageError
from pipeline.faults import crash_point
from pipeline.lock import OutputLock
from pipeline.shards import (MANIFEST_NAME, PROGRESS_DIR, StageOutput, finish_replace, open_dataset, replace_dataset,
                             sha256_file, write_json_atomic)

log = logging.getLogger("tauflow")
DONE = "done.json"  # the record of a finished training run
RESULTS = "results.json"  # the record of a finished evaluation


@dataclass(frozen=True)
class Input:
    """A finished output another stage reads: a dataset of one of `kinds`, or a trained model (kinds == ("model",))."""

    path: Path
    kinds: tuple[str, ...]

    @property
    def record(self) -> Path:
        return self.path / (DONE if self.kinds == ("model",) else MANIFEST_NAME)

    def digest(self) -> str:
        """sha256 of the input's record; refuses an input that is unfinished or of the wrong kind."""
        if self.kinds != ("model",):
            open_dataset(self.path, kind=self.kinds)
        elif not self.record.exists():
            raise StageError(f"{self.record}: missing: the training run has not finished")
        return sha256_file(self.record)


@dataclass(frozen=True)
class Written:
    """What a dataset stage wrote, for its manifest."""

    num_shards: int
    features: Features
    stats: dict[str, Any]


class Stage:
    """A pipeline stage. Subclasses declare the class attributes and `inputs`, and implement `run`."""

    name: ClassVar[str]  # the manifest section it reads and its `tauflow` subcommand
    help: ClassVar[str]
    folder: ClassVar[str]  # its output, under run.output_dir
    kind: ClassVar[str]  # what it writes: a dataset kind, "model" or "report"
    record: ClassVar[str] = MANIFEST_NAME  # written last: the output is complete once it exists
    options: ClassVar[tuple[str, ...]] = ()  # keyword options of `execute` beyond overwrite ("executor", "resume")

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.cfg = manifest.require(self.name)

    @property
    def output(self) -> Path:
        return self.manifest.output_dir / self.folder

    def inputs(self) -> list[Input]:
        return []

    def config_hash(self) -> str:
        """Everything in the configuration that determines the output (see Section.content_hash)."""
        return self.cfg.content_hash()

    def lock(self) -> AbstractContextManager:
        """The output's lock, held by one process: under `accelerate launch`, rank 0 holds it for all ranks."""
        return OutputLock(self.output, self.name) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()

    def execute(self, *, overwrite: bool = False, **options: Any) -> Path:
        with self.lock():
            identity = self.begin(overwrite=overwrite)
            if identity is not None:
                self.run(identity, **options)
        crash_point(f"stage-done:{self.name}")
        return self.output

    def begin(self, *, overwrite: bool = False, extend: bool = False) -> str | None:
        """The identity to write the output under, or None when it is already complete with that identity.

        `overwrite` deletes the output first. `extend` (train's --resume) continues a finished output whose
        configuration changed; changed inputs are refused even then.
        """
        inputs = {str(i.path): i.digest() for i in self.inputs()}
        finish_replace(self.output)  # a dataset swap cut short by a crash
        if overwrite and self.output.exists():
            shutil.rmtree(self.output)
        identity = hashlib.sha256(json.dumps({"config": self.config_hash(), "inputs": inputs}, sort_keys=True).encode()).hexdigest()
        record = self.output / self.record
        if not record.exists():
            return identity
        done = json.loads(record.read_text())
        if changed := _changed_inputs({i["path"]: i["manifest_sha256"] for i in done.get("inputs", [])}, inputs):
            raise DatasetError(f"{self.output}: was made from other inputs ({'; '.join(changed)}); "
                               "rerun with --overwrite to replace it")
        if done.get("config_hash") == identity:
            log.info("%s: %s is complete; skipping (use --overwrite to redo it)", self.name, self.output)
            return None
        return identity if extend else self.revise(done, identity)

    def revise(self, done: dict[str, Any], identity: str) -> str | None:
        """A complete output whose configuration changed: refused, unless a stage can bring it up to date."""
        raise DatasetError(f"{self.output}: was started with a different configuration (hash "
                           f"{str(done.get('config_hash'))[:12]}, now {identity[:12]}); rerun with --overwrite to replace it")

    def run(self, identity: str, **options: Any) -> None:
        raise NotImplementedError

    def seal(self, identity: str, record: dict[str, Any]) -> None:
        """Write the stage's record (last): its content, identity and inputs."""
        inputs = [{"path": str(i.path), "manifest_sha256": sha256_file(i.record)} for i in self.inputs()]
        write_json_atomic(self.output / self.record, {**record, "config_hash": identity, "inputs": inputs})


def _changed_inputs(before: dict[str, str], now: dict[str, str]) -> list[str]:
    changed = [f"{p} changed" for p in now if p in before and before[p] != now[p]]
    return changed + [f"{p} is new" for p in now if p not in before] + [f"{p} is no longer read" for p in before if p not in now]


class DatasetStage(Stage):
    """A stage writing a dataset: Parquet shards through StageOutput (which resumes), sealed by manifest.json."""

    def write(self, out: StageOutput, **options: Any) -> Written:
        raise NotImplementedError

    def staging(self) -> Path:
        """Where the dataset is written: its output, unless a stage rebuilds a finished one beside it."""
        return self.output

    def run(self, identity: str, **options: Any) -> None:
        target = self.staging()
        scratch = target != self.output  # a finished dataset rebuilt beside it, then swapped in
        # a scratch copy left by an interrupted run of another configuration is only ours to replace
        fresh = not target.exists()
        out = StageOutput(target, kind=self.kind, stage=self.name, config_hash=identity,
                          overwrite=scratch and _planned_hash(target) not in (None, identity))
        try:
            written = self.write(out, **options)
        except BaseException:
            if fresh and not any(target.glob("part-*.parquet")):  # failed before writing anything: leave nothing
                shutil.rmtree(target, ignore_errors=True)
            raise
        out.finalize(num_shards=written.num_shards, features=written.features, stats=written.stats,
                     config=self.manifest.model_dump(mode="json", exclude_none=True), inputs=[i.path for i in self.inputs()])
        if scratch:
            replace_dataset(self.output)


def _planned_hash(path: Path) -> str | None:
    plan = path / PROGRESS_DIR / "plan.json"
    return json.loads(plan.read_text())["config_hash"] if plan.exists() else None


class Generate(DatasetStage):
    name, folder, kind, options = "generate", "samples", "samples", ("executor",)
    help = "generate K images per prompt, recording each image's prior noise (-> samples)"

    @cached_property
    def prompts(self) -> tuple[list, dict[str, Any]]:
        from pipeline.prompts import load_prompts

        prompts, stats = load_prompts(self.cfg.prompts, self.cfg.prompt_column, self.cfg.dedupe_prompts)
        n, seed = self.manifest.run.prompts_per_round, self.manifest.run.seed
        if n is None:
            return prompts, stats
        if n > len(prompts):
            raise StageError(f"run.prompts_per_round: {n} is more than the {len(prompts)} prompts of {self.cfg.prompts}")
        import numpy as np

        drawn = sorted(np.random.default_rng(seed).choice(len(prompts), n, replace=False).tolist())  # file order kept
        return [prompts[i] for i in drawn], {**stats, "drawn": n}

    def config_hash(self) -> str:
        from pipeline.generate import prompts_sha256

        return self.cfg.content_hash(run_seed=self.manifest.run.seed, prompts=prompts_sha256(self.prompts[0]))

    def write(self, out: StageOutput, executor: str | None = None) -> Written:
        from pipeline.generate import write_samples

        return write_samples(self, out, executor)


class Score(DatasetStage):
    name, folder, kind, options = "score", "scored", "scored", ("executor",)
    help = "score every image with the manifest's reward bank (-> scored)"

    def inputs(self) -> list[Input]:
        return [Input(self.manifest.stage_dir("generate"), ("samples",))]

    @property
    def specs(self) -> dict[str, dict[str, Any]]:
        return {s.name: s.model_dump(mode="json") for s in self.cfg.rewards}

    @property
    def scored(self) -> dict[str, dict[str, Any]]:
        """The reward specs the finished output was scored with (none when there is none)."""
        record = self.output / MANIFEST_NAME
        return json.loads(record.read_text())["stats"].get("reward_specs", {}) if record.exists() else {}

    def config_hash(self) -> str:
        return self.cfg.content_hash(rewards={**self.scored, **self.specs})

    def revise(self, done: dict[str, Any], identity: str) -> str | None:
        """Listing a new reward scores only that reward into the finished dataset."""
        have, specs = self.scored, self.specs
        if changed := [n for n in specs if n in have and have[n] != specs[n]]:
            raise StageError(f"{self.output}: rewards {changed} were scored with a different spec; rerun with --overwrite")
        if all(n in have for n in specs):
            log.info("score: %s already has every reward; skipping (use --overwrite to redo it)", self.output)
            return None
        return identity

    def staging(self) -> Path:
        return self.output.with_name(self.output.name + ".adding") if self.scored else self.output

    def write(self, out: StageOutput, executor: str | None = None) -> Written:
        from pipeline.score import write_scores

        return write_scores(self, out, executor)


class Threshold(DatasetStage):
    name, folder, kind = "threshold", "labeled", "labeled"
    help = "percentile threshold tau, labels and confidence weights for TGO (-> labeled)"

    def inputs(self) -> list[Input]:
        """The scores, and the labeled dataset whose tau is used (threshold.tau_from) where one is named."""
        tau = self.cfg.tau_source
        return [Input(self.manifest.stage_dir("score"), ("scored",))] + ([Input(tau, ("labeled",))] if tau and tau.is_dir() else [])

    def write(self, out: StageOutput) -> Written:
        from pipeline.threshold import write_labels

        return write_labels(self, out)


class Pair(DatasetStage):
    name, folder, kind = "pair", "pairs", "pairs"
    help = "winner/loser pairs per prompt with both prior noises for PNAPO/DPO (-> pairs)"

    def inputs(self) -> list[Input]:
        """The labeled dataset when it exists and no reward is named (its thresholded score), else the scored one."""
        if self.cfg.external is not None:
            return []
        labeled = self.manifest.stage_dir("threshold")
        if (labeled / MANIFEST_NAME).exists() and self.cfg.reward is None:
            return [Input(labeled, ("labeled",))]
        return [Input(self.manifest.stage_dir("score"), ("scored",))]

    def config_hash(self) -> str:
        """With no pair.reward, a scored input is paired on threshold.reward's column."""
        fallback = self.manifest.threshold.reward if self.cfg.reward is None and self.manifest.threshold else None
        return self.cfg.content_hash(threshold_reward=fallback)

    def write(self, out: StageOutput) -> Written:
        from pipeline.pair import import_external, write_pairs

        return import_external(self.cfg.external, out) if self.cfg.external else write_pairs(self, out)


class Train(Stage):
    name, folder, kind, record, options = "train", "train", "model", DONE, ("resume",)
    help = "fine-tune the generator with TGO, PNAPO, Diffusion-DPO, KTO or SFT"

    @property
    def output(self) -> Path:
        """train/<method>; train/ itself for a manifest naming several methods."""
        return self.manifest.output_dir / self.folder / (self.cfg.method or "")

    @property
    def start_model(self) -> str | None:
        """The weights the policy starts from: train.model, else generate.model."""
        return self.cfg.model or (self.manifest.generate.model if self.manifest.generate else None)

    @property
    def reference_model(self) -> str | None:
        """The reference's weights where they are not the start model's (train.reference names another model, or
        `base`: generate.model); None where the reference is the start model (a frozen copy, or LoRA disabled)."""
        base = self.manifest.generate.model if self.manifest.generate else None
        ref = {"previous": None, "base": base}.get(self.cfg.reference, self.cfg.reference)
        return None if ref == self.start_model else ref

    def inputs(self) -> list[Input]:
        from trainer.recipe import DATA_STAGES
        from trainer.methods import METHODS

        kind = METHODS[self.cfg.method].data
        return [Input(self.cfg.data or self.manifest.stage_dir(DATA_STAGES[kind]), (kind,))]

    def config_hash(self) -> str:
        ref = self.reference_model
        reference = {"reference_model": ref, "reference_files": files_fingerprint(ref)} if ref else {}
        return self.cfg.content_hash(model=self.start_model, model_files=files_fingerprint(self.start_model), **reference)

    def jobs(self) -> list[Train]:
        """One stage per training method (train.methods), each with a single-method train section."""
        jobs = []
        for section in self.cfg.jobs():
            job = self.manifest.model_copy(update={"train": section})
            job._source = self.manifest.source
            jobs.append(Train(job))
        return jobs

    def execute(self, *, overwrite: bool = False, resume: str | None = None) -> Path:
        """Each method's run; trainer.recipe.train begins and seals it (it is also accelerate's entry point)."""
        from trainer.recipe import train

        with self.lock():
            paths = [train(job.manifest, resume=resume, overwrite=overwrite) for job in self.jobs()]
        return paths[0] if len(paths) == 1 else self.output


class Eval(Stage):
    name, folder, kind, record = "eval", "eval", "report", RESULTS
    help = "fixed-noise before/after comparison on held-out prompts"

    @cached_property
    def models(self) -> list:
        from pipeline.evaluation import discover_models

        return discover_models(self.manifest)

    def inputs(self) -> list[Input]:
        """The trained models compared (their done.json); other weights enter the identity by their files."""
        trained = [Path(m.path).parent for m in self.models[1:]]
        return [Input(p, ("model",)) for p in dict.fromkeys(trained) if (p / DONE).exists()]

    def config_hash(self) -> str:
        gen, score = self.manifest.require("generate"), self.manifest.score
        trained = {str(i.path) for i in self.inputs()}
        models = [(m.name, m.path, None if str(Path(m.path).parent) in trained else files_fingerprint(m.path))
                  for m in self.models]
        return self.cfg.content_hash(generate=gen.content_hash(), score=score.content_hash() if score else None, models=models)

    def run(self, identity: str) -> None:
        from pipeline.evaluation import evaluate

        self.seal(identity, evaluate(self.manifest, self.models, self.output))


STAGES: tuple[type[Stage], ...] = (Generate, Score, Threshold, Pair, Train, Eval)


def round_dir(manifest: Manifest, round_: int) -> Path:
    """Where round `round_` writes its stages' outputs: round 0 where a one-round run writes."""
    return manifest.output_dir if round_ == 0 else manifest.output_dir / f"round-{round_}"


def rounds(manifest: Manifest) -> Iterator[Manifest]:
    """Each round's manifest, in order; the caller runs a round's stages before asking for the next one, whose
    manifest names the model that round trained (and is validated against it). A one-round run is its manifest.

    Round r >= 1: output under round-<r>/, run seed `round_seed(seed, r)`, generate.model and the start of
    training = round r-1's train/<method> output (so generate.revision/variant, which name hub files, are
    dropped), tau_from round0 -> round 0's labeled dataset, reference base -> the run's generate.model.
    Every round's manifest has rounds: 1 and no eval section (eval compares every round, once, at the end)."""
    if manifest.run.rounds == 1:
        yield manifest
        return
    from pipeline.seeds import round_seed

    for r in range(manifest.run.rounds):
        data = manifest.model_dump(mode="json", exclude_none=True, exclude={"eval"})
        data["run"].update(rounds=1, output_dir=str(round_dir(manifest, r)))
        if r > 0:
            data["run"]["seed"] = round_seed(manifest.run.seed, r)
            data["generate"] = {k: v for k, v in data["generate"].items() if k not in ("revision", "variant")}
            data["generate"]["model"] = str(round_dir(manifest, r - 1) / "train" / manifest.train.method)
            data["train"].pop("model", None)
            if manifest.threshold is not None and manifest.threshold.tau_from == "round0":
                data["threshold"]["tau_from"] = str(manifest.stage_dir("threshold"))
            if manifest.train.reference == "base":
                data["train"]["reference"] = manifest.generate.model
        yield parse_manifest(data, f"{manifest.source} (round {r})")


def stage_named(name: str) -> type[Stage]:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise StageError(f"no stage named '{name}' (stages: {', '.join(s.name for s in STAGES)})")
