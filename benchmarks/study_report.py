"""The study's report: the claims of the TGO and PNAPO papers judged in this world, a forest plot of the chosen
configurations, held-out reward vs step, and the tuning and ablation tables (report.md and a self-contained
report.html)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from pipeline.report import _png, _pyplot, forest_png

REWARDS = {"fidelity": "fidelity (training)", "heldout": "heldout (held-out)"}


def fmt(s: dict[str, float]) -> str:
    return f"{s['delta']:+.3f} [{s['lo']:+.3f}, {s['hi']:+.3f}]"


def verdict(contrast: dict[str, float]) -> str:
    """A claim 'A > B' from the two-level CI of A - B."""
    return "reproduced" if contrast["lo"] > 0 else "not reproduced" if contrast["hi"] < 0 else "inconclusive"


def curves_png(curves: dict[str, list[dict[str, float]]]) -> bytes:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, ("heldout", "drift"), strict=True):
        for method, points in curves.items():
            ax.plot([p["step"] for p in points], [p[key] for p in points], "o-", label=method)
        ax.set_xlabel("training step")
        ax.set_title("held-out reward delta vs base (seed 0)" if key == "heldout" else "drift (seed 0)", fontsize=10)
    axes[0].axhline(0, color="black", lw=0.8, ls="--")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def write_study_report(res: dict[str, Any], out: Path) -> None:
    """report.md, report.html, forest.png and curves.png under `out`; results.json with every number."""
    main, ab, scale = res["main"], res["ablations"], res["scale"]
    forest = forest_png([(m, REWARDS[r], s[r]["delta"], s[r]["lo"], s[r]["hi"]) for m, s in main.items() for r in REWARDS],
                        "delta vs base, 95% CI over seeds and prompts")
    ab_forest = forest_png([(name, REWARDS[r], s[r]["delta"], s[r]["lo"], s[r]["hi"]) for name, s in ab.items() for r in REWARDS],
                           "ablations: delta vs base, 95% CI over seeds and prompts")
    figures = {"forest.png": forest, "ablations.png": ab_forest, "curves.png": curves_png(res["curves"])}
    for name, data in figures.items():
        (out / name).write_bytes(data)
    (out / "results.json").write_text(json.dumps(res, indent=1))

    md = [
        "# tauflow method study in the digits world", "",
        f"Budget per run: {scale['steps']} steps x {scale['batch_size']}. Tuning grid: learning rates "
        f"{', '.join(f'{x:g}' for x in scale['learning_rates'])} x {scale['betas']} beta(s) per method, seed 0, judged "
        f"by the training reward's delta on {res['tune_prompts']} tuning prompts held out of training. Chosen configurations trained at "
        f"{scale['seeds']} seed(s) (ablations: {scale['ablation_seeds']}), evaluated on the evaluation prompts "
        f"({scale['eval_images']} samples each). CIs: 95%, two-level bootstrap (seeds, then prompts). "
        f"Run time {res['seconds'] / 60:.1f} min.", "",
        "## Claims of the papers, in this world", "",
        *table(["claim", "verdict", "numbers (held-out reward unless named)"], [[c["claim"], c["verdict"], c["numbers"]]
                                                                              for c in res["claims"]]), "",
        "## Chosen configurations, evaluation prompts", "",
        "![forest plot](forest.png)", "",
        *table(["method", "config", "fidelity delta", "heldout delta", "drift", "heldout delta per seed"],
               [[m, json.dumps(res["chosen"][m]), fmt(s["fidelity"]), fmt(s["heldout"]), f"{s['drift']:.4f}",
                 ", ".join(f"{x:+.3f}" for x in s["heldout"]["seeds"])] for m, s in main.items()]), "",
        f"Base means: {', '.join(f'{r} {v:.3f}' for r, v in res['base'].items())}.", "",
        "## Held-out reward vs training step", "",
        "![reward vs step](curves.png)", "",
        *table(["method", *(f"step {p['step']}" for p in next(iter(res["curves"].values())))],
               [[m, *(f"{p['heldout']:+.3f} (drift {p['drift']:.3f})" for p in pts)] for m, pts in res["curves"].items()]), "",
        "## Ablations (chosen configurations)", "",
        "![ablations](ablations.png)", "",
        *table(["run", "fidelity delta", "heldout delta", "drift", "seeds"],
               [[n, fmt(s["fidelity"]), fmt(s["heldout"]), f"{s['drift']:.4f}", str(s["n_seeds"])] for n, s in ab.items()]), "",
        "## Tuning (seed 0, tuning prompts, training reward)", "",
        *table(["method", "config", "delta [95% CI over prompts]", "drift", "chosen"],
               [[m, json.dumps(r["config"]), f"{r['tune_delta']:+.3f} [{r['tune_ci'][0]:+.3f}, {r['tune_ci'][1]:+.3f}]",
                 f"{r['drift']:.4f}", "yes" if r["config"] == res["chosen"][m] else ""]
                for m, rows in res["tuning"].items() for r in rows]), "",
        "## KTO diagnostics (tuning runs, means over steps)", "",
        *table(["run", "reference point z", "implicit accuracy", "policy error"],
               [[n, f"{d['kto_z']:.5f}", f"{d['implicit_acc']:.3f}", f"{d['policy_error']:.4f}"] for n, d in res["kto_logs"].items()]), "",
    ]
    (out / "report.md").write_text("\n".join(md))
    body = []
    for line in md:  # a small markdown subset: headings, tables, images, paragraphs
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            alt, name = line[2:].split("](")
            data = base64.b64encode(figures[name.rstrip(")")]).decode()
            body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        elif line.startswith("|---"):
            continue
        elif line.startswith("| "):
            cells = "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split(" | "))
            body.append(f"<table><tr>{cells}</tr></table>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>tauflow method study</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
            "td{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style></head><body>"
            + "\n".join(body).replace("</table>\n<table>", "\n") + "</body></html>")
    (out / "report.html").write_text(page)
