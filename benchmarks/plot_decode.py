"""Decode speed against dense, as curves: one panel per shape, the speedup of sphkv (CUDA-graph
replay) over the faster of cuDNN and flash SDPA against context length, one line per batch
size, with parity (1×) and issue 4's target (0.75 × dense bytes / compressed bytes).

    python benchmarks/plot_decode.py benchmarks/results/h200_session8_bench_decode.json docs/decode_vs_dense.png
"""
from __future__ import annotations

import json
import sys


def plot(result: dict, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in result["decode"] if r.get("speedup") is not None]
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 4), sharey=True, squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        mine = [r for r in rows if r["shape"] == shape]
        for B in sorted({r["B"] for r in mine}):
            pts = sorted((r["T"], r["speedup"]) for r in mine if r["B"] == B)
            ax.plot([t for t, _ in pts], [s for _, s in pts], marker="o", label=f"B={B}")
        targets = sorted((r["T"], r["target_speedup"]) for r in mine if r["B"] == mine[0]["B"])
        ax.plot([t for t, _ in targets], [s for _, s in targets], "k--", label="target (issue 4)")
        ax.axhline(1.0, color="grey", lw=1, label="parity with dense")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_yticks([0.25, 0.5, 1, 2, 4])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g×"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("context tokens T")
        ax.set_title(shape)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("speedup over the faster of cuDNN / flash (bf16)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"sphkv decode vs dense SDPA, {result['device']}, torch {result['torch']}, triton {result['triton']}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out_path, dpi=120)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        plot(json.load(f), sys.argv[2])
