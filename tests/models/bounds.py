"""The error the tests allow a rewritten model, derived from the codec, not fitted.

A compressed token's key direction has relative error e_k with E[e_k^2] = eps_k (the
codec's predicted direction MSE), its value e_v with E[e_v^2] = eps_v. To first order an
attention output is a convex combination of values whose weights move by the key error, so
its relative RMS error is at most sqrt(eps_k + eps_v) even if every token were compressed;
residual streams and normalisation pass relative errors on without amplifying them at these
sizes. The same relative RMS bound is applied to the model's logits.
"""
from __future__ import annotations

import math

from sphkv_compile.options import SphkvOptions
from sphkv_compile.tiers import tier_codecs


def relative_rms_bound(options: dict, head_dim: int) -> float:
    opts = SphkvOptions.from_dict(options)
    spec = next(t for t in opts.tier_ladder if not t.exact)
    kc, vc = tier_codecs(spec, head_dim, opts.seed)
    return math.sqrt(kc.predicted_direction_mse + vc.predicted_direction_mse)


def relative_rms(actual, expected) -> float:
    return float((actual - expected).float().norm() / expected.float().norm())
