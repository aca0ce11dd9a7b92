"""Bad input, table-driven: every case exits non-zero with one line naming the file, key or row and what is
wrong, prints no traceback, and leaves what was already written unchanged.

Each row builds its input in a fresh directory (a small valid run set-up, then one defect), runs the real
`tauflow` entry point, and compares the directory's files before and after.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tests.synthetic import scored_dataset, write_kind


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Path], list[str]]  # writes the input under the directory, returns the tauflow arguments
    message: str  # a regex the one error line must match


def _manifest(root: Path, **sections) -> Path:
    """A valid manifest over an existing (empty) model dir and a prompt file, with `sections` merged in."""
    (root / "model").mkdir(exist_ok=True)
    (root / "prompts.txt").write_text("a red cat\na blue dog\n")
    data = {
        "run": {"name": "bad", "output_dir": str(root / "out"), "executor": "local"},
        "generate": {"model": str(root / "model"), "prompts": str(root / "prompts.txt")},
        "score": {"rewards": [{"name": "bright", "kind": "tests.plugin_rewards:Brightness"}]},
        "threshold": {"reward": "bright"},
        "pair": {"reward": "bright"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    if "eval" in data:
        data["eval"].setdefault("prompts", str(root / "prompts.txt"))
    path = root / "m.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _validate(**sections) -> Callable[[Path], list[str]]:
    return lambda root: ["validate", str(_manifest(root, **sections))]


def _duplicate_key(root: Path) -> list[str]:
    path = _manifest(root)
    path.write_text(path.read_text().replace("run:\n", "run:\n  seed: 1\n  seed: 2\n", 1))
    return ["validate", str(path)]


def _override(value: str) -> Callable[[Path], list[str]]:
    return lambda root: ["validate", str(_manifest(root)), value]


def _latin1_prompts(root: Path) -> list[str]:
    path = _manifest(root)
    (root / "prompts.txt").write_bytes("a red cat\nun caf\xe9\n".encode("latin-1"))
    return ["generate", str(path)]


def _edited_dataset(edit: Callable[[dict], None]) -> Callable[[Path], list[str]]:
    """A complete samples dataset whose manifest.json was then edited by hand."""

    def setup(root: Path) -> list[str]:
        path = write_kind(root / "samples", "samples", shards=3, rows=4)
        manifest = json.loads((path / "manifest.json").read_text())
        edit(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))
        return ["inspect", str(path), "--verify"]

    return setup


def _constant_scores(root: Path) -> list[str]:
    scored_dataset(root / "out" / "scored", [{"bright": [0.5, 0.5, 0.5]}, {"bright": [0.5, 0.5, 0.5]}])
    return ["threshold", str(_manifest(root))]


def _resume_without_checkpoint(root: Path) -> list[str]:
    data = write_kind(root / "labeled", "labeled")
    return ["train", str(_manifest(root, train={"method": "tgo", "data": str(data)})), "--resume", "latest"]


def _latents_of_another_size(root: Path) -> list[str]:
    """Recorded 8x8 latents (tests.synthetic) into a tiny SD3 model generating at 32 px (16x16 latents)."""
    from tests.tiny_models import save_tiny

    data = write_kind(root / "labeled", "labeled")
    path = _manifest(root, generate={"model": str(save_tiny("sd3", root / "model")), "height": 32, "width": 32},
                     train={"method": "tgo", "data": str(data)})
    return ["train", str(path)]


def _drop_feature(manifest: dict) -> None:
    del manifest["features"]["seed"]


CASES = [
    Case("duplicate YAML key", _duplicate_key, r"m\.yaml: line \d+, column \d+: invalid YAML: duplicate key 'seed'"),
    Case("override with broken YAML", _override("generate.pipeline_kwargs={a: [1,"),
         r"m\.yaml: override 'generate\.pipeline_kwargs=\{a: \[1,': .*invalid YAML"),
    Case("boolean for a count", _override("generate.images_per_prompt=true"),
         r"m\.yaml: generate\.images_per_prompt: expected a number, got a boolean"),
    Case("threshold names an unscored reward", _validate(threshold={"reward": "hps"}),
         r"m\.yaml: threshold\.reward: \['hps'\] not among score\.rewards \['bright'\]"),
    Case("pair names an unscored reward", _validate(pair={"reward": "pick"}),
         r"m\.yaml: pair\.reward: \['pick'\] not among score\.rewards \['bright'\]"),
    Case("composite weighs an unscored reward",
         _validate(threshold={"reward": None, "composite": {"weights": {"bright": 1.0, "aes": 1.0}}}),
         r"m\.yaml: threshold\.composite\.weights: \['aes'\] not among score\.rewards"),
    Case("eval.models names a missing dir", _validate(eval={"models": ["/no/such/model"]}),
         r"m\.yaml: eval\.models: model directories do not exist: \['/no/such/model'\]"),
    Case("per_method key misspelled", _validate(train={"method": "tgo", "per_method": {"tgo": {"betta": 0.2}}}),
         r"m\.yaml: train\.per_method\.tgo\.betta: unknown key"),
    Case("per_method option of another method",
         _validate(train={"methods": ["tgo", "dpo"], "per_method": {"dpo": {"temperature": 0.1}}}),
         r"m\.yaml: train\.per_method\.dpo\.temperature: an option of method tgo, not of dpo"),
    Case("top-level option of an untrained method", _validate(train={"method": "dpo", "kto_desirable_weight": 2.0}),
         r"m\.yaml: train\.kto_desirable_weight: an option of method kto"),
    Case("scores all equal", _constant_scores, r"scored: all 6 scores of \{'bright': 1\.0\} equal 0\.5; a threshold cannot"),
    Case("--resume latest without a checkpoint", _resume_without_checkpoint,
         r"checkpoints: no complete checkpoint to resume from; run without --resume"),
    Case("training latents of another size", _latents_of_another_size,
         r"labeled: recorded latents of shape \(4, 8, 8\), but the model takes \(4, 16, 16\) at generate\.height x "
         r"width = 32x32"),
    Case("prompt file not UTF-8", _latin1_prompts, r"prompts\.txt: line 2: not UTF-8 text"),
    Case("manifest lists a shard twice",
         _edited_dataset(lambda m: m["shards"].__setitem__(2, dict(m["shards"][1]))),
         r"samples/manifest\.json: the shard list is not part-00000 \.\.\. in order \(repeated \['part-00001\.parquet'\]"),
    Case("manifest leaves a shard out", _edited_dataset(lambda m: m["shards"].pop()),
         r"samples/manifest\.json: shards on disk that the manifest does not list: \['part-00002\.parquet'\]"),
    Case("manifest row count edited", _edited_dataset(lambda m: m.__setitem__("num_rows", 11)),
         r"samples/manifest\.json: num_rows is 11 but the shards hold 12 rows"),
    Case("manifest drops a feature", _edited_dataset(_drop_feature),
         r"part-00000\.parquet: columns do not match the manifest's features \(in the shard only: \['seed'\]"),
    Case("manifest shards malformed", _edited_dataset(lambda m: m.__setitem__("shards", "abc")),
         r"samples/manifest\.json: 'shards' must be a list, got str"),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, tmp_path, capsys):
    argv = case.setup(tmp_path)
    capsys.readouterr()  # what building the input printed
    before = _snapshot(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert re.search(case.message, err), err
    assert _snapshot(tmp_path) == before


def test_options_may_follow_the_overrides(tmp_path, capsys):
    path = _manifest(tmp_path)
    assert main(["validate", str(path), "run.seed=3", "--print"]) == 0
    assert "seed: 3" in capsys.readouterr().out


def test_a_start_that_failed_does_not_block_the_corrected_rerun(tmp_path, capsys):
    """A bad model path fails before any shard is written; the corrected manifest then runs, not 'started with a
    different configuration'."""
    from tests.tiny_models import save_tiny

    small = {"images_per_prompt": 2, "num_inference_steps": 2, "height": 16, "width": 16}
    path = _manifest(tmp_path, generate=small)  # its model dir is empty: loading fails
    assert main(["generate", str(path)]) == 2
    assert "cannot load the pipeline" in capsys.readouterr().err
    fixed = _manifest(tmp_path, generate={**small, "model": str(save_tiny("sd3", tmp_path / "tiny"))})
    assert main(["generate", str(fixed)]) == 0
    assert (tmp_path / "out" / "samples" / "manifest.json").exists()


HOLDER = """
import sys, time
from pipeline.lock import OutputLock
with OutputLock(sys.argv[1], "generate"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys

    path = _manifest(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "out" / "samples")], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(tmp_path)
        assert main(["generate", str(path), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert re.fullmatch(rf"error: .*samples: another tauflow process is writing it \(generate, pid {holder.pid} on .*", err)
        assert _snapshot(tmp_path) == before
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
