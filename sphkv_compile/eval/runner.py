"""Runs every (method, budget) on every sample: one dense prefill per sample, then per method
a compressed cache for every layer and one teacher-forced continuation through it."""
from __future__ import annotations

import math
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from ..rdr.budget import dense_bytes
from .hook import Session, forward
from .methods import METHODS, Settings
from .tasks import Sample


def score(task: str, logits: torch.Tensor, target: torch.Tensor) -> dict:
    tgt = target[0]
    pred = logits.argmax(-1)
    hits = (pred == tgt).float()
    if task == "ppl":
        nll = torch.nn.functional.cross_entropy(logits, tgt, reduction="sum")
        return {"nll_sum": float(nll), "tokens": int(tgt.numel())}
    return {"token_acc": float(hits.mean()), "exact": float(hits.all())}


def run_sample(model, sample: Sample, methods: list[str], budgets: list[float], cfg: Settings,
               bar: tqdm | None = None) -> list[dict]:
    """All configs on one sample. The prompt's last token joins the scored chunk, so every
    target token is predicted through the compressed cache."""
    prompt = sample.prompt[:, :-1]
    chunk = torch.cat((sample.prompt[:, -1:], sample.target[:, :-1]), 1)
    T = prompt.shape[1]
    session = Session("prefill", obs_window=cfg.obs_window, want_accumulated="h2o" in methods)
    forward(model, prompt, 0, session)
    captures = session.captures
    H, d = next(iter(captures.values())).keys.shape[1], next(iter(captures.values())).keys.shape[-1]
    layer_dense = dense_bytes(T, H, d)
    rows = []
    for method in methods:
        for budget in ([1.0] if method == "dense" else budgets):
            t0 = time.perf_counter()
            caches, held = {}, 0
            for layer, cap in captures.items():
                caches[layer], nbytes = METHODS[method](cap, int(budget * layer_dense), cfg)
                held += nbytes
            logits = forward(model, chunk, T, Session("continue", caches=caches))
            rows.append({"task": sample.task, **sample.info, "method": method, "budget": budget,
                         "held_fraction": held / (layer_dense * len(captures)), "seconds": time.perf_counter() - t0,
                         **score(sample.task, logits, sample.target)})
            if bar is not None:
                bar.update(1)
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean over samples per (task, method, budget); perplexity pools the NLL of all tokens."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["method"], r["budget"])].append(r)
    out = []
    for (task, method, budget), rs in sorted(groups.items()):
        entry = {"task": task, "method": method, "budget": budget, "samples": len(rs),
                 "held_fraction": sum(r["held_fraction"] for r in rs) / len(rs)}
        if task == "ppl":
            entry["perplexity"] = math.exp(sum(r["nll_sum"] for r in rs) / sum(r["tokens"] for r in rs))
        else:
            entry["token_acc"] = sum(r["token_acc"] for r in rs) / len(rs)
            entry["exact"] = sum(r["exact"] for r in rs) / len(rs)
        out.append(entry)
    return out
