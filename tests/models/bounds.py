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


def codec_mse(options: dict, head_dim: int) -> tuple[float, float]:
    """(eps_k, eps_v): predicted direction MSE of the compressed tier's key and value codecs."""
    opts = SphkvOptions.from_dict(options)
    spec = next(t for t in opts.tier_ladder if not t.exact)
    kc, vc = tier_codecs(spec, head_dim, opts.seed)
    return kc.predicted_direction_mse, vc.predicted_direction_mse


def relative_rms_bound(options: dict, head_dim: int) -> float:
    eps_k, eps_v = codec_mse(options, head_dim)
    return math.sqrt(eps_k + eps_v)


def attention_rms_bound(options: dict, q, k, scale: float) -> float:
    """Bound on the RMS attention-output error per query, in units of the RMS value norm.

    A value error e_v moves the output by at most e_v * |v| (convex combination). A key
    error dk changes a logit by scale * q.dk; after the Hadamard rotation dk is spread
    evenly over the d directions, so |q.dk| ~ |q| |k| e_k / sqrt(d); to first order the output
    then moves by that logit change times |v|. Using the largest |q| and |k| gives
        rms error <= rms|v| * sqrt(eps_v + eps_k * (scale * max|q| * max|k| / sqrt(d))^2).
    """
    eps_k, eps_v = codec_mse(options, q.shape[-1])
    c = scale * float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max()) / math.sqrt(q.shape[-1])
    return math.sqrt(eps_v + eps_k * c * c)


def rms_error_in_value_units(actual, expected, values) -> float:
    """RMS over queries of |actual - expected|, divided by the RMS norm of the values."""
    err = (actual - expected).float().norm(dim=-1).pow(2).mean().sqrt()
    return float(err / values.float().norm(dim=-1).pow(2).mean().sqrt())

def relative_rms(actual, expected) -> float:
    return float((actual - expected).float().norm() / expected.float().norm())
