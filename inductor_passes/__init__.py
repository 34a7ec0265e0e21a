"""Graph detection, rewrite and lowering passes (installed as sphkv_compile.inductor_passes)."""
