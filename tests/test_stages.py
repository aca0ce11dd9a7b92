"""Stages declared once: the CLI is the stage list, every record names its inputs' manifests, and a changed input
(relabelled data, a retrained model) is refused instead of being met by "complete; skipping"."""

from __future__ import annotations

import json
import re

import pytest
from tests.conftest import write_manifest
from tests.train_harness import PROMPTS

from pipeline.cli import build_parser, main
from pipeline.config import load_manifest
from pipeline.shards import sha256_file
from pipeline.stage import STAGES

RELABEL = "threshold.percentile=80"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    """A tiny SD3 run of all six stages through `tauflow run`; returns (manifest path, output dir, printed lines)."""
    root = tmp_path_factory.mktemp("stages")
    (root / "prompts.txt").write_text(PROMPTS)
    (root / "eval.txt").write_text("a red cat\nan orange fox\n")
    data = {
        "run": {"name": "s", "output_dir": str(root / "out"), "executor": "local"},
        "generate": {"model": str(tiny_model("sd3")), "prompts": str(root / "prompts.txt"), "images_per_prompt": 4,
                     "num_inference_steps": 2, "height": 16, "width": 16, "batch_size": 8, "guidance_scale": 2.0},
        "score": {"rewards": [{"name": "bright", "kind": "tests.plugin_rewards:Brightness"}]},
        "threshold": {"reward": "bright"},
        "pair": {"reward": "bright"},
        "train": {"method": "tgo", "batch_size": 4, "learning_rate": 1e-3, "max_steps": 2},
        "eval": {"prompts": str(root / "eval.txt"), "images_per_prompt": 1, "bootstrap": 20, "grid_prompts": 1},
    }
    path = str(write_manifest(root / "m.yaml", data))
    return path, root / "out"


def test_cli_subcommands_and_folders_are_the_stage_list(tmp_path, prompts_file, capsys):
    commands = list(build_parser()._subparsers._group_actions[0].choices)
    names = [stage.name for stage in STAGES]
    assert names == ["generate", "score", "threshold", "pair", "train", "eval"]
    assert commands[: len(names)] == names
    assert set(commands) - set(names) == {"run", "validate", "inspect", "world", "regenerate"}
    data = {"run": {"name": "v", "output_dir": str(tmp_path / "out")}, "threshold": {"reward": "r"},
            "generate": {"model": "org/model", "prompts": str(prompts_file)}}
    manifest = write_manifest(tmp_path / "v.yaml", data)
    folders = {name: load_manifest(manifest).stage_dir(name).name for name in names}
    assert folders == {"generate": "samples", "score": "scored", "threshold": "labeled", "pair": "pairs",
                       "train": "train", "eval": "eval"}
    assert main(["validate", str(manifest)]) == 0
    assert "valid; stages: generate, threshold;" in capsys.readouterr().out  # configured ones, in stage order


def test_run_executes_every_stage_in_order_and_each_record_names_its_inputs(run, capsys):
    path, out = run
    assert main(["run", path]) == 0
    printed = [m[1] for line in capsys.readouterr().out.splitlines() if (m := re.fullmatch(rf"(\w+): {out}\S*", line))]
    assert printed == ["generate", "score", "threshold", "pair", "train", "eval"]
    records = {"samples": out / "samples/manifest.json", "scored": out / "scored/manifest.json",
               "labeled": out / "labeled/manifest.json", "pairs": out / "pairs/manifest.json",
               "train/tgo": out / "train/tgo/done.json", "eval": out / "eval/results.json"}
    read = {name: {i["path"]: i["manifest_sha256"] for i in json.loads(file.read_text())["inputs"]}
            for name, file in records.items()}
    expected = {"samples": [], "scored": ["samples"], "labeled": ["scored"], "pairs": ["scored"],
                "train/tgo": ["labeled"], "eval": ["train/tgo"]}
    for name, inputs in expected.items():
        assert read[name] == {str(out / i): sha256_file(records[i]) for i in inputs}, name


def test_relabelled_data_and_a_retrained_model_are_refused_not_skipped(run, capsys, caplog):
    path, out = run
    assert main(["run", path]) == 0  # (finished by the previous test, or now) everything is complete
    assert main(["threshold", path, RELABEL, "--overwrite"]) == 0
    with caplog.at_level("INFO", logger="tauflow"):
        assert main(["pair", path, RELABEL]) == 0  # pairs read the scores, which did not change
    assert f"pair: {out / 'pairs'} is complete; skipping" in caplog.text
    capsys.readouterr()
    assert main(["train", path, RELABEL]) == 2
    assert (f"error: {out / 'train/tgo'}: was made from other inputs ({out / 'labeled'} changed); "
            "rerun with --overwrite to replace it") in capsys.readouterr().err
    done = (out / "train/tgo/done.json").read_text()
    assert main(["train", path, RELABEL, "--overwrite"]) == 0
    assert json.loads((out / "train/tgo/done.json").read_text())["inputs"][0]["manifest_sha256"] == sha256_file(out / "labeled/manifest.json")
    assert (out / "train/tgo/done.json").read_text() != done
    capsys.readouterr()
    assert main(["eval", path, RELABEL]) == 2
    assert (f"error: {out / 'eval'}: was made from other inputs ({out / 'train/tgo'} changed); "
            "rerun with --overwrite to replace it") in capsys.readouterr().err
    assert main(["eval", path, RELABEL, "--overwrite"]) == 0
    caplog.clear()
    with caplog.at_level("INFO", logger="tauflow"):
        assert main(["run", path, RELABEL]) == 0  # complete again, each with its current inputs
    for stage, folder in (("threshold", "labeled"), ("train", "train/tgo"), ("eval", "eval")):
        assert f"{stage}: {out / folder} is complete; skipping" in caplog.text
