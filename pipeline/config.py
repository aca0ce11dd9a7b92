"""Run manifests: one YAML describes a run; it is validated in full before any work starts.

Relative paths in a manifest are resolved against the current directory (make targets run from the repo
root). Each stage section knows which of its fields change the stage's output (hashed, so a rerun with a
different config is refused) and which only change how it runs (workers, retries: free to change on resume).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_serializer, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipeline.errors import ManifestError
from trainer.methods import METHODS, OPTION_OWNERS


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).exists()


def _existing_path(value: Path) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"path does not exist: {path}")
    return path


def _existing_model_ref(ref: str | None) -> str | None:
    """Where weights come from: a hub id (checked when loaded) or a local directory/file, which must exist."""
    if ref is not None and _looks_local(ref) and not Path(ref).expanduser().exists():
        raise ValueError(f"local model path does not exist: {ref}")
    return ref


def files_fingerprint(ref: str | None) -> str | None:
    """The on-disk identity of a local model file or directory (paths, sizes, modification times), or None for
    a hub id. A model rebuilt or retrained in place changes it, so what was made from the old weights is never
    silently reused (a copied directory counts as changed too: redoing work beats reusing stale results)."""
    if ref is None or not _looks_local(ref):
        return None
    root = Path(ref).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    stats = [(str(p.relative_to(root)) if root.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields that only change how a stage runs, not what it writes.
    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset()
    # Fields naming weights (hub ids or local paths): local ones enter the hash by their files' fingerprint.
    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's `true` would otherwise pass as the number 1 (`images_per_prompt=true`)."""
        annotation = cls.model_fields[info.field_name].annotation
        numeric = {int, float, int | None, float | None}
        if isinstance(value, bool) and annotation in numeric:
            raise ValueError("expected a number, got a boolean")
        return value

    def local_files(self) -> dict[str, str]:
        """Fingerprints of the local weights this section (and the sections inside it) names, by key path."""
        found = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            for i, item in enumerate(value if isinstance(value, list) else [value]):
                if isinstance(item, Section):
                    found |= {f"{name}.{i}.{k}": v for k, v in item.local_files().items()}
            if name in self.MODEL_FIELDS and isinstance(value, str) and (fingerprint := files_fingerprint(value)):
                found[name] = fingerprint
        return found

    def content_hash(self, **extra: Any) -> str:
        """Hash of everything that determines this stage's output, the local weights it reads included."""
        content = self.model_dump(mode="json", exclude=set(self.EXECUTION_FIELDS))
        blob = json.dumps({"section": content, "files": self.local_files(), **extra}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


class RunSection(Section):
    name: str = Field(min_length=1)
    output_dir: Path
    seed: int = Field(0, ge=0)
    executor: Literal["ray", "local"] = "ray"
    ray_address: str | None = None
    # generate -> score -> threshold/pair -> train, `rounds` times; round r >= 1 starts from round r-1's model
    # and writes under <output_dir>/round-<r>/ (round 0 is the run itself; see pipeline/stage.py, rounds)
    rounds: int = Field(1, ge=1)
    prompts_per_round: int | None = Field(None, gt=0)  # prompts drawn per round with the round's seed; default: all


class GenerateSection(Section):
    EXECUTION_FIELDS = frozenset({"num_workers", "cpus_per_worker", "gpus_per_worker", "max_retries", "device"})
    MODEL_FIELDS = ("model",)

    model: str
    revision: str | None = None
    variant: str | None = None
    local_files_only: bool = False
    trust_remote_code: bool = False
    prompts: Path
    prompt_column: str = "prompt"
    dedupe_prompts: bool = True
    negative_prompt: str | None = None
    images_per_prompt: int = Field(8, gt=0)
    num_inference_steps: int = Field(20, gt=0)
    guidance_scale: float = Field(5.0, ge=0)
    height: int = Field(512, gt=0)
    width: int = Field(512, gt=0)
    batch_size: int = Field(8, gt=0)
    torch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    noise_dtype: Literal["float16", "float32"] = "float16"
    scheduler: str | None = None
    pipeline_kwargs: dict[str, Any] = Field(default_factory=dict)  # extra __call__ arguments, e.g. max_sequence_length
    prompts_per_shard: int = Field(64, gt=0)
    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_retries: int = Field(2, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    _model_exists = field_validator("model")(_existing_model_ref)
    _prompts_exist = field_validator("prompts")(_existing_path)


class RewardSpec(Section):
    MODEL_FIELDS = ("checkpoint", "model", "tokenizer")
    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    kind: str
    checkpoint: str | None = None
    model: str | None = None
    tokenizer: str | None = None
    local_files_only: bool = False
    options: dict[str, Any] = Field(default_factory=dict)

    _refs_exist = field_validator("checkpoint", "model", "tokenizer")(_existing_model_ref)


class ScoreSection(Section):
    EXECUTION_FIELDS = frozenset(
        {"num_workers", "cpus_per_worker", "gpus_per_worker", "batch_size", "device", "one_at_a_time", "max_retries"}
    )

    rewards: list[RewardSpec] = Field(min_length=1)
    batch_size: int = Field(16, gt=0)
    one_at_a_time: bool = False
    max_retries: int = Field(2, ge=0)
    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # precision of the reward forward passes; "auto": bf16 on CUDA, fp32 on CPU (the resolved value is recorded
    # in the scored dataset's manifest stats); fp32 gives exact parity with a plain fp32 forward
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"

    @model_validator(mode="after")
    def _unique_names(self) -> ScoreSection:
        names = [r.name for r in self.rewards]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reward names must be unique, repeated: {dupes}")
        return self


class CompositeSpec(Section):
    weights: dict[str, float] = Field(min_length=1)
    normalize: Literal["zscore", "rank"] = "zscore"
    reference: Path | None = None

    _ref_exists = field_validator("reference")(lambda v: v if v is None else _existing_path(v))


class ThresholdSection(Section):
    reward: str | None = None
    composite: CompositeSpec | None = None
    percentile: float = Field(50.0, gt=0, lt=100)
    mode: Literal["global", "per_prompt", "shrunk"] = "global"
    k0: float = Field(8.0, gt=0)
    c: float = Field(5.0, ge=0)
    normalize_gap: bool = False
    nan_policy: Literal["error", "drop"] = "error"
    tau_from: Literal["round0"] | Path | None = None  # a labeled dataset (or thresholds.json) whose tau is used

    _tau_from_exists = field_validator("tau_from")(lambda v: v if v in (None, "round0") else _existing_path(v))

    @field_validator("tau_from")
    @classmethod
    def _round0_is_global(cls, value: Any, info: ValidationInfo) -> Any:
        if value == "round0" and info.data.get("mode", "global") != "global":
            raise ValueError(f"round0 fixes one global tau for every round; mode is '{info.data['mode']}'")
        return value

    @model_validator(mode="after")
    def _one_score(self) -> ThresholdSection:
        if (self.reward is None) == (self.composite is None):
            raise ValueError("give exactly one of 'reward' or 'composite'")
        return self

    @property
    def tau_source(self) -> Path | None:
        """Where tau comes from; None: this dataset. `round0` is round 0's labeled dataset: round 0 estimates it,
        and `tauflow run` names that dataset as tau_from in the manifests of the later rounds."""
        return None if self.tau_from == "round0" else self.tau_from


class ExternalPairs(Section):
    """An external paired dataset without prior noise (e.g. Pick-a-Pic)."""

    path: Path
    columns: dict[Literal["image_0", "image_1", "label_0", "prompt"], str] = Field(
        default_factory=lambda: {"image_0": "jpg_0", "image_1": "jpg_1", "label_0": "label_0", "prompt": "caption"}
    )

    _path_exists = field_validator("path")(_existing_path)


class PairSection(Section):
    reward: str | None = None
    strategy: Literal["best_worst", "all", "top_bottom_k"] = "best_worst"
    k: int = Field(1, gt=0)
    min_gap: float = Field(0.0, ge=0)
    external: ExternalPairs | None = None


class LoraSpec(Section):
    rank: int = Field(8, gt=0)
    alpha: float = Field(8.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


MethodName = Literal[tuple(METHODS)]


def _plain(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


class TrainKeys(Section):
    """The train keys every method shares."""

    method: MethodName | None = None
    methods: list[MethodName] | None = None  # several, same budget
    per_method: dict[str, dict[str, Any]] = Field(default_factory=dict)  # e.g. {tgo: {beta: 0.2}}
    model: str | None = None  # default: generate.model (the policy starts from it)
    # the reference: the model the policy starts from (previous), generate.model (base), or another model
    reference: Literal["previous", "base"] | str = "previous"
    data: Path | None = None  # default: the run's labeled or pairs dataset, whichever the method trains on
    beta: float | None = Field(None, gt=0)  # default: the method's for the model family (trainer/methods/)
    sigma_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float | None = None  # default: the method's (pnapo 2.0: noise-heavy sigmas, see trainer/methods/pnapo.py; else 0)
    logit_std: float = Field(1.0, gt=0)
    max_steps: int = Field(100, gt=0)
    batch_size: int = Field(4, gt=0)  # global batch, split over processes
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(1e-5, gt=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # the autocast of policy and reference forwards; run-wide
    frozen_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # VAE, text encoders, reference, LoRA base; run-wide
    lora: LoraSpec | None = None
    reference_device: Literal["same", "cpu"] = "same"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    cache: bool = True  # cache latents and text embeddings per sample/prompt (frozen encoders)
    log_every: int = Field(1, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    checkpoint_limit: int = Field(2, gt=0)
    seed: int = Field(0, ge=0)

    _model_exists = field_validator("model")(_existing_model_ref)
    _reference_exists = field_validator("reference")(lambda v: v if v in ("previous", "base") else _existing_model_ref(v))
    _data_exists = field_validator("data")(lambda v: v if v is None else _existing_path(v))

    @property
    def frozen_torch_dtype(self) -> Literal["float32", "bfloat16", "float16"]:
        """The dtype frozen weights are loaded in: `frozen_dtype`, or under `auto` that of `mixed_precision`."""
        key = self.mixed_precision if self.frozen_dtype == "auto" else self.frozen_dtype
        return {"no": "float32", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[key]


# Keys one process can hold only one value of. accelerate fixes the mixed precision once per process (its
# AcceleratorState refuses a second value), the methods of one train section train one after another in one
# process, and the frozen weights follow the mixed precision: so these are set for the whole section only.
RUN_WIDE_KEYS = ("mixed_precision", "frozen_dtype")


# the bases listed last come first in a dumped manifest: the shared keys, then each method's options in registry order
_METHOD_OPTIONS = tuple(m.options for m in reversed(METHODS.values()) if m.options.model_fields)


class TrainSection(*_METHOD_OPTIONS, TrainKeys):
    """The train stage: the shared keys, plus each method's own keys (train.temperature, train.dynamic_beta, ...)
    from its options model in trainer/methods/, refused where no trained method has them. `per_method` overrides
    shared keys and that method's own keys for one method."""

    EXECUTION_FIELDS = frozenset({"log_every", "checkpoint_every", "checkpoint_limit", "reference_device"})
    # no MODEL_FIELDS: the train stage fingerprints the model it starts from, `model` or generate's (recipe.train)

    @property
    def trained(self) -> list[str]:
        return self.methods or [self.method]

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("method") in METHODS and data.get("logit_mean") is None:
            data = {**data, "logit_mean": METHODS[data["method"]].logit_mean}
        return data

    @model_validator(mode="after")
    def _methods_and_their_options(self) -> TrainSection:
        if (self.method is None) == (self.methods is None):
            raise ValueError("give exactly one of 'method' or 'methods'")
        unknown = sorted(set(self.per_method) - set(self.trained))
        if unknown:
            raise ValueError(f"per_method names methods that are not trained: {unknown}")
        errors = [InitErrorDetails(type=PydanticCustomError("foreign_option", "an option of method {owner}, not of {trained}",
                                                            {"owner": OPTION_OWNERS[key], "trained": " or ".join(self.trained)}),
                                   loc=(key,), input=_plain(getattr(self, key)))
                  for key in sorted(self.model_fields_set) if self._unused(key)]
        if self.frozen_dtype not in ("auto", "fp32", self.mixed_precision):  # low-precision weights need autocast
            message = "{frozen} frozen weights compute only under {frozen} autocast: set mixed_precision {frozen}, or frozen_dtype auto or fp32"
            errors.append(InitErrorDetails(type=PydanticCustomError("frozen_dtype", message, {"frozen": self.frozen_dtype}),
                                           loc=("frozen_dtype",), input=self.frozen_dtype))
        errors += [InitErrorDetails(type=PydanticCustomError("run_wide", "a run-wide key: set it for the whole train section"),
                                    loc=("per_method", name, key), input=overrides[key])
                   for name, overrides in self.per_method.items() for key in RUN_WIDE_KEYS if key in overrides]
        for name in self.per_method:  # each job validated here, so that `tauflow validate` finds what `train` would
            try:
                self._job(name)
            except ValidationError as err:
                errors += [InitErrorDetails(type=PydanticCustomError(e["type"], e["msg"]), loc=("per_method", name, *e["loc"]),
                                            input=e["input"]) for e in err.errors()]
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    @model_serializer(mode="wrap")
    def _without_unused_options(self, handler: Any) -> dict[str, Any]:
        """Options of methods not trained are left out: a dumped manifest validates again, and they do not
        enter the stage's hash."""
        return {k: v for k, v in handler(self).items() if not self._unused(k)}

    def _unused(self, key: str) -> bool:
        """Whether `key` is an option of a method this section does not train."""
        return key in OPTION_OWNERS and OPTION_OWNERS[key] not in self.trained

    def _job(self, method: str) -> TrainSection:
        base = self.model_dump(exclude={"methods", "per_method", "method"})
        own = {k: v for k, v in base.items() if OPTION_OWNERS.get(k, method) == method}  # common keys and its options
        return TrainSection.model_validate({**own, **self.per_method.get(method, {}), "method": method})

    def jobs(self) -> list[TrainSection]:
        """One single-method section per method, with its per_method overrides applied."""
        return [self._job(m) for m in self.trained]


class EvalSection(Section):
    prompts: Path
    images_per_prompt: int = Field(4, gt=0)
    models: list[str] = Field(default_factory=list)  # pipeline or LoRA dirs; default: every finished train output
    rewards: list[RewardSpec] = Field(default_factory=list)  # scored in addition to score.rewards (held-out rewards)
    bootstrap: int = Field(1000, gt=0)
    grid_prompts: int = Field(6, ge=0)
    seed: int = Field(1, ge=0)  # prior noises follow the generate seed rule with this run seed

    _prompts_exist = field_validator("prompts")(_existing_path)

    @field_validator("models")
    @classmethod
    def _models_exist(cls, refs: list[str]) -> list[str]:
        missing = [ref for ref in refs if not Path(ref).expanduser().exists()]
        if missing:
            raise ValueError(f"model directories do not exist: {missing}")
        return refs


class Manifest(Section):
    _source: str = PrivateAttr("<manifest>")

    run: RunSection
    generate: GenerateSection | None = None
    score: ScoreSection | None = None
    threshold: ThresholdSection | None = None
    pair: PairSection | None = None
    train: TrainSection | None = None
    eval: EvalSection | None = None

    @model_validator(mode="after")
    def _rewards_are_scored(self) -> Manifest:
        """threshold and pair name rewards by name: each must be one the score stage produces."""
        if self.score is None:
            return self
        scored = [r.name for r in self.score.rewards]
        named = {}
        if self.threshold is not None:
            named["threshold.reward"] = [self.threshold.reward] if self.threshold.reward else []
            named["threshold.composite.weights"] = list(self.threshold.composite.weights) if self.threshold.composite else []
        if self.pair is not None and self.pair.external is None:
            named["pair.reward"] = [self.pair.reward] if self.pair.reward else []
        for key, names in named.items():
            unknown = [n for n in names if n not in scored]
            if unknown:
                raise ValueError(f"{key}: {unknown} not among score.rewards {scored}")
        return self

    @model_validator(mode="after")
    def _rounds_close_the_loop(self) -> Manifest:
        """Several rounds generate, score, label or pair, and train one model each: the next round starts from it."""
        if self.run.rounds == 1:
            return self
        need = f"run.rounds: {self.run.rounds} rounds"
        missing = [name for name in ("generate", "score", "train") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{need} need the sections {missing}")
        if self.train.methods is not None:
            raise ValueError(f"{need} train one model per round: give train.method, not train.methods")
        if self.train.data is not None:
            raise ValueError(f"{need} train on each round's own samples: train.data must not be set")
        data = {"labeled": ("threshold", self.threshold), "pairs": ("pair", self.pair)}[METHODS[self.train.method].data]
        if data[1] is None or getattr(data[1], "external", None) is not None:
            raise ValueError(f"{need} make {self.train.method}'s data from each round's samples: "
                             f"give a {data[0]} section{' without external' if data[1] else ''}")
        return self

    @property
    def source(self) -> str:
        """The file this manifest was read from, for error messages."""
        return self._source

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    def stage_dir(self, stage: str) -> Path:
        """Where a stage writes its output (the folders are declared with the stages, pipeline/stage.py)."""
        from pipeline.stage import stage_named

        return self.output_dir / stage_named(stage).folder

    def require(self, stage: str) -> Any:
        section = getattr(self, stage)
        if section is None:
            raise ManifestError(f"{self.source}: the manifest has no '{stage}' section")
        return section



class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error instead of the last one winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ManifestError(f"{where}: {at}invalid YAML: {getattr(err, 'problem', None) or err}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ManifestError(f"{source}: override '{item}' is not of the form key.path=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ManifestError(f"{source}: override '{item}': '{part}' is not a mapping")
            node = child
        node[parts[-1]] = _parse_yaml(raw, f"{source}: override '{item}'")
    return data


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        got = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e.get('input')!r})"
        if not loc:  # a check across sections: its message starts with the key path
            got = ""
        lines.append(f"{source}: {loc + ': ' if loc else ''}{msg}{got}")
    return "\n".join(lines)


def parse_manifest(data: Any, source: str = "<manifest>") -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: a manifest must be a YAML mapping, got {type(data).__name__}")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        raise ManifestError(_format_errors(source, err)) from None
    manifest._source = source
    return manifest


def load_manifest(path: str | Path, overrides: list[str] | None = None) -> Manifest:
    """Read, override and validate a manifest; every problem is reported with file and key path."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except (FileNotFoundError, IsADirectoryError):
        raise ManifestError(f"{source}: no such manifest file") from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"{source}: not UTF-8 text (byte {err.start})") from None
    data = _parse_yaml(text, source)
    if data is None:
        raise ManifestError(f"{source}: the manifest is empty")
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [], source)
    return parse_manifest(data, source)


def dump_manifest(manifest: Manifest) -> str:
    return yaml.safe_dump(manifest.model_dump(mode="json", exclude_none=True), sort_keys=False)
