"""Quality harness: python -m sphkv_compile.eval --help"""
