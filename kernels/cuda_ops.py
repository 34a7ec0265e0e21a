"""CUDA implementations of the sphkv custom ops, backed by the Triton kernels.

Registered with torch.library.register_kernel (through eager_ops.register_kernel, which gives
them to its direct eager calls too), so eager calls, Dynamo graphs and Inductor (which calls a
custom op as an extern kernel) all reach them on CUDA tensors; CPU keeps the reference in ops.py. A configuration the kernels do not handle runs the reference instead and
logs the reason once.
"""
from __future__ import annotations

import logging

import torch

from sphkv_compile import ops as sphkv_ops  # noqa: F401  (defines the ops)
from sphkv_compile.eager_ops import register_kernel
from sphkv_compile.ops import dtype_from_name, on_new_store, parse_tiers, unflatten_state
from sphkv_compile.placement import graduate
from sphkv_compile.rdr.convert import decode_kv
from sphkv_compile.store import (append_records, attend as reference_attend, encode_records as reference_encode,
                                  register_device_decoder, register_device_encoder, register_device_page_copier)

from . import attend as kernel_attend
from . import encode as kernel_encode
from . import page_copy, record_decode
from .decode_update import decode_update
from .layout import Unsupported, prepare_device_tables

log = logging.getLogger("sphkv.kernels")
_ENCODE_TOKENS_PER_LAUNCH = 1 << 19
_reported: set[str] = set()
_registered = False


def _fallback(op: str, err: Exception) -> None:
    msg = f"sphkv::{op} runs the reference implementation on CUDA: {err}"
    if msg not in _reported:
        _reported.add(msg)
        log.warning(msg)


def attend_cuda(q, state, k_new, v_new, valid_new, tiers, seed, kv_dtype, scale, obs_window, accumulate, sinks=None):
    specs = list(parse_tiers(tiers))
    states = unflatten_state(state, tiers)
    vn = None if valid_new is None else valid_new.to(torch.bool)
    dt = dtype_from_name(kv_dtype)
    try:
        out, mass = kernel_attend.attend(q, states, specs, seed=seed, kv_dtype=dt, k_new=k_new, v_new=v_new,
                                         valid_new=vn, scale=scale, obs_window=obs_window, accumulate=accumulate,
                                         sinks=sinks)
    except Unsupported as err:
        _fallback("attend", err)
        out, mass = reference_attend(q, states, specs, seed=seed, kv_dtype=dt, k_new=k_new, v_new=v_new,
                                     valid_new=vn, scale=scale, obs_window=obs_window, accumulate=accumulate,
                                     sinks=sinks)
    return out.contiguous(), mass.to(torch.float32).contiguous()


def encode_records(spec, k, v, seed, kv_dtype):
    """The Triton encoder, or the reference where the kernels do not handle the codec.
    k, v [..., d] (placement.graduate passes the graduating tokens as [M, d])."""
    try:
        if k.dim() == 4:
            return kernel_encode.encode_records(spec, k, v, seed, kv_dtype)
        return _encode_flat(spec, k, v, seed, kv_dtype)
    except Unsupported as err:
        _fallback("encode", err)
        return reference_encode(spec, k, v, seed, kv_dtype)


def decode_records(spec, records, head_dim, seed, kv_dtype):
    """Records of a compressed tier -> (k, v) float32, un-rotated: the Triton decoders, or the
    codecs where the kernels do not handle them (RDR's re-budget decodes the tokens it demotes)."""
    try:
        return record_decode.decode_records(spec, records, head_dim, seed, kv_dtype)
    except Unsupported as err:
        _fallback("decode records", err)
        return decode_kv(spec, records, head_dim, seed, kv_dtype, rotated=False)


def _encode_flat(spec, k, v, seed, kv_dtype):
    """Tokens of any leading shape, in launches of at most _ENCODE_TOKENS_PER_LAUNCH (the token
    tiles of one launch sit on grid axis 1, which holds fewer than 65,536)."""
    lead, d = k.shape[:-1], k.shape[-1]
    k4, v4 = k.reshape(1, 1, -1, d), v.reshape(1, 1, -1, d)
    step = _ENCODE_TOKENS_PER_LAUNCH
    parts = [kernel_encode.encode_records(spec, k4[:, :, s:s + step], v4[:, :, s:s + step], seed, kv_dtype)
             for s in range(0, k4.shape[2], step)]
    out = torch.cat(parts, 2) if parts else reference_encode(spec, k4, v4, seed, kv_dtype)  # (no tokens)
    return out.reshape(*lead, out.shape[-1])


def encode_append_cuda(state, k, v, valid, utility, tier_index, tiers, seed, kv_dtype):
    specs = parse_tiers(tiers)
    states = unflatten_state(state, tiers)
    records = encode_records(specs[tier_index], k, v, seed, dtype_from_name(kv_dtype))
    B, H, N, _ = k.shape
    vmask = None if valid is None else valid.to(torch.bool)[:, None, :].expand(B, H, N)
    append_records(states[tier_index], records, utility, vmask, specs[tier_index].name)


def update_cache_cuda(state, k, v, valid, utility, tiers, seed, kv_dtype, sink, recent, target_tier):
    """A decode step (one token) takes the device-side update (decode_update.py: no host
    reads); a longer chunk (prefill) runs placement.graduate with the Triton encoder."""
    specs = list(parse_tiers(tiers))
    states = unflatten_state(state, tiers)
    kw = dict(seed=seed, kv_dtype=dtype_from_name(kv_dtype), sink=sink, recent=recent, target=target_tier)
    if k.shape[2] == 1:
        try:
            decode_update(states, specs, k, v, valid, utility, **kw)
            return
        except Unsupported as err:
            _fallback("update_cache (device-side decode step)", err)
    graduate(states, specs, k, v, valid, utility, encode=encode_records, **kw)


def registered() -> bool:
    """Have the sphkv ops been given these CUDA implementations (register)?"""
    return _registered


def register() -> None:
    """Install the CUDA implementations (idempotent)."""
    global _registered
    if _registered:
        return
    register_kernel("attend", "cuda", attend_cuda)  # for the dispatcher and eager_ops.call_op
    register_kernel("encode_append", "cuda", encode_append_cuda)
    register_kernel("update_cache", "cuda", update_cache_cuda)
    on_new_store(prepare_device_tables)
    register_device_encoder("cuda", encode_records)  # RDR's re-budget encodes graduating tokens with it
    register_device_decoder("cuda", decode_records)  # ... and decodes the tokens it demotes (record_decode.py)
    if page_copy.ON_CUDA:  # beam search's reorder of every layer's pages in a few launches
        register_device_page_copier("cuda", page_copy.copy_pages)
    _registered = True
