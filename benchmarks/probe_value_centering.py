"""Probe: values stored centered too, in the eval harness (session 39; not built into the product).

Values minus their per-head mean after the sinks, with the mean added back to the attention
output (exact: softmax weights sum to one without sink logits). Runs the harness with two extra
methods, uniform_cv and rdr_cv (keys centered as in the product, values centered on top):

    python benchmarks/probe_value_centering.py --size medium --tasks ppl agreement --out /tmp/vc \
        --methods dense uniform uniform_cv rdr rdr_cv
"""
import sys
from sphkv_compile.eval import methods as M
from sphkv_compile.eval.caches import StoreCache
from sphkv_compile.key_centering import centered, new_key_mean, set_key_mean_


class ValueCentered:
    def __init__(self, inner: StoreCache, vmean):
        self.inner, self.vmean = inner, vmean

    def attend(self, q, k, v, scale):
        out = self.inner.attend(q, k, v - self.vmean, scale)  # softmax weights sum to 1: + mean is exact
        G = q.shape[1] // v.shape[1]
        return out + self.vmean.repeat_interleave(G, dim=1)


def with_centered_values(method):
    def run(cap, budget, cfg):
        B, H, _, d = cap.values.shape
        vmean = new_key_mean(B, H, d, cap.values.device, cap.values.dtype)
        set_key_mean_(vmean, cap.values, None, cfg.sink)
        cap2 = M.LayerCapture(cap.keys, centered(cap.values, vmean), cap.observed, cap.accumulated, cap.window_queries)
        cache, held = method(cap2, budget, cfg)
        return ValueCentered(cache, vmean), held
    return run


M.METHODS["uniform_cv"] = with_centered_values(M.METHODS["uniform"])
M.METHODS["rdr_cv"] = with_centered_values(M.METHODS["rdr"])
from sphkv_compile.eval.__main__ import main
main(sys.argv[1:])
