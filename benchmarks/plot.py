"""Plot the benchmark CSV: one PNG per op (time, and peak memory where measured, against size)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from benchmarks.common import CSV_PATH, RESULTS


def plot_all(csv_path: Path = CSV_PATH, out_dir: Path = RESULTS) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    latest: dict[tuple, dict] = {}
    for r in rows:  # the last run of each (kernel, provider, mode, metric, size) wins
        latest[(r["kernel"], r["provider"], r["mode"], r["metric"], r["size"])] = r
    by_kernel = defaultdict(list)
    for r in latest.values():
        by_kernel[r["kernel"]].append(r)
    paths = []
    for kernel, rs in sorted(by_kernel.items()):
        metrics = sorted({r["metric"] for r in rs}, key=lambda m: m != "time")
        modes = sorted({r["mode"] for r in rs})
        fig, axes = plt.subplots(
            len(metrics), len(modes), figsize=(5 * len(modes), 3.5 * len(metrics)), squeeze=False
        )
        for i, metric in enumerate(metrics):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                sel = [r for r in rs if r["metric"] == metric and r["mode"] == mode]
                sizes = list(dict.fromkeys(r["size"] for r in sel))
                for prov in sorted({r["provider"] for r in sel}):
                    pts = {r["size"]: r for r in sel if r["provider"] == prov}
                    xs = [k for k, s in enumerate(sizes) if s in pts]
                    ys = [float(pts[sizes[k]]["p50"]) for k in xs]
                    lo = [ys[n] - float(pts[sizes[k]]["p20"]) for n, k in enumerate(xs)]
                    hi = [float(pts[sizes[k]]["p80"]) - ys[n] for n, k in enumerate(xs)]
                    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=prov)
                ax.set_xticks(range(len(sizes)), sizes, rotation=20, fontsize=7)
                unit = sel[0]["unit"] if sel else ""
                ax.set_title(f"{kernel} {mode} {metric} ({unit})", fontsize=9)
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{kernel}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in plot_all():
        print(p)
