"""Rate-distortion tables: bits per coordinate against logit and attention-output error.

    python -m sphkv_compile.rd_table [--tokens N] [--json PATH] [--plot PATH] [--no-model]

Methods: the spherical codec (float bit targets, allocated by rate-distortion), KIVI-style
asymmetric quantization (keys per channel, values per token, fp16 scale + zero), and the
rotated scalar Lloyd-Max codec (TurboQuant's MSE stage). Every bit stored is counted:
radius, codes, word padding, scales and zero points.

Errors (all relative squared errors, so the columns compare directly):
  logit     sum (q·k̂ - q·k)² / sum (q·k)²      over causally visible (query, key) pairs
  attn-out  ‖o(q, K̂, V̂) - o(q, K, V)‖² / ‖o‖²   o = softmax(q·k/√d)·v, reference in float64
  value     ‖V̂ - V‖² / ‖V‖²
Queries are decode-style: each of the last few positions attends causally to every key at
or before it (on SmolLM2, the model's own post-RoPE queries; on Gaussian data, Gaussian).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from .baselines import kivi_dequantize, kivi_keys, kivi_values
from .bit_allocation import allocate_bits, group_weights, predicted_direction_mse, slot_mse
from .codebooks import circle_codebook
from .codec import SphericalCodec
from .scalar_codec import RotatedScalarCodec

SPHERICAL_TARGETS = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
BASELINE_BITS = (2, 3, 4)
KIVI_KEY_GROUPS = (32, 128)  # 32 is the paper's setting; 128 spends less on metadata
VALUE_TARGETS = (2.0, 3.0, 4.0)


# ---------------------------------------------------------------------------------------
# Data: keys/values [H, T, d], queries grouped by KV head [H, Q, d] with their positions.
# ---------------------------------------------------------------------------------------
@dataclass
class KVSample:
    name: str
    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    query_pos: torch.Tensor  # [Q] position of each query row (keys at or before it are visible)
    note: str = ""

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]


def gaussian_sample(head_dim: int, n_tokens: int = 2048, heads: int = 4, n_queries: int = 32,
                    seed: int = 0, outlier_channel: int | None = None, outlier_scale: float = 50.0) -> KVSample:
    """i.i.d. N(0, 1) keys, values and queries; optionally one channel of the keys (and
    queries) scaled by outlier_scale, like the massive channels of real keys."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(heads, n_tokens, head_dim, generator=gen)
    v = torch.randn(heads, n_tokens, head_dim, generator=gen)
    q = torch.randn(heads, n_queries, head_dim, generator=gen)
    name = f"gaussian d={head_dim}"
    if outlier_channel is not None:
        k[..., outlier_channel] *= outlier_scale
        q[..., outlier_channel] *= outlier_scale
        name += f", channel {outlier_channel} x{outlier_scale:g}"
    pos = torch.arange(n_tokens - n_queries, n_tokens)
    return KVSample(name, k, v, q, pos, "Gaussian queries")


def smollm2_sample(n_tokens: int = 1024, layers=(0, 4, 8, 12, 16, 20, 24, 29), n_queries: int = 32) -> KVSample:
    """Real post-RoPE keys, values and queries of SmolLM2 on pydoc text, layers stacked as heads."""
    from .smollm2 import capture_qkv

    cap = capture_qkv(n_tokens, layers=layers)
    group = cap.group_size
    ks, vs, qs = [], [], []
    for i in cap.layers:
        k = cap.keys[i]
        kv_heads, _, d = k.shape
        q = cap.queries[i][:, -n_queries:, :]  # query heads of one KV head are adjacent
        qs.append(q.reshape(kv_heads, group * n_queries, d))
        ks.append(k)
        vs.append(cap.values[i])
    pos = torch.arange(n_tokens - n_queries, n_tokens).repeat(group)
    keys, values = torch.cat(ks), torch.cat(vs)
    note = (f"the model's own post-RoPE queries (last {n_queries} positions, layers {list(cap.layers)}). "
            f"The per-head mean over the sequence holds {mean_energy_share(keys):.0%} of the key energy "
            f"and {mean_energy_share(values):.0%} of the value energy")
    return KVSample(f"SmolLM2 d={ks[0].shape[-1]}", keys, values, torch.cat(qs), pos, note)


def mean_energy_share(x: torch.Tensor) -> float:
    """Fraction of sum ‖x_t‖² carried by the per-head mean over tokens: T·‖mean‖² / Σ‖x_t‖²."""
    mean = x.double().mean(dim=-2, keepdim=True)
    return float(mean.pow(2).sum() * x.shape[-2] / x.double().pow(2).sum())


# ---------------------------------------------------------------------------------------
# Methods: each turns keys into logits and values into reconstructions, and counts bits.
# ---------------------------------------------------------------------------------------
class SphericalMethod:
    family = "spherical"

    def __init__(self, head_dim: int, bits: float, seed: int = 0, radius_bits: int = 16):
        self.key_codec = SphericalCodec(head_dim, bits=bits, seed=seed, radius_bits=radius_bits)
        self.value_codec = SphericalCodec(head_dim, bits=bits, seed=seed + 1, radius_bits=radius_bits)
        self.label = f"spherical {bits:g}"

    def key_logits(self, q, k):
        # Logits straight from the codes: the angular recurrence, never a dense key.
        return self.key_codec.logits(q, self.key_codec.encode(k)), self.key_codec.bits_per_element

    def reconstruct_values(self, v):
        return self.value_codec.decode(self.value_codec.encode(v)), self.value_codec.bits_per_element


class CenteredSphericalMethod(SphericalMethod):
    """A candidate, not what the store does today: encode k - mean(k) and v - mean(v) over
    the sequence (per head). Softmax ignores the per-query constant q·mean(k), and the
    attention weights sum to 1, so both means could be added back exactly at no per-token
    cost. The two fp16 mean vectors are counted, amortised over the sequence."""

    family = "spherical centered"

    def __init__(self, head_dim: int, bits: float, seed: int = 0):
        super().__init__(head_dim, bits, seed)
        self.label = f"spherical centered {bits:g}"

    def key_logits(self, q, k):
        mean = k.mean(dim=-2, keepdim=True)
        logits, bits = super().key_logits(q, k - mean)
        return logits + q @ mean.transpose(-1, -2), bits + 16 / k.shape[-2]

    def reconstruct_values(self, v):
        mean = v.mean(dim=-2, keepdim=True)
        v_hat, bits = super().reconstruct_values(v - mean)
        return v_hat + mean, bits + 16 / v.shape[-2]


class ScalarMethod:
    family = "rotated scalar"

    def __init__(self, head_dim: int, bits: int, seed: int = 0, radius_bits: int = 16):
        self.key_codec = RotatedScalarCodec(head_dim, bits=bits, seed=seed, radius_bits=radius_bits)
        self.value_codec = RotatedScalarCodec(head_dim, bits=bits, seed=seed + 1, radius_bits=radius_bits)
        self.label = f"rotated scalar {bits}"

    def key_logits(self, q, k):
        k_hat = self.key_codec.decode(self.key_codec.encode(k))
        return q @ k_hat.transpose(-1, -2), self.key_codec.bits_per_element

    def reconstruct_values(self, v):
        return self.value_codec.decode(self.value_codec.encode(v)), self.value_codec.bits_per_element


class KiviMethod:
    family = "KIVI"

    def __init__(self, head_dim: int, bits: int, key_group: int = 32):
        self.bits, self.key_group = bits, key_group
        self.label = f"KIVI-{bits} g{key_group}"
        self.family = f"KIVI g{key_group}"

    def key_logits(self, q, k):
        codes = kivi_keys(k, self.bits, self.key_group)
        return q @ kivi_dequantize(codes).transpose(-1, -2), codes.bits_per_element

    def reconstruct_values(self, v):
        codes = kivi_values(v, self.bits)  # one scale and zero per token
        return kivi_dequantize(codes), codes.bits_per_element


def default_methods(head_dim: int, centered: bool = False) -> list:
    """The key+value table: spherical at float targets, KIVI (two key group sizes), scalar,
    and optionally the centered spherical candidate (pointless on zero-mean Gaussian data)."""
    methods = [SphericalMethod(head_dim, b) for b in SPHERICAL_TARGETS]
    methods += [KiviMethod(head_dim, b, g) for g in KIVI_KEY_GROUPS for b in BASELINE_BITS]
    methods += [ScalarMethod(head_dim, b) for b in BASELINE_BITS]
    if centered:
        methods += [CenteredSphericalMethod(head_dim, b) for b in (2.0, 3.0, 4.0)]
    return methods


def value_methods(head_dim: int) -> list:
    """The value-codec comparison. One extra point below and above 2/3/4 bits per family so
    that every family can be compared at exactly 2, 3 and 4 bits per coordinate."""
    methods = [SphericalMethod(head_dim, b) for b in (1.5,) + SPHERICAL_TARGETS]
    methods += [KiviMethod(head_dim, b) for b in (1,) + BASELINE_BITS + (5,)]
    methods += [ScalarMethod(head_dim, b) for b in (1,) + BASELINE_BITS + (5,)]
    return methods


@dataclass
class ValueRow:
    data: str
    method: str
    family: str
    value_bits: float
    value_rel_mse: float


def value_rows(sample: "KVSample", methods, progress: bool = True, measured=()) -> list[ValueRow]:
    """Value error per method; values already measured in `measured` (RDRows of the same
    sample) are reused instead of encoded again. KIVI's value side ignores the key group."""
    known = {}
    for r in measured:
        family = "KIVI per-token" if r.family.startswith("KIVI") else r.family
        label = r.method.split(" g")[0] if family == "KIVI per-token" else r.method
        known[label] = ValueRow(sample.name, label, family, r.value_bits, r.value_rel_mse)
    rows = []
    for m in tqdm(methods, desc=f"{sample.name} values", disable=not progress, leave=False):
        family = "KIVI per-token" if m.family.startswith("KIVI") else m.family
        label = m.label.split(" g")[0] if family == "KIVI per-token" else m.label
        if label not in known:
            v_hat, bits = m.reconstruct_values(sample.values)
            known[label] = ValueRow(sample.name, label, family, float(bits), rel_mse(v_hat, sample.values))
        rows.append(known[label])
    return rows


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------
@dataclass
class RDRow:
    data: str
    method: str
    family: str
    key_bits: float
    value_bits: float
    logit_rel_mse: float
    attn_rel_mse: float
    value_rel_mse: float


def _visible(sample: KVSample) -> torch.Tensor:
    """[Q, T] causal mask: query at position p sees keys 0..p."""
    t = sample.keys.shape[-2]
    return torch.arange(t).unsqueeze(0) <= sample.query_pos.unsqueeze(1)


def _attention(logits: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, head_dim: int) -> torch.Tensor:
    scores = (logits.double() / math.sqrt(head_dim)).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ values.double()


def rel_mse(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.double()
    return float(((approx.double() - exact) ** 2).sum() / (exact**2).sum())


def measure(method, sample: KVSample) -> RDRow:
    visible = _visible(sample)
    exact_logits = sample.queries.double() @ sample.keys.double().transpose(-1, -2)
    exact_out = _attention(exact_logits, sample.values, visible, sample.head_dim)
    logits, key_bits = method.key_logits(sample.queries, sample.keys)
    v_hat, value_bits = method.reconstruct_values(sample.values)
    mask = visible.expand_as(exact_logits)
    return RDRow(
        data=sample.name, method=method.label, family=method.family,
        key_bits=float(key_bits), value_bits=float(value_bits),
        logit_rel_mse=rel_mse(logits[mask], exact_logits[mask]),
        attn_rel_mse=rel_mse(_attention(logits, v_hat, visible, sample.head_dim), exact_out),
        value_rel_mse=rel_mse(v_hat, sample.values),
    )


def rd_rows(sample: KVSample, methods, progress: bool = True) -> list[RDRow]:
    """One row per method on one data set (the core of the table)."""
    return [measure(m, sample) for m in tqdm(methods, desc=sample.name, disable=not progress, leave=False)]


def lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of (bits, mse) points, by increasing bits."""
    hull: list[tuple[float, float]] = []
    for p in sorted(points):
        while hull and hull[-1][0] == p[0]:
            if hull[-1][1] <= p[1]:
                break
            hull.pop()
        else:
            while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                      - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
                hull.pop()
            hull.append(p)
    return hull


def time_shared_mse(points: list[tuple[float, float]], bits: float) -> float | None:
    """The MSE reachable at exactly `bits` by storing a fraction of tokens at one measured
    rate and the rest at another (linear on the lower convex hull); None outside the
    measured range. This is what a per-token tier mix can really achieve."""
    hull = lower_hull(points)
    if not hull or not hull[0][0] - 1e-9 <= bits <= hull[-1][0] + 1e-9:
        return None
    for (b0, e0), (b1, e1) in zip(hull, hull[1:]):
        if b0 <= bits <= b1:
            w = (bits - b0) / (b1 - b0)
            return (1 - w) * e0 + w * e1
    return min(e for b, e in hull if math.isclose(b, bits, abs_tol=1e-9))


def value_codec_winners(rows, targets=VALUE_TARGETS) -> list[dict]:
    """Per target bits: each family's time-shared value MSE and the family with the lowest."""
    families = sorted({r.family for r in rows})
    out = []
    for t in targets:
        per = {}
        for f in families:
            mse = time_shared_mse([(r.value_bits, r.value_rel_mse) for r in rows if r.family == f], t)
            if mse is not None:
                per[f] = mse
        winner = min(per, key=per.get) if per else None
        out.append({"bits": t, "mse": per, "winner": winner})
    return out


# ---------------------------------------------------------------------------------------
# Extra measurements: head dims, SPEC reference points, high-bit accuracy
# ---------------------------------------------------------------------------------------
def direction_rel_mse(codec, x: torch.Tensor) -> float:
    return rel_mse(codec.decode(codec.encode(x), dtype=torch.float64), x)


def head_dim_rows(n_tokens: int = 2048, dims=(64, 80, 96, 128), bits=(2.0, 4.0, 6.0), seed: int = 0) -> list[dict]:
    """Relative key MSE at equal stored bits (2, 4 and 6 are whole 32-bit words for all of
    64, 80, 96 and 128), on Gaussian keys and with one channel x50 in the first or last block."""
    rows = []
    for d in dims:
        gen = torch.Generator().manual_seed(seed)
        base = torch.randn(n_tokens, d, generator=gen)
        cases = {"gaussian": base}
        for label, ch in (("outlier in first block", 0), ("outlier in last block", d - 1)):
            x = base.clone()
            x[:, ch] *= 50.0
            cases[label] = x
        for b in bits:
            codec = SphericalCodec(d, bits=b, seed=seed)
            row = {"head_dim": d, "bits": codec.bits_per_element, "level_bits": codec.level_bits,
                   "predicted": codec.predicted_direction_mse}
            row.update({label: direction_rel_mse(codec, x) for label, x in cases.items()})
            rows.append(row)
    return rows


def spec_reference_rows(n_tokens: int = 8192, seed: int = 0) -> list[dict]:
    """The SPEC §2 probe configurations, measured with this codebase on Gaussian d=128 keys,
    next to the rate-distortion allocation at the same stored size."""
    x = torch.randn(n_tokens, 128, generator=torch.Generator().manual_seed(seed))
    configs = [
        ("polar (4,3,2,2,2,2,2)", SphericalCodec(128, bits=(4, 3, 2, 2, 2, 2, 2), seed=seed)),
        ("polar (3,2,1,1,1,1,1)", SphericalCodec(128, bits=(3, 2, 1, 1, 1, 1, 1), seed=seed)),
        ("rotated scalar 3 bits", RotatedScalarCodec(128, bits=3, seed=seed)),
        ("rotated scalar 4 bits", RotatedScalarCodec(128, bits=4, seed=seed)),
    ]
    # RD allocation filling the same number of stored words as each fixed configuration.
    for name, c in list(configs):
        rd = SphericalCodec(128, bits=c.bits_per_element, seed=seed)
        configs.append((f"polar RD at {c.bits_per_element:g} stored ({name})", rd))
    rows = []
    for name, c in configs:
        rows.append({"config": name, "level_bits": getattr(c, "level_bits", None),
                     "payload_bits": c.layout.payload_bits / 128, "stored_bits": c.bits_per_element,
                     "measured": direction_rel_mse(c, x),
                     "predicted": c.predicted_direction_mse if hasattr(c, "predicted_direction_mse") else None})
    return rows


def knapsack_allocation(tree, angle_bit_budget: int, max_bits: int = 12) -> tuple[float, tuple[int, ...]]:
    """(predicted MSE, bits) of the exact optimum of the allocator's distortion model; the
    codec's allocate_bits solves the same knapsack, so allocation_rows now checks equality."""
    bits = allocate_bits(tree, angle_bit_budget, max_bits)
    return predicted_direction_mse(tree, bits), bits


def allocation_rows(dims=(64, 128), targets=(2.0, 3.0, 4.0), n_tokens: int = 8192, seed: int = 0) -> list[dict]:
    """The codec's rate-distortion allocation against the exact optimum of the same model,
    both measured on Gaussian keys at the same stored size."""
    rows = []
    for d in dims:
        x = torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for t in targets:
            codec = SphericalCodec(d, bits=t, seed=seed)
            budget = 32 * codec.words - codec.radius_bits
            _, optimum = knapsack_allocation(codec.tree, budget)
            exact = SphericalCodec(d, bits=optimum, seed=seed)
            rows.append({"head_dim": d, "bits": codec.bits_per_element,
                         "codec_bits": codec.level_bits, "codec_predicted": codec.predicted_direction_mse,
                         "codec_measured": direction_rel_mse(codec, x),
                         "optimal_bits": optimum, "optimal_predicted": exact.predicted_direction_mse,
                         "optimal_measured": direction_rel_mse(exact, x)})
    return rows


def high_bit_rows(dims=(64, 80, 96, 128), bits=(10, 12, 14), n_tokens: int = 512, n_queries: int = 8,
                  seed: int = 0) -> list[dict]:
    """Relative RMS logit and attention-output errors in float32 with every angle at b bits
    and a 32-bit radius, next to two floors: the level-1 angle's RMS error (2π/2^b)/√12 and
    the Gaussian Shannon bound 2^-b (relative RMS at b bits per coordinate)."""
    rows = []
    for d in dims:
        sample = gaussian_sample(d, n_tokens=n_tokens, heads=2, n_queries=n_queries, seed=seed)
        for b in bits:
            r = measure(SphericalMethod(d, b, seed=seed, radius_bits=32), sample)
            rows.append({"head_dim": d, "angle_bits": b, "bits": r.key_bits,
                         "logit_rel_rms": math.sqrt(r.logit_rel_mse), "attn_rel_rms": math.sqrt(r.attn_rel_mse),
                         "level1_floor": math.sqrt(circle_codebook(b).mse), "shannon_floor": 2.0**-b})
    return rows


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------
def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    if isinstance(x, tuple):
        return ",".join(map(str, x))
    return str(x)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rd_markdown(rows: list[RDRow]) -> str:
    return markdown_table(
        ["method", "K bits/coord", "V bits/coord", "logit rel MSE", "attn-out rel MSE", "value rel MSE"],
        [[r.method, r.key_bits, r.value_bits, r.logit_rel_mse, r.attn_rel_mse, r.value_rel_mse] for r in rows])


def value_markdown(rows: list[ValueRow]) -> str:
    ordered = sorted(rows, key=lambda r: (r.family, r.value_bits))
    return markdown_table(["value codec", "V bits/coord", "value rel MSE"],
                          [[r.method, r.value_bits, r.value_rel_mse] for r in ordered])


def winners_markdown(winners: list[dict]) -> str:
    families = sorted({f for w in winners for f in w["mse"]})
    return markdown_table(["bits/coord"] + [f"{f}" for f in families] + ["lowest value MSE"],
                          [[w["bits"]] + [w["mse"].get(f) for f in families] + [w["winner"]] for w in winners])


def plot_rd(report: "Report", path: str) -> None:
    """One column per data set: logit error vs K bits, attention-output error vs mean K/V
    bits, value error vs V bits; one line per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.results)
    families = sorted({r.family for rows in list(report.results.values()) + list(report.values.values()) for r in rows})
    color = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}  # one colour per family
    panels = [("results", lambda r: r.key_bits, "logit_rel_mse", "logit rel MSE", "K bits/coord"),
              ("results", lambda r: (r.key_bits + r.value_bits) / 2, "attn_rel_mse", "attn-out rel MSE",
               "mean K/V bits/coord"),
              ("values", lambda r: r.value_bits, "value_rel_mse", "value rel MSE", "V bits/coord")]
    fig, axes = plt.subplots(len(panels), len(names), figsize=(4.8 * len(names), 3.6 * len(panels)), squeeze=False)
    for col, name in enumerate(names):
        for row_i, (source, xbits, yk, title, xlabel) in enumerate(panels):
            rows = getattr(report, source)[name]
            ax = axes[row_i][col]
            for fam in sorted({r.family for r in rows}):
                pts = sorted((xbits(r), getattr(r, yk)) for r in rows if r.family == fam)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fam, color=color[fam])
            ax.set_yscale("log")
            ax.set_xlabel(f"{xlabel} (everything stored)")
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class Report:
    results: dict = field(default_factory=dict)  # data name -> list[RDRow]
    values: dict = field(default_factory=dict)  # data name -> list[ValueRow]
    notes: dict = field(default_factory=dict)
    winners: dict = field(default_factory=dict)
    head_dims: list = field(default_factory=list)
    spec_reference: list = field(default_factory=list)
    high_bits: list = field(default_factory=list)
    allocation: list = field(default_factory=list)


def run(tokens: int = 1024, use_model: bool = True, extras: bool = True, progress: bool = True) -> Report:
    report = Report()
    samples = [gaussian_sample(128, heads=2), gaussian_sample(64, heads=2)]
    if use_model:
        samples.append(smollm2_sample(tokens))
    for s in samples:
        real = not s.name.startswith("gaussian")
        report.results[s.name] = rd_rows(s, default_methods(s.head_dim, centered=real), progress)
        report.notes[s.name] = s.note
        report.values[s.name] = value_rows(s, value_methods(s.head_dim), progress, report.results[s.name])
        report.winners[s.name] = value_codec_winners(report.values[s.name])
    if extras:
        steps = tqdm(total=4, desc="head dims, SPEC points, allocation, high bits", disable=not progress, leave=False)
        report.head_dims = head_dim_rows()
        steps.update()
        report.spec_reference = spec_reference_rows()
        steps.update()
        report.allocation = allocation_rows()
        steps.update()
        report.high_bits = high_bit_rows()
        steps.update()
        steps.close()
    return report


def render(report: Report) -> str:
    out = []
    for name, rows in report.results.items():
        out += [f"### Keys and values: {name}", f"Queries: {report.notes[name]}.", "", rd_markdown(rows), ""]
    for name, rows in report.values.items():
        out += [f"### Value codecs: {name}", "", value_markdown(rows), "",
                "Value rel MSE at exactly equal bits (time-sharing between measured rates, i.e. the "
                "lower convex hull):", "",
                winners_markdown(report.winners[name]), ""]
    if report.head_dims:
        keys = [k for k in report.head_dims[0] if k not in ("head_dim", "bits", "level_bits", "predicted")]
        out += ["### Head dims that are not powers of two (relative key MSE, Gaussian, 16-bit radius)", "",
                markdown_table(["head_dim", "bits/coord", "level bits", "predicted (isotropic)"] + keys,
                               [[r["head_dim"], r["bits"], r["level_bits"], r["predicted"]] + [r[k] for k in keys]
                                for r in report.head_dims]), ""]
    if report.spec_reference:
        out += ["### SPEC §2 reference points (Gaussian d=128, relative direction MSE)", "",
                markdown_table(["configuration", "level bits", "payload bits/coord", "stored bits/coord",
                                "measured", "predicted"],
                               [[r["config"], r["level_bits"], r["payload_bits"], r["stored_bits"], r["measured"],
                                 r["predicted"]] for r in report.spec_reference]), ""]
    if report.allocation:
        out += ["### Bit allocation: the codec's allocation vs the exact optimum of the same model "
                "(Gaussian, relative direction MSE)", "",
                markdown_table(["head_dim", "bits/coord", "codec level bits", "predicted", "measured",
                                "optimal level bits", "predicted", "measured"],
                               [[r["head_dim"], r["bits"], r["codec_bits"], r["codec_predicted"], r["codec_measured"],
                                 r["optimal_bits"], r["optimal_predicted"], r["optimal_measured"]]
                                for r in report.allocation]), ""]
    if report.high_bits:
        out += ["### High bits (every angle at b bits, 32-bit radius, float32, Gaussian)", "",
                markdown_table(["head_dim", "bits/angle", "bits/coord", "logit rel RMS", "attn-out rel RMS",
                                "level-1 floor (2π/2^b)/√12", "Shannon 2^-b"],
                               [[r["head_dim"], r["angle_bits"], r["bits"], r["logit_rel_rms"], r["attn_rel_rms"],
                                 r["level1_floor"], r["shannon_floor"]] for r in report.high_bits]), ""]
    return "\n".join(out)


def to_json(report: Report) -> dict:
    return {"results": {k: [asdict(r) for r in v] for k, v in report.results.items()},
            "values": {k: [asdict(r) for r in v] for k, v in report.values.items()},
            "notes": report.notes, "value_winners": report.winners, "head_dims": report.head_dims,
            "spec_reference": report.spec_reference, "allocation": report.allocation,
            "high_bits": report.high_bits}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sphkv_compile.rd_table", description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="SmolLM2 tokens of pydoc text (default 1024)")
    ap.add_argument("--json", help="also write every measurement as JSON to this path")
    ap.add_argument("--plot", help="write a PNG of error against bits (e.g. docs/codec_rd.png)")
    ap.add_argument("--no-model", action="store_true", help="skip SmolLM2 (Gaussian data only)")
    ap.add_argument("--no-extras", action="store_true", help="skip the head-dim, SPEC and high-bit tables")
    args = ap.parse_args(argv)
    if args.tokens < 64:
        ap.error("--tokens must be at least 64 (the decode-style queries are the last 32 positions)")
    torch.manual_seed(0)
    from .smollm2 import SmolLM2Unavailable

    try:
        report = run(args.tokens, use_model=not args.no_model, extras=not args.no_extras)
    except SmolLM2Unavailable as err:
        ap.exit(2, f"error: {err}\n(or run with --no-model for the Gaussian tables only)\n")
    print(render(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(report), f, indent=1, default=str)
    if args.plot:
        plot_rd(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
