"""Host side of ADA attention: the same contract as sphkv_compile.store.attend, run as Triton
kernels (paged split-KV partials per tier, the dense chunk, one combine).

Raises layout.Unsupported for configurations the kernels do not handle; the op
registration (cuda_ops.py) then runs the reference and logs why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton.language as tl

from sphkv_compile.radius import LOG2_MIN
from sphkv_compile.report import record_decode_kernel
from sphkv_compile.store import TierState
from sphkv_compile.tiers import TierSpec, tier_codecs

from .attention_kernels import (chunk_partials_kernel, exact_and_chunk_partials_kernel, paged_coded_halves_kernel,
                                paged_coded_kernel, paged_coded_quarters_kernel, paged_mass_kernel,
                                paged_partials_kernel, tables_stay_in_global_memory)
from . import dependent_launch, fragment_launch
from .combine_kernels import combine_kernel
from .decode_codegen import decoder, staged_offsets, stager, table_bytes, table_tensor
from .host_math import cdiv, next_power_of_2
from .layout import DEVICE_TABLES, ScalarTables, Unsupported, rotation_matrices, tier_info, under_interpreter
from .query_kernels import prepare_queries_kernel

LOG2E = 1.0 / math.log(2.0)
# Partials of one launch group are kept under this many bytes (long prefills run in query chunks).
PARTIAL_BYTES = 1 << 28
# Tile and launch shape of the paged kernel, from the sweep in benchmarks/bench_decode.py on an
# H100 (docs/PERFORMANCE_HISTORY.md): 64-token tiles, 4 warps, one stage (two stages ran 2-4x slower:
# the software pipeline's shared-memory buffers cut occupancy).
DEFAULT_BLOCK_T = 64
DEFAULT_WARPS = 4
DEFAULT_STAGES = 1
# Compressed tiers: the generated decoders run one token per thread, so a tile is one token
# per thread of the program (docs/PERFORMANCE_HISTORY.md has the sweep).
CODED_WARPS = 4
# Tunables of the compressed-tier kernel, read at launch (benchmarks/sweep_coded.py sets them).
# bf16_tiles: the decoded key/value tiles enter tl.dot as bfloat16, like dense bf16 attention
# (0.86 vs 1.18 ms in fp32/tf32 at Llama B=8 T=32k: half the shared memory and registers).
# programs_per_sm: split-KV programs launched per SM when there are many rows (batch x KV heads
# x query blocks); few_rows_programs_per_sm when programs_per_sm would give a row more than
# max_splits_per_row splits (each split re-reads the tables and q, and the combine merges them).
# maxnreg: register cap per thread (0 or None: the compiler's choice), up to maxnreg_max_d.
# min_tiles_per_split: fewer, longer splits when there are few rows (Llama B=1, 4k tokens: 8 KV
# heads x 33 splits of one tile each leave the combine ~35 splits per row to merge). It bounds
# the splits by the pool's capacity, not the tokens held. H200 sweep (session 6,
# benchmarks/results/h200_sweep_coded_session6.json): 2 takes Llama B=1 4k from 91 to 74 us and
# SmolLM2 B=1 4k from 44 to 41 us; 32k/128k and B=8 unchanged (within 1%); 8 is slower at 4k.
# halves: keys and values decoded in two halves of D (paged_coded_halves_kernel): 138 instead of
# 182 registers per thread in the sm_90 compile at d=128, and under maxnreg=128 four blocks fit
# per SM (a 32-byte spill). H200 sweep (session 8, benchmarks/results/h200_sweep_coded_session8_halves.json),
# against the whole-tile kernel at 2 per SM: four per SM takes Llama B=8 32k from 0.567 to
# 0.515 ms and SmolLM2 B=8 32k from 0.134 to 0.120; at B=1 (8 rows) it is slower (Llama 32k
# 0.149 -> 0.189 ms), where two per SM in halves gives 0.149 (from 0.154) and 128k 0.332 (0.348).
# halves_min_d, maxnreg_max_d: where those two apply (sm_90 compiles, compile_check.py): at d=16 a
# half is no tl.dot operand (under 16 columns); at d=32 the halves kernel needs 149 registers and
# whole tiles 96; at d=256 the 128-register cap spills 376 bytes (uncapped halves: 32, whole: 208).
# quarters: keys and values decoded in four quarters of D (paged_coded_quarters_kernel), from
# quarters_min_d on (a quarter of 32 columns or more). Timed in session 12: within 1.4% of halves,
# so off (h200_sweep_coded_session12_quarters). sm_90 compile at d=128
# (compile_check.py coded 128 128 16 4 1 1 <maxnreg> 4, Triton 3.9): uncapped 138 registers, as
# the halves kernel, so the register peak is not the decoded tile; 3,144 instructions and a
# 16-byte spill at maxnreg=128 (halves: 3,184 and 32), 3,328 and 128 bytes at 96, the cap five
# programs per SM need (halves: 3,496 and 352).
CODED = {"warps": CODED_WARPS, "bf16_tiles": True, "programs_per_sm": {128: 2, "other": 4},
         "few_rows_programs_per_sm": 2, "max_splits_per_row": 32, "maxnreg": {128: 0, "other": 128},
         "maxnreg_max_d": 128, "min_tiles_per_split": 2,
         "halves": True, "halves_min_d": 64, "quarters": False, "quarters_min_d": 128,
         "shared_tables": True, "shared_tables_max_bytes": 4096, "shared_tables_max_d": 128,
         "tokens_per_thread": {128: 2, "other": 1}, "balance_waves": True, "packed": True, "stages": 1,
         "many_rows": {128: (2, 4), "other": None}}
# tokens_per_thread, programs_per_sm and maxnreg may be one value for every head dim or a dict
# by head dim ("other": the rest); _per_dim reads them.
# shared_tables: each program copies the decoders' lookup tables into shared memory once and
# every node's lookup reads them there (decode_codegen.stager). Static shared memory, on top of
# the kernel's own dynamic allocation; the two must stay within the 48 KB a launch gets without
# opting in (_stage_tables checks it per launch shape), and the tables at most
# shared_tables_max_bytes (4 KB: every default tier but "high", 14 KB of 7-bit level tables), up
# to shared_tables_max_d. sm_90 compile, d=128, halves, 128 registers
# (compile_check.py coded 128 128 16 4 1 1 128 1 1): 2,696 instructions instead of 3,184 (no
# 64-bit address arithmetic per lookup: LEA 525 -> 0, SGXT 215 -> 0), spill 40 bytes (was 32).
# H200: 2-7% faster at every swept point but Llama B=1 4k (equal); whole tiles with staged
# tables (128 registers unspilled) were slower at Llama B=8 32k (h200_sweep_coded_session12_shared_tables).
# tokens_per_thread: tokens each thread decodes per tile (the tile is 32 x warps x this). At one,
# Triton lays the decoded tile out in shared memory token-major (its heuristic follows the
# threads when a thread holds one element of a dimension) and writes it one bf16 at a time:
# 256 STS.U16 and 128 PRMT per warp and tile at d=128, 14% of the instructions. At two the
# layout follows the thread's D-contiguous values and the writes are 16-byte vectors
# (STS.128). sm_90 compiles, d=128, staged tables, per token: 84 instructions at one token (halves,
# 4 warps, 128 registers); 68 at two (quarters, 2 warps, 168 registers, 72-byte spill; six
# programs per SM fit), 66 (quarters, 4 warps, 255 registers, two per SM). H200 sweep, session 13
# (h200_sweep_coded_session13_two_tokens): no gain at B=8 (Llama 32k 0.498 -> 0.54-1.05 ms: two
# dependency chains per thread cost registers or warps); quarters/4 warps/uncapped is 2-8% faster
# at Llama B=1 only, 6-9% slower elsewhere. So one, until the packed decoders (session 17,
# h200_sweep_coded_session17_two_tokens_packed): two tokens, 4 warps, uncapped (246-255
# registers, so two programs per SM) against one token, halves, 128 registers, four per SM:
# Llama B=8 32k 0.401 -> 0.391 ms, B=1 32k 0.144 -> 0.133, B=1 128k 0.303 -> 0.264, B=1 4k
# 0.072 -> 0.067; SmolLM2 (d=64) within 1% (B=8 32k 0.112 -> 0.113). Two warps at four per SM
# and quarters capped at 168 registers were slower at B=1. The full benchmark then showed
# SmolLM2's many-row points slower (B=32 128k 1.120 -> 1.409 ms, B=32 32k 0.317 -> 0.381) and
# Llama B=32 flat (5.584 -> 5.606 at 128k), so two tokens at d=128 only; at d=256 a 256-token
# tile's halves would also need 81 KB of shared memory.
# packed: where the tables are staged, the polar decoders stage (cos, sin) as float16 pairs and
# run the tree in f16x2 (decode_codegen, packed=True): one HMUL2 per node instead of two FMULs,
# one LDS.32 instead of an LDS.64, and float16 leaves with no conversion; the dots then take
# float16 operands (10 mantissa bits to bfloat16's 7; the tiles are unit-radius, so in range).
# stages: the coded kernels' num_stages (Triton's software pipelining of the tile loop's loads:
# at 2 or more the page-table and record loads of later tiles become cp.async copies into shared
# memory, LDGSTS in the sm_90 compile). Timed in session 21 (benchmarks/probe_fp8_values.py).
# many_rows: (warps, programs_per_sm) of launches whose rows fill that many programs per SM
# within max_splits_per_row splits each (Llama-3-8B from B=4 on), by head dim; None: warps and
# programs_per_sm throughout. The same eight warps per SM in 2-warp programs wait on each other
# less than in 4-warp ones, but a few rows (B=1) cannot fill four programs per SM. H200, session
# 22 (h200_session22_probe_siblings), 2 warps x 4 per SM against 4 x 2 at d=128: Llama B=8 32k
# 0.376 vs 0.384 ms, B=32 128k 5.342 vs 5.585; B=1 32k 0.105 vs 0.078 (so not there); at d=64
# SmolLM2 B=8 32k 0.112 vs 0.099 (so not at other head dims). The full benchmark at d=128
# (h200_session22_bench_decode): polar B=8 32k 0.386 -> 0.377, B=32 128k 5.623 -> 5.374, but the
# scalar value codec 0.426 -> 0.482 and 6.138 -> 6.995, so only tiers with polar values. It
# overrides warps and programs_per_sm where it applies: the sweep scripts set it to None when a
# setting names either.
# combine_kernel: splits merged per step, output columns per rotation block, warps (sm_90
# compile, D=128: see benchmarks/compile_check.py). Launches with fewer (batch·KV head, row
# block) pairs than SMs split the output columns over programs too (_column_programs).
# few_rows_warps: warps of combine_kernel and prepare_queries_kernel where a block has fewer
# than 16 rows (decode steps) at D <= 128. 4 rather than 8 made the whole decode call 3-11%
# faster at five points (H200, session 28: Llama-3-8B B=1 4k 0.0396 -> 0.0354 ms, B=1 32k
# 0.0633 -> 0.0587, B=8 4k 0.0721 -> 0.0662, B=8 32k 0.2378 -> 0.2302; SmolLM2 B=1 4k 0.0292 ->
# 0.0264; h200_session28_probe_b1_launch.json); at D=256 four warps spill (sm_90 compile).
COMBINE = {"splits": 4, "columns": 32, "warps": 8, "few_rows_warps": 4}
# exact_with_chunk: where the last tier is exact and a chunk is given (every decode step of the
# default ladder), its splits and the chunk's run in one launch (exact_and_chunk_partials_kernel)
# queries_with_exact: that launch also prepares the queries (prepare_queries_kernel's work, one
# launch fewer per call) and runs before the compressed tiers' kernels. Faster at 7 of 8 decode
# points, outputs bit-equal (H200, session 36, same run, ms: Llama-3-8B B=1 4k 0.0305 -> 0.0277,
# B=1 32k 0.0527 -> 0.0494, B=8 32k 0.2147 -> 0.2124, B=8 128k 0.7576 -> 0.7554, B=32 32k
# 0.7847 -> 0.7875; SmolLM2 B=1 4k 0.0221 -> 0.0195, B=8 32k 0.0622 -> 0.0597;
# h200_session36_probe_fragment_launch.json). With dependent launch on as well it was slower at
# Llama B=1 32k (0.0604), so that stays off.
PLAIN = {"exact_with_chunk": True, "queries_with_exact": True}


def _bf16_tiles() -> bool:
    """The interpreter's tl.dot mishandles bfloat16 operands, so under it (CPU tests of the
    decode logic) the tiles stay float32; the bf16 path runs on the GPU only."""
    return CODED["bf16_tiles"] and not under_interpreter()


def _per_dim(key: str, D: int):
    """CODED[key] at head dim D (a plain value, or a dict by head dim with an "other" entry)."""
    value = CODED[key]
    return value.get(D, value["other"]) if isinstance(value, dict) else value


def _coded_block_t(D: int, warps: int | None = None) -> int:
    """Tokens per tile of the coded kernels at head dim D, in programs of `warps` warps
    (default CODED["warps"])."""
    return 32 * (warps or CODED["warps"]) * _per_dim("tokens_per_thread", D)


@lru_cache(maxsize=None)
def _programs_wanted(device: torch.device) -> int:
    """Enough programs to fill the GPU twice over (a few under the interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _block_m(rows: int) -> int:
    """Query rows per program. 16 (tl.dot's minimum): on Triton 3.6 a 64-row block over the
    decoded key tile fails to compile ("Illegal shared layout" in TritonGPUOptimizeDotOperands),
    so long prefills re-decode each key tile once per 16 rows."""
    return 16


def _combine_block(M: int, block_m: int) -> tuple[int, int]:
    """(rows, splits) per step of combine_kernel: the partial kernels' block_m rows, or fewer when
    the call has fewer (a decode step has G rows: 4 for Llama-3-8B), with the splits per step
    raised so a step's tile keeps COMBINE["splits"] x block_m (row, split) pairs. Each step waits
    out a load and a shared-memory broadcast, so at B=1 (8 rows x 33 splits) the steps were most
    of the combine's 59 us (session 18)."""
    rows = block_m if M >= block_m else next_power_of_2(M)
    return rows, COMBINE["splits"] * block_m // rows


def _block_columns(rows: int, D: int) -> int:
    """Output columns per block of combine_kernel and prepare_queries_kernel: COMBINE["columns"],
    fewer where the rows are under tl.dot's 16 and the float32 FMA rotation's [rows, D, columns]
    product would pass 16K values (64 per thread at 8 warps: 8 query heads at D=128 get 16)."""
    cols = min(D, COMBINE["columns"])
    while rows < 16 and cols > 8 and rows * D * cols > 16384:
        cols //= 2
    return cols


def _small_kernel_warps(rows: int, D: int) -> int:
    """Warps of combine_kernel and prepare_queries_kernel for blocks of `rows` rows at head dim D
    (COMBINE["few_rows_warps"] for decode steps' blocks, at D <= 128)."""
    return COMBINE["few_rows_warps"] if rows < 16 and D <= 128 else COMBINE["warps"]


def _column_programs(programs: int, D: int, block_c: int, sms: int) -> int:
    """Column blocks per (batch·KV head, row block) of a launch of `programs` such pairs: doubled
    while the launch stays within one program per SM (a B=1 decode step of Llama-3-8B is 8 pairs
    on 132 SMs: each program's chain of dependent loads is the launch's time, so shorter chains
    on more SMs finish sooner), up to one block of block_c columns each."""
    n = 1
    while programs * n * 2 <= sms and n * 2 * block_c <= D:
        n *= 2
    return n


def _coded_per_sm(wanted: int, rows: int, D: int) -> int:
    """Split-KV programs per SM for a compressed tier at head dim D: programs_per_sm, unless
    that splits a row more than max_splits_per_row ways (then few_rows_programs_per_sm)."""
    per_sm = _per_dim("programs_per_sm", D)
    if wanted // 2 * per_sm > CODED["max_splits_per_row"] * rows:
        per_sm = min(per_sm, CODED["few_rows_programs_per_sm"])
    return per_sm


def _coded_launch(wanted: int, rows: int, D: int, polar_values: bool = True) -> tuple[int, int]:
    """(warps, programs per SM) of a compressed tier's launch of `rows` (batch·KV head, row
    block) pairs: CODED["many_rows"] at head dim D where the rows fill its programs per SM with
    at most max_splits_per_row splits each, else CODED["warps"] and _coded_per_sm. Not for
    scalar values, whose float32 decoder timed slower in 2-warp programs."""
    many = _per_dim("many_rows", D)
    if many and polar_values and wanted // 2 * many[1] <= CODED["max_splits_per_row"] * rows:
        return many
    return CODED["warps"], _coded_per_sm(wanted, rows, D)


def _coded_programs(wanted: int, rows: int, D: int, per_sm: int) -> int:
    """Programs to launch for `rows` rows at per_sm programs per SM (benchmarks/sweep_waves.py
    replaces this to force split counts)."""
    return max(1, wanted // 2 * per_sm)


@lru_cache(maxsize=1024)  # pure in its integers; an eager decode asks for the same launch every layer
def _balanced_splits(rows: int, sms: int, per_sm: int, most: int, slack: float = 0.01) -> int:
    """Splits per row, at most `most`, that leave no SM a partial load: the busiest SM runs
    ceil(rows * S / sms) programs of 1/S of a row each, so S minimises that share. Counts within
    `slack` of the least share count as equal (a long prefill's thousands of rows would otherwise
    double its splits, and the combine's work, for a share 1% smaller); among equals, the fewest
    splits that still give an SM per_sm programs (fewer and longer splits, no last wave of a few
    programs), else the most. Rounding the splits up to fill per_sm programs per SM launched
    Llama-3-8B B=8 (64 rows) as 64 x 9 = 576 programs for 528 slots (1.09 waves): at 8 splits the
    decode took 0.416 ms instead of 0.494 (H200, benchmarks/sweep_waves.py)."""
    counts = range(1, max(1, most) + 1)
    busiest = {S: -(-rows * S // sms) for S in counts}
    least = min(busiest[S] / S for S in counts)
    near = [S for S in counts if busiest[S] / S <= least * (1 + slack)]
    full = [S for S in near if busiest[S] >= per_sm]
    return min(full) if full else max(near)


def _splits(programs_per_split: int, capacity: int, block_t: int, wanted: int, min_tiles: int = 1) -> int:
    tiles = max(1, cdiv(capacity, block_t))
    return max(1, min(cdiv(tiles, min_tiles), cdiv(wanted, max(1, programs_per_split))))


def _coded_splits(rows: int, capacity: int, wanted: int, D: int, launch: tuple[int, int] | None = None) -> int:
    """Splits per row of a compressed tier at head dim D launched as `launch` (warps, programs per
    SM; default: _coded_launch's for polar values): as many as fill those programs per SM, then,
    with balance_waves, the count up to twice that (not past max_splits_per_row unless already
    there, nor past the tiles) that leaves no SM a partial last wave."""
    warps, per_sm = launch or _coded_launch(wanted, rows, D)
    tile, min_tiles = _coded_block_t(D, warps), CODED["min_tiles_per_split"]
    S = _splits(rows, capacity, tile, _coded_programs(wanted, rows, D, per_sm), min_tiles)
    if not CODED["balance_waves"]:
        return S
    tiles = max(1, cdiv(capacity, tile))
    most = min(max(S, min(2 * S, CODED["max_splits_per_row"])), cdiv(tiles, min_tiles))
    return _balanced_splits(rows, wanted // 2, per_sm, most)


def check_supported(q_dtype: torch.dtype, specs, head_dim: int, seed: int, kv_dtype: torch.dtype):
    if q_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise Unsupported(f"query dtype {q_dtype}")
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise Unsupported(f"head_dim={head_dim}: the kernels need a power of two in [16, 256] (option "
                          f"pad_head_dim='auto' or True stores smaller head dims zero-padded to one)")
    return [tier_info(s, head_dim, seed, kv_dtype) for s in specs]


def unsupported_reason(q_dtype: torch.dtype, specs, head_dim: int, seed: int, kv_dtype: torch.dtype) -> str | None:
    """Why these kernels cannot serve the tiers at this head dim and dtypes (None: they can);
    the ops then run their torch references."""
    try:
        check_supported(q_dtype, specs, head_dim, seed, kv_dtype)
    except Unsupported as err:
        return str(err)
    return None


def _tab(t, device):
    return DEVICE_TABLES.get(t, device)


# A launch gets 48 KB of shared memory, static and dynamic together, unless it opts in to more;
# Triton opts in only when its own (dynamic) allocation is over 48 KB, and then subtracts the
# static part. So staged tables (static) must fit beside Triton's allocation within 48 KB.
LAUNCH_SHARED_BYTES = 49152
SM90_RESERVED_SHARED_BYTES = 1024  # per block, counted as static on sm_90


def _coded_dynamic_shared(D: int, parts: int, block_m: int, warps: int | None = None) -> int:
    """Triton's shared memory for a coded kernel: the decoded slice of the tile (D / parts wide),
    the query tile and the probabilities, at the tiles' element size. Equal to the sm_90
    compiles at every shape checked (whole, halves, quarters; d=64, 128; 128- and 256-token
    tiles: benchmarks/results/sm90_compile_check_session12_*)."""
    size = 2 if _bf16_tiles() else 4
    block_t = _coded_block_t(D, warps)
    return (block_t * D // parts + block_m * D + block_m * block_t) * size


def _packed() -> bool:
    """Float16-pair tables and f16x2 trees (CODED["packed"]): inline PTX, so never under the
    interpreter."""
    return CODED["packed"] and not under_interpreter()


def _stage_tables(info, D: int, parts: int, block_m: int, warps: int | None = None) -> bool:
    """Do the coded kernels read this tier's tables from shared memory (CODED["shared_tables"])?
    Not under the interpreter, which runs no inline PTX; not where the tables and Triton's own
    allocation (with 2 KB to spare for a Triton version that allocates a little more) would pass
    the 48 KB a launch gets without opting in."""
    staged = staged_offsets(info.key, _packed())[1] + table_bytes(info.value, _packed())
    fits = (_coded_dynamic_shared(D, parts, block_m, warps) + staged + SM90_RESERVED_SHARED_BYTES + 2048
            <= LAUNCH_SHARED_BYTES)
    return (CODED["shared_tables"] and not under_interpreter() and staged <= CODED["shared_tables_max_bytes"]
            and D <= CODED["shared_tables_max_d"] and fits)


def _codec_constants(tables) -> tuple:
    """(levels, component counts, max components, component widths, table size) as constexprs."""
    if isinstance(tables, ScalarTables):
        return 0, tables.fields.counts, tables.fields.max_comps, tables.fields.widths, 1
    return tables.levels, tables.fields.counts, tables.fields.max_comps, tables.fields.widths, tables.table_size


def _uses_fragments(info, spec: TierSpec, D: int, device: torch.device, st: TierState) -> bool:
    """Does this compressed tier run the Gluon fragment kernel (fragment_launch.py)? On CUDA the
    answer, and why not, go to report()["decode_kernels"]."""
    if info.key is None:
        return False
    why = fragment_launch.unsupported_reason(info, D, device, st.page_size, st.pool.data_ptr(), st.pool.shape[-1])
    if device.type == "cuda":
        record_decode_kernel(spec.name, D, "triton" if why else "fragment", why)
    return why is None


def _exact_pool(info, st: TierState, kv_dtype) -> tuple[torch.Tensor, int, int]:
    """An exact tier's record pool as K/V elements of kv_dtype: (pool, elements per token record,
    the value's first element in a record)."""
    pool = st.pool.view(-1).view(kv_dtype)
    per_word = 4 // pool.element_size()
    return pool, st.pool.shape[-1] * per_word, info.key_words * per_word


def _launch_paged(info, kv_dtype, device, q_in, st: TierState, acc, m, l, split_offset, S, S_total, M, block_m,
                  block_t, precision, num_warps, num_stages, coded_warps: int | None = None, fragments: bool = False,
                  pdl: bool = False):
    """fragments: the tier runs the Gluon fragment kernel (attend's plan decided, _uses_fragments).
    pdl: the fragment and exact-tier kernels launch with programmatic dependent launch (the Triton
    coded kernels take no part: they launch as usual, after the kernel before them has finished)."""
    BH = st.count.numel()
    grid = (BH, S, cdiv(M, block_m))
    if fragments:
        fragment_launch.launch(info, q_in, st, acc, m, l, split_offset, S, S_total, M,
                               _tab(info.key.half_pairs, device), _tab(info.value.half_pairs, device), pdl)
        return
    if info.key is not None:  # compressed tier: the generated one-token-per-thread decoders
        WT = st.pool.shape[-1]
        D = q_in.shape[-1]
        quarters = CODED["quarters"] and D >= CODED["quarters_min_d"]
        halves = not quarters and CODED["halves"] and D >= CODED["halves_min_d"]
        parts = 4 if quarters else 2 if halves else 1
        staged = _stage_tables(info, D, parts, block_m, coded_warps)
        packed = staged and _packed()
        kt = _tab(table_tensor(info.key, packed), device)
        vt = _tab(table_tensor(info.value, packed), device)
        tile = tl.float16 if packed else tl.bfloat16 if _bf16_tiles() else tl.float32
        leaf = {tl.float16: "tl.float16", tl.bfloat16: "tl.bfloat16"}.get(tile)  # the decoders' leaf cast
        maxnreg = _per_dim("maxnreg", D) if D <= CODED["maxnreg_max_d"] else None
        launch = dict(PS=st.page_size, WT=WT, D=D, BLOCK_M=block_m, BLOCK_T=_coded_block_t(D, coded_warps),
                      STEP=info.key.radius_step, LOG2_MIN=LOG2_MIN, DOT_PRECISION=precision,
                      TILE_DTYPE=tile, num_warps=coded_warps or CODED["warps"], num_stages=CODED["stages"],
                      **({"maxnreg": maxnreg} if maxnreg else {}))
        args = (q_in, st.pool, st.pages, st.count, acc, m, l, kt, vt, M, st.pages.shape[-1], S, split_offset, S_total)
        ksm, vsm = staged_offsets(info.key, packed) if staged else (None, None)
        launch["STAGE_TABLES"] = stager(info.key, info.value, packed) if staged else tables_stay_in_global_memory

        def key_part(*part):
            return decoder(info.key, 0, WT, leaf, *part, smem=ksm, packed=packed)

        def value_part(*part):  # a scalar codec's decoder has no packed form (float32 centroids, cast)
            return decoder(info.value, info.key_words, WT, leaf, *part, smem=vsm,
                           packed=packed and not isinstance(info.value, ScalarTables))

        if quarters:
            paged_coded_quarters_kernel[grid](
                *args, **{f"DECODE_K{i}": key_part(i, 4) for i in range(4)},
                **{f"DECODE_V{i}": value_part(i, 4) for i in range(4)}, **launch)
        elif halves:
            paged_coded_halves_kernel[grid](*args, DECODE_K=key_part(0), DECODE_K2=key_part(1), DECODE_V=value_part(0),
                                            DECODE_V2=value_part(1), **launch)
        else:
            paged_coded_kernel[grid](*args, DECODE_K=key_part(), DECODE_V=value_part(), **launch)
        return
    # exact tier: plain K/V in the KV dtype (the codec pointers are unused)
    pool, record, value_offset = _exact_pool(info, st, kv_dtype)
    none = (0, 0, 1, 0, 1)
    paged_partials_kernel[grid](
        q_in, pool, st.pages, st.count, acc, m, l, pool, pool, pool, pool,
        M, st.pages.shape[-1], S, split_offset, S_total,
        PS=st.page_size, WT=record, VOFF=value_offset, D=q_in.shape[-1],
        BLOCK_M=block_m, BLOCK_T=block_t, EXACT=True, VALUE_SCALAR=False, K_LEVELS=none[0], K_COUNTS=none[1],
        K_MAXC=none[2], K_WIDTHS=none[3], K_TSIZE=none[4], V_LEVELS=none[0], V_COUNTS=none[1], V_MAXC=none[2],
        V_WIDTHS=none[3], V_TSIZE=none[4], STEP=1.0, LOG2_MIN=LOG2_MIN,
        DOT_PRECISION=precision, PDL=dependent_launch.mode(pdl, "exact"), num_warps=num_warps,
        num_stages=num_stages, **dependent_launch.launch_options(pdl))


def _launch_exact_and_chunk(info, kv_dtype, qc, st: TierState, kn, vn, valid_i8, acc, m, l, split_offset, S, S_chunk,
                            S_total, M, tc, q_pos0, Hkv, block_m, block_t, precision, num_warps, num_stages, pdl,
                            queries: "QueryLaunch", fused: bool):
    """An exact tier's S splits and the new chunk's S_chunk (exact_and_chunk_partials_kernel),
    and if `fused` the query preparation in the same launch (its programs after theirs; without
    it QUERIES=False compiles the query arguments out)."""
    pool, record, value_offset = _exact_pool(info, st, kv_dtype)
    N = kn.shape[2]
    qs = queries
    exact_and_chunk_partials_kernel[(st.count.numel(), S + S_chunk + (qs.programs if fused else 0),
                                     cdiv(M, block_m))](
        qc, pool, st.pages, st.count, kn, vn, valid_i8 if valid_i8 is not None else qc, acc, m, l,
        M, st.pages.shape[-1], S, N, tc, q_pos0, Hkv, S_chunk, split_offset, S_total,
        kn.stride(0), kn.stride(1), kn.stride(2), vn.stride(0), vn.stride(1), vn.stride(2),
        qs.q, qs.kfwd, qs.q_rot, qs.mass, qs.scale, qs.t0, qs.G, *qs.q.stride(),
        PS=st.page_size, WT=record, VOFF=value_offset, D=qc.shape[-1],
        BLOCK_M=block_m, BLOCK_T=block_t, HAS_VALID=valid_i8 is not None, DOT_PRECISION=precision,
        PDL=dependent_launch.mode(pdl, "exact"), QUERIES=fused, QBLOCK_M=qs.block_m, QBLOCK_C=qs.block_c,
        QCOLUMNS=qs.columns, HAS_ROT=qs.has_rot, ZERO_MASS=qs.zero_mass, num_warps=num_warps,
        num_stages=num_stages, **dependent_launch.launch_options(pdl))


@dataclass(frozen=True)
class QueryLaunch:
    """prepare_queries_kernel's arguments for one query chunk, launched on its own (launch) or
    inside exact_and_chunk_partials_kernel (PLAIN["queries_with_exact"])."""

    q: torch.Tensor  # [B, Hq, T, D], read by its strides
    kfwd: torch.Tensor  # the key codec's forward rotation (qc where there is no compressed tier)
    qc: torch.Tensor  # out: the scaled rows, float32 [B·Hkv, M, D]
    q_rot: torch.Tensor  # out: their rotation (qc where there is no compressed tier)
    mass: torch.Tensor  # attend's new_mass, zeroed where zero_mass
    scale: float
    t0: int  # the chunk's first query
    G: int
    block_m: int
    block_c: int
    columns: int
    programs: int  # column programs per (batch·KV head, row block)
    has_rot: bool
    zero_mass: bool

    def launch(self, M: int, tc: int, Hkv: int, N: int, pdl: bool) -> None:
        BH = self.qc.shape[0]
        prepare_queries_kernel[(BH, cdiv(M, self.block_m), self.programs)](
            self.q, self.kfwd, self.qc, self.q_rot, self.mass, self.scale, M, tc, self.t0, self.G, Hkv, N,
            *self.q.stride(), D=self.qc.shape[-1], BLOCK_M=self.block_m, BLOCK_C=self.block_c,
            COLUMNS=self.columns, HAS_ROT=self.has_rot, ZERO_MASS=self.zero_mass,
            PDL=dependent_launch.mode(pdl, "queries"), num_warps=_small_kernel_warps(self.block_m, self.qc.shape[-1]),
            **dependent_launch.launch_options(pdl))


def attend(q: torch.Tensor, states: list[TierState], specs: list[TierSpec], *, seed: int, kv_dtype: torch.dtype,
           k_new=None, v_new=None, valid_new=None, scale: float | None = None, obs_window: int = 0,
           accumulate: bool = False, block_t: int = DEFAULT_BLOCK_T, precision: str = "tf32",
           num_warps: int = DEFAULT_WARPS, num_stages: int = DEFAULT_STAGES, sinks: torch.Tensor | None = None):
    """See sphkv_compile.store.attend (same arguments, same results)."""
    B, Hq, Tq, d = q.shape
    Hkv = states[0].count.shape[1] if states else k_new.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads cannot be grouped over {Hkv} KV heads")
    infos = check_supported(q.dtype, specs, d, seed, kv_dtype)
    G = Hq // Hkv
    BH = B * Hkv
    device = q.device
    scale = d ** -0.5 if scale is None else scale
    N = 0 if k_new is None else k_new.shape[2]
    if N and N < Tq:
        raise ValueError(f"the chunk has {N} tokens but there are {Tq} queries; queries must be the chunk's tail")
    if not N and not states:
        raise ValueError("nothing to attend to: the store is empty and no chunk was given")
    compressed = [(i, info) for i, info in enumerate(infos) if info.key is not None]
    plain = [(i, info) for i, info in enumerate(infos) if info.key is None]
    kc0 = vc0 = None
    if compressed:
        kc0, vc0 = tier_codecs(specs[compressed[0][0]], d, seed)
    q_scale = scale * LOG2E
    out = torch.empty_like(q)
    stat_m = torch.empty(BH, G, Tq, dtype=torch.float32, device=device)
    stat_l = torch.empty_like(stat_m)
    wanted = _programs_wanted(device)
    pdl = dependent_launch.enabled(device)
    launch_pdl = dependent_launch.launch_options(pdl)
    valid_i8 = None if valid_new is None or not N else valid_new.to(torch.int8).contiguous()
    hinv = _tab(rotation_matrices(vc0.hadamard)[1], device) if compressed else None
    if sinks is not None:  # natural-unit sink logits in the combine's log2 units
        if sinks.shape != (Hq,):
            raise ValueError(f"sinks must hold one logit per query head, shape ({Hq},); got {tuple(sinks.shape)}")
        sinks2 = (sinks.to(device=device, dtype=torch.float32) * LOG2E).contiguous()
    kfwd = _tab(rotation_matrices(kc0.hadamard)[0], device) if compressed else None
    window = min(obs_window, Tq)
    # the chunk's utility: computed after the attention where asked for (window), else zeros,
    # which the first query kernel writes (no launch of its own)
    new_mass = torch.empty(B, Hkv, N, dtype=torch.float32, device=device)
    # query chunks so the split partials stay bounded
    per_row = max(1, len(states) + 1) * 4 * d * 4 * BH
    tq_chunk = max(1, min(Tq, PARTIAL_BYTES // (per_row * G)))
    for s0 in range(0, Tq, tq_chunk):
        s1 = min(Tq, s0 + tq_chunk)
        tc = s1 - s0
        M = G * tc
        block_m = _block_m(M)
        mblocks = cdiv(M, block_m)
        qc = torch.empty(BH, M, d, dtype=torch.float32, device=device)
        q_rot = torch.empty_like(qc) if compressed else None
        qbm = min(block_m, next_power_of_2(M))
        assert cdiv(M, qbm) == mblocks  # so a fused launch's row blocks serve both (queries_with_exact)
        qcols = _block_columns(qbm, d)
        qprog = _column_programs(BH * cdiv(M, qbm), d, qcols, wanted // 2)
        queries = QueryLaunch(q, kfwd if compressed else qc, qc, q_rot if compressed else qc, new_mass, q_scale, s0,
                              G, qbm, qcols, d // qprog, qprog, bool(compressed),
                              bool(N) and not window and s0 == 0)
        launches, S_total = [], 0
        for group in (compressed, plain):
            for i, info in group:
                st = states[i]
                capacity = st.pages.shape[-1] * st.page_size
                fragments = _uses_fragments(info, specs[i], d, device, st)  # decided once per tier and call
                if info.key is None:
                    S, warps = _splits(BH * mblocks, capacity, block_t, wanted), None
                elif fragments:
                    per_sm = fragment_launch.programs_per_sm(info, q_rot, st, M)
                    S, warps = fragment_launch.splits(BH * mblocks, capacity, wanted, _balanced_splits, per_sm), None
                else:
                    launch = _coded_launch(wanted, BH * mblocks, d, not isinstance(info.value, ScalarTables))
                    S, warps = _coded_splits(BH * mblocks, capacity, wanted, d, launch), launch[0]
                launches.append((i, info, S_total, S, warps, fragments))
                S_total += S
        S_rot = sum(S for i, info, _, S, _, _ in launches if info.key is not None)
        S_chunk = _splits(BH * mblocks, N, block_t, wanted) if N else 0
        S_total += S_chunk
        acc = torch.empty(BH, S_total, M, d, dtype=torch.float32, device=device)
        m = torch.empty(BH, S_total, M, dtype=torch.float32, device=device)
        l = torch.empty_like(m)
        if N:
            kn, vn = k_new, v_new
            if kn.stride(-1) != 1:
                kn = kn.contiguous()
            if vn.stride(-1) != 1:
                vn = vn.contiguous()
        # the last tier an exact one (its splits just before the chunk's): the two in one launch
        with_chunk = bool(N and launches) and PLAIN["exact_with_chunk"] and launches[-1][1].key is None
        # ... which may prepare the queries too, launched first: the compressed tiers read q_rot
        fused = with_chunk and PLAIN["queries_with_exact"]
        if not fused:
            queries.launch(M, tc, Hkv, N, pdl)
        order = [launches[-1]] + launches[:-1] if fused else launches
        for i, info, off, S, coded_warps, fragments in order:
            if with_chunk and i == launches[-1][0]:
                _launch_exact_and_chunk(info, kv_dtype, qc, states[i], kn, vn, valid_i8, acc, m, l, off, S, S_chunk,
                                        S_total, M, tc, N - Tq + s0, Hkv, block_m, block_t, precision, num_warps,
                                        num_stages, pdl, queries, fused)
                continue
            qin = q_rot if info.key is not None else qc
            _launch_paged(info, kv_dtype, device, qin, states[i], acc, m, l, off, S, S_total, M, block_m, block_t,
                          precision, num_warps, num_stages, coded_warps, fragments, pdl)
        if N and not with_chunk:
            chunk_partials_kernel[(BH, S_chunk, mblocks)](
                qc, kn, vn, valid_i8 if valid_i8 is not None else qc, acc, m, l,
                M, N, tc, N - Tq + s0, Hkv, S_chunk, S_total - S_chunk, S_total,
                kn.stride(0), kn.stride(1), kn.stride(2), vn.stride(0), vn.stride(1), vn.stride(2),
                D=d, BLOCK_M=block_m, BLOCK_T=block_t, HAS_VALID=valid_i8 is not None,
                DOT_PRECISION=precision, PDL=dependent_launch.mode(pdl, "chunk"), **launch_pdl)
        whole = tc == Tq  # one chunk: its [BH, M] row statistics are stat_m / stat_l themselves
        cm = stat_m if whole else torch.empty(BH, M, dtype=torch.float32, device=device)
        cl = stat_l if whole else torch.empty_like(cm)
        oc = out[:, :, s0:s1]
        cbm, csplits = _combine_block(M, block_m)
        ccols = _block_columns(cbm, d)
        cprog = _column_programs(BH * cdiv(M, cbm), d, ccols, wanted // 2)
        combine_kernel[(BH, cdiv(M, cbm), cprog)](
            acc, m, l, hinv if compressed else acc, oc, cm, cl, sinks2 if sinks is not None else cm, M, tc, G, Hkv,
            S_total, S_rot, oc.stride(0), oc.stride(1), oc.stride(2), D=d, BLOCK_M=cbm, HAS_ROT=S_rot > 0,
            BLOCK_S=csplits, BLOCK_C=ccols, COLUMNS=d // cprog, num_warps=_small_kernel_warps(cbm, d),
            HAS_SINKS=sinks is not None, PDL=dependent_launch.mode(pdl, "combine"), **launch_pdl)
        if not whole:
            stat_m[:, :, s0:s1] = cm.view(BH, G, tc)
            stat_l[:, :, s0:s1] = cl.view(BH, G, tc)
    # one query chunk (every decode step): prepare_queries_kernel's qc and q_rot already hold
    # every row, row g·Tq + t of each batch·KV head, as the utility signal reads them
    one_chunk = tq_chunk >= Tq
    if window:  # the utility signal (RDR's observation window), torch and the mass kernel
        q_all = (qc if one_chunk else q.to(torch.float32) * q_scale).reshape(B, Hkv, G * Tq, d)
    if window and N:
        new_mass = _chunk_mass(q_all, k_new, valid_new, stat_m, stat_l, window, N, Tq).view(B, Hkv, N)
    if accumulate and window:
        q_flat = q_all.reshape(BH, G * Tq, d).contiguous()
        q_rot_flat = None
        if compressed:
            q_rot_flat = q_rot if one_chunk else (q_flat @ kfwd).contiguous()
        for i, info in enumerate(infos):
            _launch_mass(info, kv_dtype, q_rot_flat if info.key is not None else q_flat, states[i], stat_m, stat_l, G * Tq,
                         Tq, window, block_t, precision, device)
    return out, new_mass


def _chunk_mass(q_all, k_new, valid_new, stat_m, stat_l, window, N, Tq):
    """Mass of the last `window` queries on each chunk token, summed over the group (torch; the
    chunk is small and this runs at prefill or every few decode steps)."""
    B, Hkv, _, d = q_all.shape
    G = stat_m.shape[1]
    qo = q_all.view(B, Hkv, G, Tq, d)[:, :, :, Tq - window:]
    s = qo @ k_new.to(torch.float32)[:, :, None].transpose(-1, -2)  # [B, Hkv, G, W, N]
    qpos = N - Tq + torch.arange(Tq - window, Tq, device=q_all.device)
    vis = torch.arange(N, device=q_all.device)[None, :] <= qpos[:, None]
    if valid_new is not None:
        vis = vis[None] & valid_new.to(torch.bool)[:, None, :]
        vis = vis[:, None, None]
    mm = stat_m.view(B, Hkv, G, Tq)[..., Tq - window:, None]
    ll = stat_l.view(B, Hkv, G, Tq)[..., Tq - window:, None]
    ok = ll > 0
    p = torch.exp2(s - torch.where(ok, mm, torch.zeros_like(mm))) / torch.where(ok, ll, torch.ones_like(ll))
    p = torch.where(vis & ok, p, torch.zeros_like(p))
    return p.sum((2, 3))


def _launch_mass(info, kv_dtype, q_in, st: TierState, stat_m, stat_l, M, Tq, window, block_t, precision, device):
    BH = st.count.numel()
    exact = info.key is None
    if exact:
        pool, wt, _ = _exact_pool(info, st, kv_dtype)
        kc = kt = pool
        kcon = (0, 0, 1, 0, 1)
        step = 1.0
    else:
        pool = st.pool
        wt = st.pool.shape[-1]
        kc, kt = _tab(info.key.fields.comps, device), _tab(info.key.trig, device)
        kcon = _codec_constants(info.key)
        step = info.key.radius_step
    tiles = cdiv(st.pages.shape[-1] * st.page_size, block_t)
    G = M // Tq
    paged_mass_kernel[(BH, tiles)](
        q_in, pool, st.pages, st.count, st.utility, stat_m, stat_l, kc, kt, M, Tq, window, st.pages.shape[-1],
        PS=st.page_size, WT=wt, D=q_in.shape[-1], BLOCK_R=_block_m(G * window), BLOCK_T=block_t, EXACT=exact,
        K_LEVELS=kcon[0], K_COUNTS=kcon[1], K_MAXC=kcon[2], K_WIDTHS=kcon[3], K_TSIZE=kcon[4], STEP=step,
        LOG2_MIN=LOG2_MIN,
        DOT_PRECISION=precision)
