"""Rate-Distortion Retention (SPEC §3): per token and KV head, keep/drop and precision tier
under one byte budget, in tier-homogeneous pages.

    costs      bytes and measured distortion per tier (and drop)
    allocate   Lagrangian allocation with bisection on λ
    utility    utility estimators (observation window, decode accumulation, expected attention)
    update     rdr_update / rebudget: in place on fixed tier states
    budget     byte budgets and the one up-front check (both policies)
    meter      the per-layer int64 tensor the budgeting node counts in
    node       the budgeting node and the RDR cache update of the graph and the HF cache
    eager      apply / apply_layers for LayerStore
    ops        the custom ops sphkv::rdr_update, update_cache_rdr, kv_budget (import to register)
"""
from .allocate import BudgetInfeasibleError, allocate
from .budget import (RdrBudgetError, SphkvBudgetError, budget_bytes, check_budget, check_options, layer_budget_bytes,
                     pool_pages, uniform_target_tier)
from .costs import choice_table
from .eager import apply, apply_layers
from .update import page_slack_bytes, rdr_update, rebudget, token_bytes
from . import ops  # noqa: F401  registers sphkv::rdr_update
