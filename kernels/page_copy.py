"""Page copies across many pools in a few launches (beam search's reorder of every layer).

copy_pages(pools, dst, src, owner, per_owner) sets pools[owner[j]][dst[j]] = pools[owner[j]][src[j]]
for every j, each source read before any page is written (a row's pages may be both: beams
swap). The pools are separate tensors (one per layer and tier), so the kernels reach them
through a table of their addresses: one gather launch into a staging buffer, one scatter launch
back, instead of an index and an index_put per pool from Python.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Registered for CUDA by cuda_ops when on; held against the torch copies on an H200 in session 13
# (tests/test_kernels_gpu.py::test_page_copier_matches_the_torch_copies_on_gpu).
ON_CUDA = True
BLOCK = 1024  # words (int32) or halves (int16) moved per program step
STAGING_BYTES = 256 << 20  # the staging buffer's size per launch pair (whole pools at least)


@triton.jit
def _move_pages_kernel(bases_ptr, units_ptr, owner_ptr, page_ptr, staging_ptr, staging_units,
                       TO_STAGING: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """Copy j (program j): page page_ptr[j] of pool owner_ptr[j] to staging row j
    (TO_STAGING), or staging row j back to that page. units: 32-bit words, or 16-bit halves
    (HALF), per page of each pool."""
    j = tl.program_id(0)
    owner = tl.load(owner_ptr + j)
    elem = tl.int16 if HALF else tl.int32
    base = tl.load(bases_ptr + owner).to(tl.pointer_type(elem))
    n = tl.load(units_ptr + owner)
    page = base + tl.load(page_ptr + j).to(tl.int64) * n
    row = staging_ptr + j.to(tl.int64) * staging_units
    for off in range(0, n, BLOCK):
        i = off + tl.arange(0, BLOCK)
        inside = i < n
        if TO_STAGING:
            tl.store(row + i, tl.load(page + i, mask=inside), mask=inside)
        else:
            tl.store(page + i, tl.load(row + i, mask=inside), mask=inside)


def _units(pool: torch.Tensor, half: bool) -> int:
    return pool[0].numel() * pool.element_size() // (2 if half else 4)


def copy_pages(pools: list[torch.Tensor], dst: torch.Tensor, src: torch.Tensor, owner: torch.Tensor,
               per_owner: list[int]) -> None:
    """pools[owner[j]][dst[j]] = pools[owner[j]][src[j]] for every j, all reads of a pool before
    its writes. pools: contiguous [pages, ...] tensors on one device, of 4-byte elements or all of
    2-byte ones; owner sorted, per_owner[i] = how many j have owner i (the caller has it on the
    host). Copies go in launch pairs over whole owners, each pair's staging at most
    STAGING_BYTES unless one owner needs more."""
    if not pools or not dst.numel():
        return
    half = pools[0].element_size() == 2
    for p in pools:
        if (not p.is_contiguous() or p.element_size() != pools[0].element_size() or p.device != pools[0].device
                or p.element_size() not in (2, 4, 8)):
            raise ValueError("copy_pages needs contiguous pools of one element size (2, 4 or 8 bytes) on one device")
    device = pools[0].device
    units = [_units(p, half) for p in pools]
    bases = torch.tensor([p.data_ptr() for p in pools], dtype=torch.int64, device=device)
    units_t = torch.tensor(units, dtype=torch.int64, device=device)
    width = max(units[i] for i, n in enumerate(per_owner) if n)
    unit_bytes = 2 if half else 4
    ranges, start, end = [], 0, 0  # copies [start, end) of whole owners per launch pair
    for n in per_owner:
        if end > start and (end + n - start) * width * unit_bytes > STAGING_BYTES:
            ranges.append((start, end))
            start = end
        end += n
    ranges.append((start, end))
    for start, end in ranges:
        if end == start:
            continue
        staging = torch.empty(end - start, width, dtype=torch.int16 if half else torch.int32, device=device)
        owners = owner[start:end].contiguous()
        for to_staging, pages in ((True, src[start:end]), (False, dst[start:end])):  # gather all, then scatter
            _move_pages_kernel[(end - start,)](bases, units_t, owners, pages.contiguous(), staging, width,
                                               TO_STAGING=to_staging, HALF=half, BLOCK=BLOCK)
