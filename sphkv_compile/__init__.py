"""sphkv: spherical KV-cache compression as a torch.compile backend.

    model = torch.compile(model, backend="sphkv", options={"bits": 3.5})

Public API: SphericalCodec (keys as one radius + angle codes, logits from the codes),
RotatedScalarCodec, LayerStore (the paged tier-homogeneous store), TierSpec, SphkvOptions,
report() (what the latest compiled forward rewrote, and measured KV bytes),
check_runtime() (read the backend's runtime checks still in flight on a GPU) and
optimize(model, **options) (one-call setup of a Hugging Face model).
"""
from .codec import SphericalCodec
from .options import SphkvCacheWarning, SphkvCoverageWarning, SphkvOptions, SphkvOptionsError, SphkvPerformanceWarning
from .report import report
from .scalar_codec import RotatedScalarCodec
from .store import LayerStore, StoreCapacityError
from .tiers import DEFAULT_TIERS, TierSpec

__all__ = [
    "SphericalCodec", "RotatedScalarCodec", "LayerStore", "StoreCapacityError", "TierSpec", "DEFAULT_TIERS",
    "SphkvOptions", "SphkvOptionsError", "SphkvPerformanceWarning", "SphkvCoverageWarning",
    "SphkvCacheWarning", "report", "optimize",
    "check_runtime",
]
__version__ = "0.1.0"


def __getattr__(name):
    # optimize() pulls in transformers; load it only when asked for
    if name == "optimize":
        from .api import optimize

        return optimize
    if name == "check_runtime":
        from .inductor_passes.runtime_checks import check_runtime

        return check_runtime
    raise AttributeError(f"module 'sphkv_compile' has no attribute {name!r}")
