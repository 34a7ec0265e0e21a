"""Host side of the fragment kernel (fragment_kernels.py): which tiers it serves, its launch.

FRAGMENT["enabled"] turns it off (every compressed tier then runs the Triton kernels of
attention_kernels.py); the GPU tests run both and compare.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from sphkv_compile.radius import LOG2_MIN

from . import dependent_launch
from .layout import PolarTables, Unsupported, under_interpreter

# tokens_per_warp: tokens each warp decodes per tile (32; session 25, staged, whole attend call:
# 16 was 4% faster at Llama-3-8B B=8 32k and 12% slower at SmolLM2 B=8 32k); warps per program;
# programs_per_sm: what the split count assumes; None: as many as the compiled kernel's registers
# and shared memory let one SM hold (the driver's occupancy query; H200, Triton 3.6: 2 at d=128,
# 3 at d=64). Swept by hand over 2-4 at five 32k points, that count was within 3% of the best
# one at each, while other counts lost up to 16% (Llama B=1 at 4; session 26). maxnreg: a
# register cap per thread by head dim (absent or 0: none). At d=64 ptxas left to itself used 139
# registers; capped at 168 (still three programs per SM) the kernel ran 13% faster
# at SmolLM2 B=8 32k (0.089 vs 0.102 ms, session 26). At d=128 a cap of 168 (with splits for three
# programs per SM) spilled and ran 11% slower; d=32 has not been timed either way.
# decode_kernel: launches of at most 8 query rows per KV head (decode steps of GQA groups up to 8)
# run paged_fragment_decode_kernel (fragment_decode_kernel.py: the queries as the mma's 8
# columns, half the accumulator registers); decode_maxnreg: its register cap, as maxnreg.
FRAGMENT = {"enabled": True, "tokens_per_warp": 32, "warps": 4, "programs_per_sm": None,
            "maxnreg": {64: 168}, "head_dims": (32, 64, 128), "decode_kernel": True, "decode_maxnreg": {}}


# query rows per program: the decode kernel's mma N (its 8 query columns), the other kernel's M
DECODE_ROWS, MANY_ROWS = 8, 16


def decode_rows(M: int) -> bool:
    """Does a launch of M query rows per KV head run paged_fragment_decode_kernel?"""
    return FRAGMENT["decode_kernel"] and M <= DECODE_ROWS


def rows_per_program(M: int) -> int:
    return DECODE_ROWS if decode_rows(M) else MANY_ROWS


def launch_options(D: int, decode: bool = False) -> dict:
    """The Triton launch options beyond the constants at head dim D: warps, and the register cap
    where set (FRAGMENT["maxnreg"], or "decode_maxnreg" for the decode kernel: one value, or a
    dict by head dim)."""
    cap = FRAGMENT["decode_maxnreg" if decode else "maxnreg"]
    cap = cap.get(D, 0) if isinstance(cap, dict) else cap
    return {"num_warps": FRAGMENT["warps"], **({"maxnreg": cap} if cap else {})}


def _kernel(decode: bool):
    if decode:
        from .fragment_decode_kernel import paged_fragment_decode_kernel
        return paged_fragment_decode_kernel
    from .fragment_kernels import paged_fragment_kernel
    return paged_fragment_kernel


@lru_cache(maxsize=1)
def gluon_available() -> bool:
    try:
        from . import fragment_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported_reason(info, head_dim: int, device: torch.device, page_size: int, pool_address: int = 0,
                       pool_words: int | None = None) -> str | None:
    """Why the fragment kernel cannot serve this tier here (None: it can). pool_words: the
    record pool's words per token, which the staging code assumes is K's plus V's."""
    if not FRAGMENT["enabled"]:
        return "turned off (FRAGMENT['enabled'])"
    if device.type != "cuda" or under_interpreter():
        return "Gluon kernels run on CUDA only (not under TRITON_INTERPRET)"
    if not isinstance(info.key, PolarTables) or not isinstance(info.value, PolarTables):
        return "keys and values must both use the polar codec"
    if pool_words is not None and pool_words != info.key_words + info.value_words:
        return f"records of {pool_words} words, not the tier's {info.key_words} + {info.value_words}"
    if pool_address % 16:
        return "the record pool is not 16-byte aligned (cp.async copies 16 bytes)"
    # at most 32: one lane decodes each token's radii; at least 16: the tokens are p @ v's K (mma_v2's k16)
    if FRAGMENT["tokens_per_warp"] not in (16, 32):
        return f"{FRAGMENT['tokens_per_warp']} tokens per warp (served: 16 or 32)"
    if page_size % FRAGMENT["tokens_per_warp"]:
        return f"page size {page_size} is not a multiple of {FRAGMENT['tokens_per_warp']} tokens per warp"
    if info.key.radius_step != info.value.radius_step:
        return "key and value radii in different formats"
    if head_dim not in FRAGMENT["head_dims"]:
        return f"head dim {head_dim} (served: {FRAGMENT['head_dims']})"
    if torch.version.hip is not None:
        return "ROCm: the fragment kernel is written for NVIDIA GPUs (mma_v2, cp.async and inline PTX)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "mma_v2 needs compute capability 8.0 or newer"
    if not gluon_available():
        return "this Triton has no Gluon"
    try:
        _decoders(info)
    except Unsupported as err:
        return str(err)
    return None


# (id(info), tokens per warp, warps) -> (info, decoders): fragment_decoders' own cache hashes the
# codec tables (~50 us a call on the host); a tier's info object is itself cached (layout.tier_info)
_DECODERS: dict = {}


def _decoders(info):
    from .fragment_codegen import fragment_decoders

    key = (id(info), FRAGMENT["tokens_per_warp"], FRAGMENT["warps"])
    hit = _DECODERS.get(key)
    if hit is None or hit[0] is not info:
        hit = (info, fragment_decoders(info.key, info.value, info.key_words, info.key_words + info.value_words,
                                       FRAGMENT["tokens_per_warp"], FRAGMENT["warps"]))
        _DECODERS[key] = hit
    return hit[1]


def splits(rows: int, capacity: int, wanted: int, balanced, per_sm: int) -> int:
    """Splits per row: as many as fill per_sm programs per SM (programs_per_sm), then the count up
    to twice that which leaves no SM a partial last wave (attend._balanced_splits)."""
    tile = FRAGMENT["tokens_per_warp"] * FRAGMENT["warps"]
    tiles = max(1, -(-capacity // tile))
    S = max(1, min(tiles, -(-(wanted // 2 * per_sm) // rows)))
    most = min(max(S, min(2 * S, 32)), tiles)
    return balanced(rows, wanted // 2, per_sm, most)


def _constants(info, D: int, page_size: int, record_words: int, pdl: bool = False) -> dict:
    """The kernel's constexpr arguments (pdl: launched with programmatic dependent launch, as
    dependent_launch.DEPENDENT_LAUNCH has it)."""
    key_quarter, value_octant, key_radius, value_radius, declare_records, copy_tile = _decoders(info)
    return dict(PS=page_size, WT=record_words, D=D, CT=FRAGMENT["tokens_per_warp"], W=FRAGMENT["warps"],
                K_WORDS=info.key.half_pairs.numel(), V_WORDS=info.value.half_pairs.numel(), KEY_QUARTER=key_quarter,
                VALUE_OCTANT=value_octant, KEY_RADIUS=key_radius, VALUE_RADIUS=value_radius,
                DECLARE_RECORDS=declare_records, COPY_TILE=copy_tile, STEP=info.key.radius_step, LOG2_MIN=LOG2_MIN,
                PDL=dependent_launch.mode(pdl, "fragment"))


def compile_for_target(info, D: int, page_size: int = 64, arch: int = 90, decode: bool = False, pdl: bool = False):
    """Compile the kernel (decode: paged_fragment_decode_kernel; pdl: for programmatic dependent
    launch) for an sm_<arch> GPU without one (Triton's bundled ptxas): the assert_trivial
    conversions fail here if a decoder's leaves miss the operand fragments. Returns the compiled
    kernel (metadata.shared, asm["cubin"])."""
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        from triton.experimental.gluon import GluonASTSource
    except ImportError:  # Triton 3.6
        from triton.experimental.gluon._runtime import GluonASTSource
    sig = {name: "*i32" for name in ("pool_ptr", "pages_ptr", "count_ptr", "ktab_ptr", "vtab_ptr")}
    sig.update({name: "*fp32" for name in ("q_ptr", "acc_ptr", "m_ptr", "l_ptr")})
    sig.update({name: "i32" for name in ("M", "max_pages", "S", "split_offset", "S_total")})
    consts = _constants(info, D, page_size, info.key_words + info.value_words, pdl)
    return triton.compile(GluonASTSource(_kernel(decode), sig, consts), target=GPUTarget("cuda", arch, 32),
                          options={**launch_options(D, decode), **dependent_launch.launch_options(pdl)})


# kernel specialisation key -> the compiled kernel, its shared-memory opt-in set
_COMPILED: dict = {}

# (id(info), head dim, page size, record words, tokens per warp, warps, launch options, device) ->
# (info, programs per SM) (programs_per_sm; attend asks every call, so the key is cheap to build:
# the constants themselves follow from it)
_PER_SM: dict = {}


def _constants_key(consts: dict) -> tuple:
    return tuple(sorted((k, id(v) if callable(v) else v) for k, v in consts.items()))


def _resident_programs(compiled) -> int:
    """Programs of the compiled kernel one SM holds at once (registers, shared memory, warps), as
    the driver computes it."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    blocks = ctypes.c_int()
    err = cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(blocks), ctypes.c_void_p(compiled.function),
                                                           ctypes.c_int(32 * FRAGMENT["warps"]),
                                                           ctypes.c_size_t(compiled.metadata.shared))
    if err != 0 or blocks.value < 1:
        raise RuntimeError(f"the occupancy query for the fragment kernel failed (CUresult {err}, "
                           f"{blocks.value} programs per SM)")
    return blocks.value


def _opt_in_shared_memory(compiled) -> None:
    """Let the launch use static + dynamic shared memory above 48 KiB.

    The staged records and tables sit in static .shared arrays, which Triton does not count. Triton
    raises a kernel's dynamic shared-memory limit (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
    only where its own dynamic part passes 48 KiB; where only the sum does, the launch fails with
    "invalid argument" (Triton 3.6: 32 KiB dynamic for the warps' merge + ~37 KiB static). So set
    the attribute here, through the driver API."""
    import ctypes

    compiled._init_handles()
    cuda = ctypes.CDLL("libcuda.so.1")
    function = ctypes.c_void_p(compiled.function)
    static = ctypes.c_int()
    if cuda.cuFuncGetAttribute(ctypes.byref(static), 1, function) != 0:  # CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
        raise RuntimeError("cuFuncGetAttribute(SHARED_SIZE_BYTES) failed for the fragment kernel")
    # set even under 48 KiB (harmless): the per-block reservation may count against the limit too
    if cuda.cuFuncSetAttribute(function, 8, ctypes.c_int(compiled.metadata.shared)) != 0:
        raise RuntimeError(f"the fragment kernel needs {static.value + compiled.metadata.shared} bytes of "
                           "shared memory and the driver refused the opt-in; set "
                           "sphkv_compile.kernels.fragment_launch.FRAGMENT['enabled'] = False")


def _prepared(info, args, page_size: int, grid, device, decode: bool, pdl: bool = False):
    """(kernel, constants, launch options, compiled kernel) of a launch with these arguments (decode:
    of paged_fragment_decode_kernel; pdl: with programmatic dependent launch), its kernel compiled
    and its shared-memory opt-in set.

    Triton specialises on the constants, the integer arguments (== 1, multiples of 16) and the
    tensors' dtypes and 16-byte alignment: each new combination may be a new compiled kernel, whose
    opt-in is set once."""
    kernel = _kernel(decode)
    q_in, pool = args[0], args[1]
    consts = _constants(info, q_in.shape[-1], page_size, pool.shape[-1], pdl)
    options = {**launch_options(q_in.shape[-1], decode), **dependent_launch.launch_options(pdl)}
    key = (decode, _constants_key(consts), tuple(options.items()), device,
           tuple((a == 1, a % 16 == 0) if isinstance(a, int) else (a.dtype, a.data_ptr() % 16 == 0) for a in args))
    if key not in _COMPILED:
        compiled = kernel.warmup(*args, grid=grid, **consts, **options)
        _opt_in_shared_memory(compiled)
        _COMPILED[key] = compiled
    return kernel, consts, options, _COMPILED[key]


def compiled_stand_in(info, q_in, st, M: int):
    """The kernel that inputs like these compile, from a stand-in launch of two splits (the
    kernel's registers and shared memory do not depend on the split count)."""
    stand_in = torch.empty(2, M, q_in.shape[-1], dtype=torch.float32, device=q_in.device)
    tables = torch.empty(1, dtype=torch.int32, device=q_in.device)
    args = (q_in, st.pool, st.pages, st.count, stand_in, stand_in[:, :, 0], stand_in[:, :, 0], tables, tables, M,
            st.pages.shape[-1], 2, 0, 2)
    decode = decode_rows(M)
    grid = (st.count.numel(), 2, -(-M // rows_per_program(M)))
    return _prepared(info, args, st.page_size, grid, q_in.device, decode)[3]


def programs_per_sm(info, q_in, st, M: int) -> int:
    """What the split count assumes: FRAGMENT["programs_per_sm"], else as many programs as one SM
    holds of the kernel these inputs compile."""
    if FRAGMENT["programs_per_sm"]:
        return FRAGMENT["programs_per_sm"]
    D = q_in.shape[-1]
    decode = decode_rows(M)
    key = (id(info), decode, D, st.page_size, st.pool.shape[-1], FRAGMENT["tokens_per_warp"], FRAGMENT["warps"],
           tuple(launch_options(D, decode).items()), q_in.device)
    hit = _PER_SM.get(key)
    if hit is None or hit[0] is not info:
        hit = (info, _resident_programs(compiled_stand_in(info, q_in, st, M)))
        _PER_SM[key] = hit
    return hit[1]


def launch(info, q_in, st, acc, m, l, split_offset, S, S_total, M, key_table, value_table, pdl: bool = False) -> None:
    """pdl: with programmatic dependent launch (dependent_launch.py)."""
    decode = decode_rows(M)
    grid = (st.count.numel(), S, -(-M // rows_per_program(M)))
    args = (q_in, st.pool, st.pages, st.count, acc, m, l, key_table, value_table, M, st.pages.shape[-1], S,
            split_offset, S_total)
    kernel, consts, options, _ = _prepared(info, args, st.page_size, grid, q_in.device, decode, pdl)
    kernel[grid](*args, **consts, **options)
