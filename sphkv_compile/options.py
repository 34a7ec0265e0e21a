"""The backend's options (`torch.compile(..., backend="sphkv", options={...})`), validated.

Every bad value raises SphkvOptionsError naming the option, what was given and what is
accepted, so a typo never silently falls back to a default.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from .tiers import DEFAULT_TIERS, VALUE_CODECS, TierSpec

POLICIES = ("uniform", "rdr")
DISTORTIONS = ("unit", "logit")


class SphkvOptionsError(ValueError):
    pass


@dataclass(frozen=True)
class SphkvOptions:
    budget: float | None = None  # resident KV bytes as a fraction of dense 16-bit KV (<= 2); None: no budget
    bits: float = 3.5  # bits per coordinate of the compressed tier used by the uniform policy
    value_codec: str = "polar"
    tiers: tuple[TierSpec, ...] | None = None  # the RDR ladder; None: DEFAULT_TIERS
    policy: str = "uniform"
    sink: int = 4  # attention-sink tokens kept exact
    recent: int = 64  # recent-window tokens kept exact
    page_size: int = 64
    seed: int = 0
    obs_window: int = 32  # prompt queries whose attention estimates utility at prefill
    rebudget_every: int = 64  # decode steps between RDR re-budgets
    distortion: str = "unit"  # RDR's error price: 'unit' (per unit norm) or 'logit' (rdr/costs.py, docs/QUALITY.md)
    pad_head_dim: str | bool = "auto"  # zero-pad head dims the kernels cannot take: 'auto' on CUDA, True, False (head_pad.py)
    center_keys: bool = True  # code k - mean(k) per row and KV head; softmax cannot see the mean (key_centering.py)
    # backend="sphkv" on CUDA: replay compiled calls from CUDA graphs (inductor_passes/graph_replay.py); no effect on
    # optimize(), whose decode step generate() compiles with transformers' own graphs
    cuda_graphs: bool = field(default=False, compare=False)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def utility_window(self) -> int:
        """The queries whose attention mass attend computes as utility: only RDR reads it, so the
        uniform policy skips that work (docs/PERFORMANCE.md counts what it costs)."""
        return self.obs_window if self.policy == "rdr" else 0

    @property
    def tier_ladder(self) -> tuple[TierSpec, ...]:
        if self.tiers is not None:
            return self.tiers
        if self.policy == "uniform":
            return (TierSpec("exact"), TierSpec("uniform", float(self.bits), self.value_codec, float(self.bits)))
        return DEFAULT_TIERS

    @staticmethod
    def from_dict(options: dict | None) -> "SphkvOptions":
        options = dict(options or {})
        known = {f.name for f in fields(SphkvOptions)} - {"extra"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SphkvOptionsError(f"unknown sphkv option(s) {unknown}; accepted: {sorted(known)}")
        if "tiers" in options and options["tiers"] is not None:
            options["tiers"] = tuple(t if isinstance(t, TierSpec) else TierSpec.from_string(t) for t in options["tiers"])
        opts = SphkvOptions(**options)
        opts.validate()
        return opts

    def validate(self) -> None:
        def bad(name, accepted):
            raise SphkvOptionsError(f"sphkv option {name}={getattr(self, name)!r} is invalid: expected {accepted}")

        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, (int, float))
                                        or not 0 < self.budget <= 2):
            bad("budget", "a fraction of dense 16-bit KV bytes in (0, 2] (2: the bytes of a dense 32-bit cache), "
                          "e.g. 0.125, or None")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)) or not 1.0 <= self.bits <= 16:
            bad("bits", "bits per coordinate in [1, 16], e.g. 3.5")
        if self.value_codec not in VALUE_CODECS:
            bad("value_codec", f"one of {VALUE_CODECS}")
        if self.policy not in POLICIES:
            bad("policy", f"one of {POLICIES}")
        if self.distortion not in DISTORTIONS:
            bad("distortion", f"one of {DISTORTIONS}")
        for name in ("sink", "recent", "obs_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(name, "an int >= 0")
        for name in ("page_size", "rebudget_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "an int >= 1")
        if not (self.pad_head_dim is True or self.pad_head_dim is False or self.pad_head_dim == "auto"):
            bad("pad_head_dim", "'auto' (pad on CUDA, where the Triton kernels run), True or False")
        if not isinstance(self.center_keys, bool):
            bad("center_keys", "True or False")
        if not isinstance(self.cuda_graphs, bool):
            bad("cuda_graphs", "True or False")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            bad("seed", "an int")
        ladder = self.tier_ladder
        if sum(t.exact for t in ladder) != 1:
            raise SphkvOptionsError(f"sphkv option tiers must contain exactly one exact tier, got {[t.name for t in ladder]}")
        if len({t.name for t in ladder}) != len(ladder):
            raise SphkvOptionsError(f"sphkv option tiers has duplicate names: {[t.name for t in ladder]}")


class SphkvPerformanceWarning(UserWarning):
    """A configuration that works but is known to be slow; the message names the fix."""


class SphkvCacheWarning(UserWarning):
    """A KV cache the backend compressed was used in a way that gave a wrong answer outside sphkv
    (the message names the cause and the fix)."""


class SphkvCoverageWarning(UserWarning):
    """Layers kept dense that the plan could not foresee (optimize()'s trial forward found them)."""
