"""Why an attention site stays dense.

Analysis raises `StayDense(reason)` as soon as a site leaves what the rewrite can prove
equivalent; the site is then left untouched in the graph (so its output equals dense
exactly) and the reason goes to sphkv_compile.report().
"""
from __future__ import annotations

DROPOUT_IN_TRAINING = "dropout in training mode (attention weights are random)"
POSITION_BIAS = "additive position bias (ALiBi or similar): the additive term is not a 0/-inf mask"
SOFT_CAPPING = "logit soft-capping (tanh on the scores)"
CROSS_ATTENTION = "cross-attention or cache-less attention: keys/values do not come from a KV-cache update"
SLIDING_WINDOW = "sliding-window or other non-causal mask: the mask is not causal over the cache plus padding"
CUSTOM_SCORE = "custom score function"
UNMASKED_STATIC = "a static buffer read without a mask: dense attention also sees its unfilled slots"
NON_CAUSAL = "non-causal attention over the new chunk (no causal mask and more than one query)"
TOP_LEFT_CAUSAL = "is_causal with a past is top-left aligned in SDPA, not causal over the cache"
QUERY_NOT_CHUNK = "the queries are not the appended chunk (query length differs from the chunk length)"
HEAD_LAYOUT = "keys/values reach attention through a layout that is not [B,H,T,d] grouped as h // G"
CACHE_ESCAPES = "the dense cache is read outside attention"
UNSUPPORTED_CACHE = "unsupported cache update"
NON_CONSTANT_SCALE = "the score scale is not a positive constant"
UNRECOGNIZED = "unrecognized attention pattern"
GRAD_ENABLED = "autograd is recording (grad enabled with inputs that require grad): the sphkv ops have no backward"
# transformers models keep their KV in a Cache object outside the graph, and generate() calls the
# model's own forward, not a torch.compile wrapper: optimize() is their entry point
TRANSFORMERS_MODEL = ("a transformers model: use sphkv_compile.optimize(model), which gives its forward and "
                      "generate() the compressed cache (torch.compile wraps only the forward, and generate() "
                      "calls the model's own)")


def from_transformers(gm) -> bool:
    """Was this graph traced from a transformers model (its nodes' module stack says so)?"""
    for node in gm.graph.nodes:
        for _, module_type in (node.meta.get("nn_module_stack") or {}).values():
            name = module_type if isinstance(module_type, str) else f"{module_type.__module__}.{module_type.__name__}"
            if name.startswith("transformers."):
                return True
    return False


class StayDense(Exception):
    """Raised during analysis: the site stays dense for `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = f"{reason}: {detail}" if detail else reason
