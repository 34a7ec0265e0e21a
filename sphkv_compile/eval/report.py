"""JSON, markdown tables and the quality-vs-bytes plot of an evaluation run."""
from __future__ import annotations

import json

# (metric key, label, higher is better) per task family
METRICS = {
    "ppl": ("perplexity", "perplexity ↓", False),
    "agreement": ("token_acc", "agreement with dense greedy ↑", True),
    "passkey": ("exact", "passkey accuracy ↑", True),
    "multikey": ("exact", "multi-key needle accuracy ↑", True),
    "multivalue": ("token_acc", "multi-value needle token accuracy ↑", True),
    "vartrack": ("token_acc", "variable tracking token accuracy ↑", True),
}


def write_json(path, config: dict, rows: list[dict], summary: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"config": config, "summary": summary, "samples": rows}, f, indent=1)


def _value(summary, task, method, budget):
    key = METRICS[task][0]
    for s in summary:
        if s["task"] == task and s["method"] == method and (method == "dense" or s["budget"] == budget):
            return s[key], s["held_fraction"]
    return None, None


def markdown(summary: list[dict], methods: list[str], budgets: list[float]) -> str:
    tasks = [t for t in METRICS if any(s["task"] == t for s in summary)]
    lines = []
    for budget in budgets:
        lines.append(f"\n**Budget 1/{round(1 / budget)} of dense 16-bit KV bytes** "
                     f"(cells: metric; best non-dense in bold; `held` = mean bytes held / dense)\n")
        lines.append("| method | " + " | ".join(METRICS[t][1] for t in tasks) + " | held |")
        lines.append("|---" * (len(tasks) + 2) + "|")
        best = {}
        for t in tasks:
            vals = [_value(summary, t, m, budget)[0] for m in methods if m != "dense"]
            vals = [v for v in vals if v is not None]
            if vals:
                best[t] = max(vals) if METRICS[t][2] else min(vals)
        for m in methods:
            cells, held = [], None
            for t in tasks:
                v, h = _value(summary, t, m, budget)
                held = h if h is not None else held
                text = "—" if v is None else (f"{v:.2f}" if t == "ppl" else f"{v:.3f}")
                if v is not None and m != "dense" and v == best.get(t):
                    text = f"**{text}**"
                cells.append(text)
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {held:.3f} |" if held is not None else
                         f"| {m} | " + " | ".join(cells) + " | — |")
    return "\n".join(lines) + "\n"


def plot(path, summary: list[dict], methods: list[str], budgets: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in METRICS if any(s["task"] == t for s in summary)]
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for m in methods:
            pts = [(h, v) for b in budgets for v, h in [_value(summary, task, m, b)] if v is not None]
            if m == "dense" and pts:
                ax.axhline(pts[0][1], color="black", linestyle=":", label="dense")
                continue
            if pts:
                pts = sorted(set(pts))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m,
                        linewidth=2.5 if m == "rdr" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("resident KV bytes / dense 16-bit")
        ax.set_title(METRICS[task][1])
        if task == "ppl":
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
