"""`torch.compile(fn, backend="sphkv")` resolves through the entry point, with no import, and
the architecture folders are installed only under the sphkv_compile namespace."""
import subprocess
import sys
import tempfile
import textwrap


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    """`python -c code` in cwd (which `-c` puts first on sys.path)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _fresh(code: str) -> subprocess.CompletedProcess:
    # run outside the repo so its folders are not on sys.path
    with tempfile.TemporaryDirectory() as cwd:
        return _run(code, cwd)


def test_backend_resolves_in_a_fresh_interpreter():
    res = _fresh("""
        import sys, torch
        assert "sphkv_compile" not in sys.modules
        fn = torch.compile(lambda x: torch.sin(x) + 1, backend="sphkv")
        out = fn(torch.randn(8))
        assert "sphkv_compile" in sys.modules  # loaded by torch through the entry point
        print("ok", out.shape)
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ok torch.Size([8])" in res.stdout


def test_no_top_level_kernels_or_inductor_passes_module_is_installed():
    res = _fresh("""
        import importlib.util, pathlib
        import sphkv_compile.kernels, sphkv_compile.inductor_passes
        repo = pathlib.Path(sphkv_compile.kernels.__file__).resolve().parents[1]
        for name in ("kernels", "inductor_passes"):
            spec = importlib.util.find_spec(name)
            # Hugging Face's `kernels` may be installed; ours must never answer to that name
            # (the venv may live inside the repo: compare with the source folder itself)
            assert spec is None or pathlib.Path(spec.origin or "").resolve().parent != repo / name, spec
        print("ok")
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ok" in res.stdout


def test_bare_kernels_import_from_the_repo_root_is_not_sphkv():
    """With the repository root first on sys.path (`python -m` or `python -c` run from it), `import
    kernels` reaches this repo's kernels/ folder first. It must then give Hugging Face's installed
    distribution (transformers imports it at startup from 5.25 on), or, with none installed, an
    empty module (transformers' availability probe imports the name), never the Triton kernels."""
    import pathlib

    repo = pathlib.Path(__file__).resolve().parents[1]
    res = _run("""
        import importlib.metadata, pathlib, sys
        repo = pathlib.Path.cwd().resolve()
        try:
            importlib.metadata.version("kernels")
            installed = True
        except importlib.metadata.PackageNotFoundError:
            installed = False
        import kernels
        ours = pathlib.Path(kernels.__file__).resolve().parent == repo / "kernels"
        assert ours != installed, (installed, kernels.__file__)
        assert not any(m.startswith("kernels.") for m in sys.modules) or installed  # no Triton code loaded
        import transformers.integrations.hub_kernels  # failed at startup with transformers 5.25
        print("distribution" if installed else "empty")
    """, repo)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] in ("distribution", "empty")
