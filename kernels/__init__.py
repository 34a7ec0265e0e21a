"""Triton kernels (installed as sphkv_compile.kernels).

This folder sits at the top of the repository, so wherever the repository root is on sys.path
(`python -m ...` run from it, or a script that adds it) a plain `import kernels` finds it
before Hugging Face's `kernels` distribution, which transformers imports at startup (a
dependency from transformers 5.25 on). Imported under that bare name, this module therefore
hands the name to the installed distribution, and is an empty module when there is none (the
Triton code is only ever reached as sphkv_compile.kernels).
"""
import sys

if __name__ == "kernels":
    from ._bare_name import defer_to_installed_distribution

    try:
        defer_to_installed_distribution(__file__)
    finally:
        sys.modules.pop("kernels._bare_name", None)  # this folder's helper, not the distribution's
