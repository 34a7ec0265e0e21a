"""kernels.attend.CODED settings from "key=value" text, shared by the sweep and probe scripts."""
from __future__ import annotations

from sphkv_compile.kernels import attend as kattend

# CODED["many_rows"] picks warps and programs per SM by row count; a setting naming either of
# these means that launch at every row count, so it turns many_rows off unless it sets it too
LAUNCH_KEYS = {"warps", "programs_per_sm"}


def with_launch_rule(setting: dict) -> dict:
    if LAUNCH_KEYS & set(setting) and "many_rows" not in setting:
        return {"many_rows": None, **setting}
    return setting


def parse(pairs) -> dict:
    """[(key, "int")] -> CODED entries: a bool stays a bool, anything else (an int, a per-head-dim
    dict, a tuple) becomes one int for all head dims (0: off), under the launch rule above."""
    setting = {}
    for key, value in pairs:
        old = kattend.CODED[key]  # KeyError names an unknown setting
        setting[key] = type(old)(int(value)) if isinstance(old, (bool, int)) else int(value)
    return with_launch_rule(setting)
