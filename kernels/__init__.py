"""Triton kernels (installed as sphkv_compile.kernels).

This folder sits at the top of the repository, so wherever the repository root is on sys.path
(`python -m ...` run from it, or a script that adds it) a plain `import kernels` finds it
before Hugging Face's `kernels` distribution, which transformers imports at startup (a
dependency from transformers 5.25 on). Imported under that bare name, this module therefore
hands the name to the installed distribution, and is an empty module when there is none (as
transformers' availability probe expects: it imports the name and finds no version). The
Triton code is only ever reached as sphkv_compile.kernels.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _root])
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        # the import statement returns whatever sys.modules holds once this module has run
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
