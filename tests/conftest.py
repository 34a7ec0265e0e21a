import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI runs on 2 cores; keep hypothesis bounded and free of wall-clock deadlines.
settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_logreport(report):
    """SPHKV_REPORT_AT_ONCE=1 (device runs): each phase's duration, and a failure's traceback, as
    soon as they happen; a run cut short by its time limit still shows them."""
    if not os.environ.get("SPHKV_REPORT_AT_ONCE"):
        return
    print(f"\n[{report.when} {report.outcome} {report.duration:.1f}s] {report.nodeid}", flush=True)
    if report.failed:
        print(report.longreprtext[-6000:], flush=True)
