"""Triton kernels (installed as sphkv_compile.kernels)."""
