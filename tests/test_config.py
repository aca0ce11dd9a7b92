"""Run manifests: validation messages name the file, the key path and the problem; overrides; resolution."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import dump_manifest, load_manifest, parse_manifest
from pipeline.errors import ManifestError


@pytest.fixture
def base(tmp_path, prompts_file):
    model = tmp_path / "model"
    model.mkdir()
    return {
        "run": {"name": "x", "output_dir": str(tmp_path / "out"), "seed": 3},
        "generate": {"model": str(model), "prompts": str(prompts_file)},
        "score": {"rewards": [{"name": "hps", "kind": "clipscore"}]},
        "threshold": {"reward": "hps", "percentile": 50, "mode": "global", "c": 5.0},
        "pair": {"reward": "hps", "strategy": "best_worst"},
    }


def _write(tmp_path, data) -> str:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _set(data: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return data


class _Delete:
    def __repr__(self) -> str:  # a stable test id (xdist compares ids across workers)
        return "<delete>"


_DELETE = _Delete()

BAD = [
    ("run.bogus", 1, "run.bogus: unknown key"),
    ("generate.images_per_prompt", 0, "generate.images_per_prompt: Input should be greater than 0"),
    ("generate.num_inference_steps", -5, "generate.num_inference_steps: Input should be greater than 0"),
    ("generate.height", "tall", "generate.height: Input should be a valid integer"),
    ("generate.noise_dtype", "int8", "generate.noise_dtype: Input should be 'float16' or 'float32'"),
    ("generate.prompts", "/no/such/prompts.txt", "generate.prompts: path does not exist"),
    ("generate.model", "./no/such/model", "generate.model: local model path does not exist"),
    ("threshold.percentile", 100, "threshold.percentile: Input should be less than 100"),
    ("threshold.percentile", 0, "threshold.percentile: Input should be greater than 0"),
    ("threshold.c", -1.0, "threshold.c: Input should be greater than or equal to 0"),
    ("threshold.mode", "median", "threshold.mode: Input should be 'global', 'per_prompt' or 'shrunk'"),
    ("pair.strategy", "random", "pair.strategy: Input should be 'best_worst', 'all' or 'top_bottom_k'"),
    ("pair.min_gap", -0.1, "pair.min_gap: Input should be greater than or equal to 0"),
    ("run.name", _DELETE, "run.name: required key is missing"),
    ("score.rewards.0.name", "has space", "score.rewards.0.name: String should match pattern"),
    ("run.seed", -1, "run.seed: Input should be greater than or equal to 0"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD, ids=[b[0] + "=" + str(b[1]) for b in BAD])
def test_bad_manifest_names_file_key_and_problem(tmp_path, base, key, value, message):
    path = _write(tmp_path, _set(base, key, value))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert f"{path}: {message}" in str(err.value)


def test_duplicate_reward_names_are_refused(tmp_path, base):
    base["score"]["rewards"].append({"name": "hps", "kind": "pickscore"})
    with pytest.raises(ManifestError, match=r"score: reward names must be unique, repeated: \['hps'\]"):
        load_manifest(_write(tmp_path, base))


def test_threshold_needs_exactly_one_score_source(tmp_path, base):
    base["threshold"]["composite"] = {"weights": {"hps": 1.0}}
    with pytest.raises(ManifestError, match="threshold: give exactly one of 'reward' or 'composite'"):
        load_manifest(_write(tmp_path, base))


def test_every_problem_is_reported_at_once(tmp_path, base):
    base["generate"]["height"] = 0
    base["pair"]["k"] = 0
    with pytest.raises(ManifestError) as err:
        load_manifest(_write(tmp_path, base))
    assert "generate.height" in str(err.value) and "pair.k" in str(err.value)


def test_missing_empty_and_malformed_files(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest file"):
        load_manifest(tmp_path / "absent.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ManifestError, match="empty.yaml: the manifest is empty"):
        load_manifest(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("run: {name: x\n  output_dir: y")
    with pytest.raises(ManifestError, match=r"bad.yaml: line \d+, column \d+: invalid YAML"):
        load_manifest(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ManifestError, match="list.yaml: a manifest must be a YAML mapping, got list"):
        load_manifest(tmp_path / "list.yaml")


def test_dotted_overrides_are_parsed_as_yaml_and_validated(tmp_path, base):
    path = _write(tmp_path, base)
    m = load_manifest(path, ["generate.images_per_prompt=4", "threshold.mode=per_prompt", "run.executor=local"])
    assert m.generate.images_per_prompt == 4 and m.threshold.mode == "per_prompt" and m.run.executor == "local"
    with pytest.raises(ManifestError, match="generate.images_per_prompt: Input should be greater than 0"):
        load_manifest(path, ["generate.images_per_prompt=0"])
    with pytest.raises(ManifestError, match="override 'oops' is not of the form key.path=value"):
        load_manifest(path, ["oops"])


def test_resolved_manifest_round_trips(tmp_path, base):
    m = load_manifest(_write(tmp_path, base))
    again = parse_manifest(yaml.safe_load(dump_manifest(m)))
    assert again.model_dump() == m.model_dump()
    assert m.stage_dir("generate").name == "samples" and m.stage_dir("threshold").name == "labeled"


def test_content_hash_ignores_execution_settings_only(tmp_path, base):
    m = load_manifest(_write(tmp_path, base))
    more_workers = m.generate.model_copy(update={"num_workers": 8, "max_retries": 5})
    more_images = m.generate.model_copy(update={"images_per_prompt": 9})
    assert more_workers.content_hash() == m.generate.content_hash()
    assert more_images.content_hash() != m.generate.content_hash()


def test_pnapo_samples_noise_heavy_sigmas_unless_told_otherwise(tmp_path, base):
    train = {"methods": ["pnapo", "dpo"], "max_steps": 5}
    jobs = load_manifest(_write(tmp_path, {**base, "train": train})).train.jobs()
    assert [(j.method, j.logit_mean) for j in jobs] == [("pnapo", 2.0), ("dpo", 0.0)]
    told = {**train, "logit_mean": 0.5, "per_method": {"dpo": {"logit_mean": 1.0}}}
    jobs = load_manifest(_write(tmp_path, {**base, "train": told})).train.jobs()
    assert [(j.method, j.logit_mean) for j in jobs] == [("pnapo", 0.5), ("dpo", 1.0)]


@pytest.mark.parametrize(("per_method", "message"), [
    ({"tgo": {"betta": 0.2}}, "train.per_method.tgo.betta: unknown key"),
    ({"tgo": {"kto_desirable_weight": 2.0}}, "train.per_method.tgo.kto_desirable_weight: an option of method kto, not of tgo"),
    ({"dpo": {"beta": -1}}, "train.per_method.dpo.beta: Input should be greater than 0"),
    ({"pnapo": {"dynamic_beta": {"gap": "maybe"}}}, "train.per_method.pnapo.dynamic_beta.gap: Input should be a valid boolean"),
])
def test_per_method_is_validated_for_its_method_with_the_key_path(tmp_path, base, per_method, message):
    base["train"] = {"methods": ["tgo", "pnapo", "dpo"], "per_method": per_method}
    path = _write(tmp_path, base)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert f"{path}: {message}" in str(err.value)


@pytest.mark.parametrize(("train", "message"), [
    ({"method": "dpo", "temperature": 0.01}, "train.temperature: an option of method tgo, not of dpo"),
    ({"methods": ["tgo", "dpo"], "dynamic_beta": {"gap": False}}, "train.dynamic_beta: an option of method pnapo, not of tgo or dpo"),
    ({"method": "dppo"}, "train.method: Input should be 'tgo', 'pnapo', 'dpo', 'kto' or 'sft'"),
])
def test_options_of_methods_not_trained_and_unknown_methods_are_refused(tmp_path, base, train, message):
    path = _write(tmp_path, {**base, "train": train})
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert f"{path}: {message}" in str(err.value)


def test_each_job_has_its_own_options_and_its_resolved_manifest_loads_again(tmp_path, base):
    train = {"methods": ["tgo", "pnapo", "kto", "sft"], "temperature": 0.01, "kto_desirable_weight": 2.0,
             "per_method": {"tgo": {"beta": 0.2}, "pnapo": {"dynamic_beta": {"gap": False}}}}
    m = load_manifest(_write(tmp_path, {**base, "train": train}))
    jobs = {j.method: j for j in m.train.jobs()}
    assert (jobs["tgo"].beta, jobs["tgo"].temperature, jobs["pnapo"].beta) == (0.2, 0.01, None)
    assert jobs["pnapo"].dynamic_beta.gap is False and jobs["kto"].kto_desirable_weight == 2.0
    assert "temperature" not in jobs["sft"].model_dump() and "dynamic_beta" not in jobs["tgo"].model_dump()
    for manifest in [m, *(m.model_copy(update={"train": j}) for j in jobs.values())]:
        assert parse_manifest(yaml.safe_load(dump_manifest(manifest))).model_dump() == manifest.model_dump()


@pytest.mark.parametrize(("train", "message"), [
    ({"method": "dpo", "frozen_dtype": "bf16"},
     "train.frozen_dtype: bf16 frozen weights compute only under bf16 autocast: set mixed_precision bf16, or frozen_dtype auto or fp32"),
    ({"method": "dpo", "mixed_precision": "fp16", "frozen_dtype": "bf16"}, "train.frozen_dtype: bf16 frozen weights compute only"),
    ({"methods": ["dpo", "tgo"], "per_method": {"dpo": {"mixed_precision": "no"}}},
     "train.per_method.dpo.mixed_precision: a run-wide key: set it for the whole train section"),
    ({"methods": ["dpo", "tgo"], "per_method": {"tgo": {"frozen_dtype": "fp32"}}},
     "train.per_method.tgo.frozen_dtype: a run-wide key: set it for the whole train section"),
])
def test_precision_keys_are_checked_up_front(tmp_path, base, train, message):
    path = _write(tmp_path, {**base, "train": train})
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert f"{path}: {message}" in str(err.value)


@pytest.mark.parametrize(("train", "dtype"), [({}, "float32"), ({"mixed_precision": "bf16"}, "bfloat16"),
                                              ({"mixed_precision": "fp16"}, "float16"),
                                              ({"mixed_precision": "bf16", "frozen_dtype": "fp32"}, "float32"),
                                              ({"mixed_precision": "fp16", "frozen_dtype": "fp16"}, "float16")])
def test_frozen_dtype_auto_follows_mixed_precision(tmp_path, base, train, dtype):
    m = load_manifest(_write(tmp_path, {**base, "train": {"method": "dpo", **train}}))
    assert m.train.frozen_torch_dtype == dtype and all(j.frozen_torch_dtype == dtype for j in m.train.jobs())
