"""Rate-Distortion Retention (SPEC §3): per token and KV head, keep/drop and precision tier
under one byte budget, in tier-homogeneous pages.

    costs      bytes and measured distortion per tier (and drop)
    allocate   Lagrangian allocation with bisection on λ
    utility    utility estimators (observation window, decode accumulation, expected attention)
    update     rdr_update / rebudget: in place on fixed tier states
    budget     byte budgets and the up-front check
    eager      apply / apply_layers for LayerStore
    ops        the custom op sphkv::rdr_update (import it to register)
"""
from .allocate import BudgetInfeasibleError, allocate
from .budget import RdrBudgetError, check_budget, check_options, layer_budget_bytes, pool_pages
from .costs import choice_table
from .eager import apply, apply_layers
from .update import page_slack_bytes, rdr_update, rebudget, token_bytes
from . import ops  # noqa: F401  registers sphkv::rdr_update
