"""Eval: a model against itself is a tie everywhere; the report shows exactly results.json; the HTML renders."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import numpy as np
import pytest

from pipeline.config import load_manifest
from pipeline.evaluation import cluster_bootstrap, paired, run_eval
from pipeline.report import curves_plot, fmt_ci, forest_plot, image_grid, smooth, write_report
from tests.conftest import write_manifest


@pytest.fixture(scope="module")
def self_eval(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("eval")
    (root / "eval.txt").write_text("a red cat\na blue dog\nan orange fox\n")
    model = str(tiny_model("sd3"))
    data = {
        "run": {"name": "ev", "output_dir": str(root / "out"), "executor": "local"},
        "generate": {"model": model, "prompts": str(root / "eval.txt"), "num_inference_steps": 2, "height": 16,
                     "width": 16, "batch_size": 6, "guidance_scale": 2.0},
        "score": {"rewards": [{"name": "bright", "kind": "tests.plugin_rewards:Brightness"}]},
        "eval": {"prompts": str(root / "eval.txt"), "images_per_prompt": 2, "models": [model], "bootstrap": 200},
    }
    manifest = load_manifest(write_manifest(root / "m.yaml", data))
    return run_eval(manifest), manifest


def test_model_against_itself_is_all_ties(self_eval):
    out, _ = self_eval
    results = json.loads((out / "results.json").read_text())
    tuned = results["models"][1]
    vs = tuned["rewards"]["bright"]["vs_base"]
    assert vs["delta"] == 0 and vs["delta_ci"] == [0, 0]
    assert vs["win_rate"] == 0.5 and vs["ties"] == 6 and vs["wins"] == vs["losses"] == 0
    assert tuned["drift"] == 0


def test_report_shows_the_numbers_of_results_json(self_eval):
    out, _ = self_eval
    results = json.loads((out / "results.json").read_text())
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for model in results["models"]:
        r = model["rewards"]["bright"]
        assert fmt_ci(r["mean"], r["ci"]) in md and fmt_ci(r["mean"], r["ci"]) in page
        mean = np.mean(results["scores"][model["name"]]["bright"])
        assert r["mean"] == pytest.approx(mean)
    assert (out / "grid.png").stat().st_size > 0 and "data:image/png;base64," in page


def test_report_contains_the_forest_plot_and_the_named_grid(self_eval):
    out, _ = self_eval
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for name in ("forest.png", "grid.png", "scores.png"):
        assert (out / name).read_bytes()[:8] == PNG and f"]({name})" in md
    assert page.count("data:image/png;base64,") == 3  # forest, scores, grid (no training under this run)
    assert "rows: the first sample of the first prompts, named" in md


def test_grid_prompts_zero_writes_the_report_without_a_grid(self_eval, tmp_path):
    out, manifest = self_eval
    results = json.loads((out / "results.json").read_text())
    cfg = manifest.model_copy(update={"eval": manifest.eval.model_copy(update={"grid_prompts": 0})})
    write_report(cfg, results, {}, tmp_path)  # no images needed when no grid is drawn
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert not (tmp_path / "grid.png").exists() and "grid.png" not in md and "Same noise" not in page
    assert (tmp_path / "forest.png").exists() and page.count("data:image/png;base64,") == 2


PNG = b"\x89PNG\r\n\x1a\n"
TINY = {
    "n_prompts": 2, "images_per_prompt": 1, "rewards": ["r"], "heldout_rewards": [],
    "models": [{"name": "base", "rewards": {"r": {"mean": 0.5, "ci": [0.4, 0.6]}}},
               {"name": "tuned", "rewards": {"r": {"mean": 0.6, "ci": [0.5, 0.7], "vs_base": {"delta": 0.1, "delta_ci": [0.02, 0.2]}}}}],
}


def _png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    assert data[:8] == PNG
    return Image.open(io.BytesIO(data)).size


def test_forest_plot_of_a_tiny_results_dict_is_a_png():
    w, h = _png_size(forest_plot(TINY))
    assert w > 100 and h > 50


def test_image_grid_has_a_cell_per_model_and_prompt():
    from PIL import Image

    def tile(v: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (v, v, v)).save(buf, format="PNG")
        return buf.getvalue()

    images = {"base": [tile(0), tile(60)], "tuned": [tile(120), tile(250)]}
    one = _png_size(image_grid(TINY, images, 1, ["a cat", "a dog"]))
    two = _png_size(image_grid(TINY, images, 2, ["a cat", "a dog"]))
    assert two[1] > one[1]  # a row per prompt


def test_training_curves_smooth_over_the_raw_line(tmp_path):
    (tmp_path / "tgo").mkdir()
    rows = [{"step": i + 1, "loss": float(i % 2), "implicit_acc": 0.5} for i in range(40)]
    (tmp_path / "tgo" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _png_size(curves_plot(tmp_path))
    assert smooth([0.0, 1.0] * 20, 4)[10] == pytest.approx(0.5)  # the alternation averages out
    assert smooth([1.0, float("nan"), 3.0], 3)[1] == pytest.approx(2.0)  # NaN (no metric that step) is skipped


def test_paired_statistics_by_hand():
    rng = np.random.default_rng(0)
    base = np.array([[0.1, 0.2], [0.3, 0.4]])
    tuned = np.array([[0.2, 0.2], [0.1, 0.5]])
    s = paired(tuned, base, 500, rng)
    assert s["delta"] == pytest.approx(0.0) and s["wins"] == 2 and s["ties"] == 1 and s["losses"] == 1
    assert s["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    lo, hi = cluster_bootstrap(np.ones((3, 2)), 100, rng)
    assert lo == hi == 1.0


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_html_report_renders_in_headless_chromium(self_eval, tmp_path):
    from PIL import Image

    out, _ = self_eval
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1100,900", f"file://{out / 'report.html'}"],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 5  # not a blank page: text, table and images drew
