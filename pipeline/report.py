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


def score_plot(results: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = results["rewards"]
    fig, axes = plt.subplots(1, len(rewards), figsize=(4.5 * len(rewards), 3.2), squeeze=False)
    for ax, reward in zip(axes[0], rewards, strict=True):
        for model in results["models"]:
            ax.hist(results["scores"][model["name"]][reward], bins=30, alpha=0.45, label=model["name"])
        ax.set_title(reward)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def curves_plot(train_root: Path) -> bytes | None:
    logs = sorted(train_root.glob("*/log.jsonl"))
    if not logs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for path in logs:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        steps = [r["step"] for r in records]
        a.plot(steps, [r["loss"] for r in records], label=path.parent.name)
        b.plot(steps, [r.get("implicit_acc", np.nan) for r in records], label=path.parent.name)
    a.set_title("training loss")
    b.set_title("implicit accuracy")
    a.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def image_grid(results: dict[str, Any], images: dict[str, list[bytes]], n_prompts: int) -> bytes:
    """Rows: prompts (first sample of each); columns: models, all from the same prior noise."""
    k = results["images_per_prompt"]
    names = [m["name"] for m in results["models"]]
    first = Image.open(io.BytesIO(images[names[0]][0]))
    scale = max(1, 96 // first.width)
    w, h = first.width * scale, first.height * scale
    rows = min(n_prompts, results["n_prompts"])
    grid = Image.new("RGB", (len(names) * (w + 4), rows * (h + 4)), "white")
    for r in range(rows):
        for c, name in enumerate(names):
            im = Image.open(io.BytesIO(images[name][r * k])).convert("RGB").resize((w, h), Image.NEAREST)
            grid.paste(im, (c * (w + 4), r * (h + 4)))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def write_report(manifest: Manifest, results: dict[str, Any], images: dict[str, list[bytes]], out: Path) -> None:
    cfg = manifest.require("eval")
    figures = {"scores.png": score_plot(results), "grid.png": image_grid(results, images, cfg.grid_prompts)}
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
        "![score distributions](scores.png)", "",
        *(["![training curves](training.png)", ""] if curves else []),
        f"Image grid, columns: {', '.join(names)}; rows: the first sample of the first prompts.", "",
        "![same-noise grid](grid.png)", "",
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
<h2>Score distributions</h2>{_img(figures['scores.png'], 'score distributions')}
{'<h2>Training curves</h2>' + _img(curves, 'training curves') if curves else ''}
<h2>Same noise, side by side</h2><p>Columns: {html.escape(', '.join(names))}.</p>{_img(figures['grid.png'], 'image grid')}
</body></html>"""
    (out / "report.html").write_text(page)
    print_table(results)

