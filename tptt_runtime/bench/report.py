"""How every benchmark and evaluation reports: <out>/<name>.json, <out>/<name>.png, and a table on stdout.

    fig, axes = subplots(1, 2, figsize=(11, 4))   # matplotlib without a display
    write(out_dir, "server", results, fig, table_text)
"""

from __future__ import annotations

import json
from pathlib import Path


def subplots(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def write(out_dir: Path, name: str, results: dict, fig, table: str) -> None:
    """Save results as JSON and `fig` as PNG under `out_dir`, then print the table and where they went."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=120)
    plt.close(fig)
    print(table)
    print(f"wrote {out_dir / f'{name}.json'} and {out_dir / f'{name}.png'}")
