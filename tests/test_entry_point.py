"""`torch.compile(fn, backend="sphkv")` resolves through the entry point, with no import."""
import subprocess
import sys
import textwrap


def test_backend_resolves_in_a_fresh_interpreter():
    code = textwrap.dedent("""
        import sys, torch
        assert "sphkv_compile" not in sys.modules
        fn = torch.compile(lambda x: torch.sin(x) + 1, backend="sphkv")
        out = fn(torch.randn(8))
        assert "sphkv_compile" in sys.modules  # loaded by torch through the entry point
        print("ok", out.shape)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ok torch.Size([8])" in res.stdout


def test_no_top_level_kernels_or_inductor_passes_module_is_installed():
    from importlib import metadata

    files = metadata.distribution("sphkv").files or []
    tops = {f.parts[0] for f in files if f.suffix == ".py" or f.name.endswith(".pth")}
    assert "kernels" not in tops and "inductor_passes" not in tops
    import sphkv_compile.inductor_passes
    import sphkv_compile.kernels  # noqa: F401
