"""Host time of one RDR decode re-budget of one layer (rdr.update.rebudget), on the CPU: the
SmolLM2-shaped random model of rdr_gpu_check.py, a 2,048-token prompt, budget 1/8, a re-budget
every 32 tokens; the first decode re-budget of layer 0 is captured and replayed `--repeat`
times on copies of its state (median printed), and the torch ops it runs are counted by kind.

    python benchmarks/rebudget_layer_time.py [--repeat 5] [--by-function 25]

Session 9 compared commits with it (PYTHONPATH pointing at a checkout of the older commit).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sphkv_compile.api as sphkv  # noqa: E402
from rdr_gpu_check import model_on  # noqa: E402

# ops that only describe a tensor (no kernel on a GPU), left out of the count
VIEWS = {"view", "_unsafe_view", "as_strided", "reshape", "select", "slice", "expand", "unsqueeze", "squeeze", "t",
         "transpose", "permute", "detach", "alias", "split", "split_with_sizes", "unbind", "lift_fresh", "empty",
         "empty_strided"}


class CountOps(TorchDispatchMode):
    """Torch ops by kind, and host reads: item()/int()/bool() (one `_local_scalar_dense` each)
    plus tolist() calls, which reach no dispatch mode but are one read back each (a sync on a GPU)."""

    def __init__(self, by_function: bool = False):
        super().__init__()
        self.ops = Counter()
        self.tolist_calls = 0
        self.by_function = Counter() if by_function else None

    def __enter__(self):
        inner, counter = torch.Tensor.tolist, self

        def tolist(t):
            counter.tolist_calls += 1
            return inner(t)

        self._inner_tolist, torch.Tensor.tolist = inner, tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._inner_tolist
        return super().__exit__(*exc)

    @property
    def host_reads(self) -> int:
        return self.ops["_local_scalar_dense"] + self.tolist_calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in VIEWS:
            self.ops[name] += 1
            if self.by_function is not None:
                self.by_function[_innermost_sphkv_frame() + ("  (host read)" if name == "_local_scalar_dense" else "")] += 1
        return func(*args, **(kwargs or {}))


def _innermost_sphkv_frame() -> str:
    """module:function of the innermost sphkv_compile frame on the stack (where an op comes from)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "sphkv_compile" in path or "/kernels/" in path or "/inductor_passes/" in path:
            return f"{Path(path).stem}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "outside sphkv"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--by-function", type=int, default=0, metavar="N",
                    help="also print the N sphkv functions that run the most ops (host reads apart)")
    args = ap.parse_args(argv)
    update = importlib.import_module("sphkv_compile.rdr.update")
    node = importlib.import_module("sphkv_compile.rdr.node")
    model = sphkv.optimize(model_on(torch.device("cpu")), policy="rdr", budget=0.125, rebudget_every=32)
    ids = torch.randint(3, 49152, (1, 2048), generator=torch.Generator().manual_seed(0))
    cache = sphkv.new_cache(model, max_cache_len=2048 + 40)
    inner, captured = update.rebudget, []

    def capture(*a, **kw):
        if not captured and len(a) < 4:  # between decode steps: (states, specs, budget) and keywords
            captured.append(copy.deepcopy((a, kw)))
        return inner(*a, **kw)

    node.rebudget = capture
    with torch.no_grad():
        model.generate(ids, max_new_tokens=36, min_new_tokens=36, do_sample=False,
                       **{sphkv.cache_keyword(model): cache})
    node.rebudget = inner
    a, kw = captured[0]
    times = []
    for _ in range(args.repeat):
        a2, kw2 = copy.deepcopy((a, kw))
        t = time.perf_counter()
        inner(*a2, **kw2)
        times.append(1000 * (time.perf_counter() - t))
    counter = CountOps(by_function=bool(args.by_function))
    a2, kw2 = copy.deepcopy((a, kw))
    with counter:
        inner(*a2, **kw2)
    print(f"decode re-budget of one layer ({a[0][0].count.shape[1]} KV heads): median {statistics.median(times):.1f} ms "
          f"of {args.repeat}; {sum(counter.ops.values())} torch ops (views left out), "
          f"{counter.host_reads} host reads ({counter.ops['_local_scalar_dense']} scalar reads, "
          f"{counter.tolist_calls} tolist() calls)")
    print("most frequent:", counter.ops.most_common(8))
    if args.by_function:
        print("by sphkv function (innermost frame):")
        for where, n in counter.by_function.most_common(args.by_function):
            print(f"  {n:5d}  {where}")


if __name__ == "__main__":
    main()
