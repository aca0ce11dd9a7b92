"""Human-readable summary of a dataset directory (`tauflow inspect`)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.shards import open_dataset

HIDDEN = ("image", "noise", "latent", "winner_image", "loser_image", "winner_noise", "loser_noise", "winner_latent",
          "loser_latent")


def describe(path: Path, *, verify: bool = False, rows: int = 3) -> str:
    ds = open_dataset(path, verify=verify)
    m = ds.manifest
    lines = [
        f"dataset: {path}",
        f"kind: {ds.kind}   stage: {m['stage']}   rows: {ds.num_rows}   shards: {len(m['shards'])}",
        f"created: {m['created_at']}   code: {m['code_version']}   config hash: {m['config_hash'][:12]}",
        "checksums: verified" if verify else "checksums: not verified (use --verify)",
        "schema:",
    ]
    lines += [f"  {name}: {feature}" for name, feature in ds.features.items()]
    if m["inputs"]:
        lines.append("inputs: " + ", ".join(i["path"] for i in m["inputs"]))
    if m["stats"]:
        lines.append("stats: " + json.dumps(m["stats"], indent=2, default=str))
    extras = sorted(p.name for p in path.iterdir() if p.suffix in (".json", ".png") and p.name != "manifest.json")
    if extras:
        lines.append("see also: " + ", ".join(str(path / e) for e in extras))
    if rows and ds.shard_paths:
        table = ds.read_shard(0).slice(0, rows)
        shown = [c for c in table.column_names if c not in HIDDEN]
        lines.append(f"first {table.num_rows} rows (without {', '.join(c for c in HIDDEN if c in table.column_names)}):")
        for row in table.select(shown).to_pylist():
            lines.append("  " + json.dumps(row, default=str))
    return "\n".join(lines)
