"""The eval report: a results table (printed, markdown, HTML), score distributions, training curves and
side-by-side image grids (same prior noise, base vs tuned). report.html is self-contained (images inline)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import Manifest
from pipeline.prompts import load_prompts


def fmt_ci(value: float, ci: list[float] | tuple[float, float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for model in results["models"]:
        for reward, r in model["rewards"].items():
            vs = r.get("vs_base")
            tag = "held-out" if reward in results["heldout_rewards"] else "training"
            rows.append([
                model["name"], f"{reward} ({tag})", fmt_ci(r["mean"], r["ci"]),
                fmt_ci(vs["delta"], vs["delta_ci"]) if vs else "",
                fmt_ci(vs["win_rate"], vs["win_ci"]) + f" ({vs['ties']} ties)" if vs else "",
                f"{model['drift']:.4f}" if "drift" in model else "",
            ])
    return rows


HEADER = ["model", "reward", "mean [95% CI]", "delta vs base [95% CI]", "win rate vs base [95% CI]", "drift"]
HEADER_HTML = [html.escape(h) for h in HEADER]


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval: {results['n_prompts']} held-out prompts x {results['images_per_prompt']} samples, same noise")
    for h in HEADER:
        table.add_column(h)
    for row in table_rows(results):
        table.add_row(*row)
    Console(width=160).print(table)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_plot(results: dict[str, Any]) -> bytes:
    plt = _pyplot()
    rewards = results["rewards"]
    fig, axes = plt.subplots(1, len(rewards), figsize=(4.5 * len(rewards), 3.2), squeeze=False)
    for ax, reward in zip(axes[0], rewards, strict=True):
        for model in results["models"]:
            ax.hist(results["scores"][model["name"]][reward], bins=30, alpha=0.45, label=model["name"])
        ax.set_title(reward)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def forest_png(rows: list[tuple[str, str, float, float, float]], title: str = "delta vs base, 95% CI") -> bytes:
    """A forest plot: one panel per reward, one line per label: (label, reward, delta, lo, hi)."""
    plt = _pyplot()
    rewards = list(dict.fromkeys(r[1] for r in rows))
    labels = list(dict.fromkeys(r[0] for r in rows))
    fig, axes = plt.subplots(1, len(rewards), figsize=(4.2 * len(rewards), 0.45 * len(labels) + 1.2), squeeze=False,
                             sharey=True)
    for ax, reward in zip(axes[0], rewards, strict=True):
        for label, rw, delta, lo, hi in rows:
            if rw != reward:
                continue
            y = len(labels) - 1 - labels.index(label)
            color = "tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:gray"
            ax.plot([lo, hi], [y, y], color=color, lw=2)
            ax.plot([delta], [y], "o", color=color)
        ax.axvline(0, color="black", lw=0.8, ls="--")
        ax.set_yticks(range(len(labels)), labels[::-1])
        ax.set_title(reward, fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def forest_plot(results: dict[str, Any]) -> bytes:
    """Each tuned model's delta vs base with its bootstrap CI, per reward."""
    rows = [(m["name"], f"{reward} ({'held-out' if reward in results['heldout_rewards'] else 'training'})",
             r["vs_base"]["delta"], *r["vs_base"]["delta_ci"])
            for m in results["models"] for reward, r in m["rewards"].items() if "vs_base" in r]
    return forest_png(rows)


def smooth(values: list[float], window: int) -> np.ndarray:
    """A centred moving average (NaNs ignored) of the same length: the trend under a noisy per-step curve."""
    v = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(v)
    kernel = np.ones(window)
    num = np.convolve(np.where(ok, v, 0.0), kernel, mode="same")
    den = np.convolve(ok.astype(np.float64), kernel, mode="same")
    return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)


def curves_plot(train_root: Path) -> bytes | None:
    """Loss and implicit accuracy per step: the raw values faint, a moving average over them."""
    logs = sorted(train_root.glob("*/log.jsonl"))
    if not logs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for i, path in enumerate(logs):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        steps = [r["step"] for r in records]
        window = max(1, len(records) // 20)
        color = f"C{i}"
        for ax, key in zip(axes, ("loss", "implicit_acc"), strict=True):
            raw = [r.get(key, np.nan) if r.get(key) is not None else np.nan for r in records]
            ax.plot(steps, raw, color=color, alpha=0.25, lw=0.8)
            ax.plot(steps, smooth(raw, window), color=color, lw=1.6, label=path.parent.name)
    axes[0].set_title("training loss (line: moving average)")
    axes[1].set_title("implicit accuracy (line: moving average)")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def image_grid(results: dict[str, Any], images: dict[str, list[bytes]], n_prompts: int, prompts: list[str]) -> bytes:
    """Rows: prompts (the first sample of each, named); columns: models (named), all from the same prior noise."""
    plt = _pyplot()
    k = results["images_per_prompt"]
    names = [m["name"] for m in results["models"]]
    rows = min(n_prompts, results["n_prompts"])
    fig, axes = plt.subplots(rows, len(names), figsize=(1.3 * len(names) + 1.8, 1.3 * rows + 0.4), squeeze=False)
    for r in range(rows):
        for c, name in enumerate(names):
            ax = axes[r][c]
            ax.imshow(np.asarray(Image.open(io.BytesIO(images[name][r * k])).convert("RGB")), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(prompts[r], fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return _png(fig)


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def write_report(manifest: Manifest, results: dict[str, Any], images: dict[str, list[bytes]], out: Path) -> None:
    cfg = manifest.require("eval")
    prompts = [p.text for p in load_prompts(cfg.prompts, manifest.require("generate").prompt_column, dedupe=False)[0]]
    figures = {"scores.png": score_plot(results)}
    if cfg.grid_prompts > 0:
        figures["grid.png"] = image_grid(results, images, cfg.grid_prompts, prompts)
    if len(results["models"]) > 1:
        figures["forest.png"] = forest_plot(results)
    curves = curves_plot(manifest.output_dir / "train")
    if curves:
        figures["training.png"] = curves
    for name, data in figures.items():
        (out / name).write_bytes(data)
    names = [m["name"] for m in results["models"]]
    md = [
        f"# tauflow eval: {manifest.run.name}", "",
        f"{results['n_prompts']} held-out prompts ({results['prompts']}), {results['images_per_prompt']} samples each, "
        f"every model from the same prior noises. Held-out rewards: {', '.join(results['heldout_rewards']) or 'none'}.", "",
        markdown_table(results), "",
        *(["![delta vs base per model and reward, 95% CI](forest.png)", ""] if "forest.png" in figures else []),
        "![score distributions](scores.png)", "",
        *(["![training curves](training.png)", ""] if curves else []),
        *([f"Image grid, columns: the models ({', '.join(names)}); rows: the first sample of the first prompts, named.", "",
           "![same-noise grid](grid.png)", ""] if "grid.png" in figures else []),
    ]
    (out / "report.md").write_text("\n".join(md))
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(results))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>tauflow eval: {html.escape(manifest.run.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:14px}}th{{background:#eee}}img{{max-width:100%}}</style></head><body>
<h1>tauflow eval: {html.escape(manifest.run.name)}</h1>
<p>{results['n_prompts']} held-out prompts, {results['images_per_prompt']} samples each, every model from the same prior
noises. Held-out rewards: {html.escape(', '.join(results['heldout_rewards']) or 'none')}.</p>
<table><tr>{''.join(f'<th>{h}</th>' for h in HEADER_HTML)}</tr>{rows}</table>
{'<h2>Delta vs base, 95% CI</h2>' + _img(figures['forest.png'], 'forest plot') if 'forest.png' in figures else ''}
<h2>Score distributions</h2>{_img(figures['scores.png'], 'score distributions')}
{'<h2>Training curves</h2>' + _img(curves, 'training curves') if curves else ''}
{f"<h2>Same noise, side by side</h2><p>Columns: {html.escape(', '.join(names))}.</p>" + _img(figures['grid.png'], 'image grid') if 'grid.png' in figures else ''}
</body></html>"""
    (out / "report.html").write_text(page)
    print_table(results)

