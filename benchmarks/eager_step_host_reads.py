"""Host reads (item, tolist, bool, int, float, index on a tensor: each a sync on a GPU) of one
eager decode step on a dynamic sphkv cache: a tiny random Llama (2 layers) after a 40-token
prefill. Counted at the Python level, so reads inside the sphkv custom ops count too (a
TorchDispatchMode does not see them), with the sphkv function each comes from.

    python benchmarks/eager_step_host_reads.py [--policy rdr] [--device cuda]   # from the repo root

On the CPU every read counts, also those of tensors a GPU run keeps on the host (a dynamic
layer's token counter) and those of the reference attention, which the Triton kernels replace;
with --device cuda only reads of CUDA tensors count.
"""
import argparse
import collections
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
import transformers as tf  # noqa: E402

from sphkv_compile import api  # noqa: E402
from tests import test_zoo as zoo  # noqa: E402

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="uniform", choices=("uniform", "rdr"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model = zoo.build(lambda: zoo._llama_like(tf.LlamaConfig), 0).to(args.device)
    rdr = dict(policy="rdr", budget=0.5, rebudget_every=8) if args.policy == "rdr" else {}
    api.optimize(model, sink=2, recent=4, **rdr)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0)).to(args.device)
    key = api.cache_keyword(model)
    cache = api.new_cache(model)
    sites = collections.Counter()
    saved = {n: getattr(torch.Tensor, n) for n in READS}

    def counting(name):
        real = saved[name]

        def read(t, *a):
            if args.device == "cpu" or t.is_cuda:
                frames = [f for f in traceback.extract_stack()[:-1] if "sphkv_compile" in f.filename]
                where = f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "outside sphkv"
                sites[f"{name} in {where}"] += 1
            return real(t, *a)
        return read

    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{key: cache})
        try:
            for n in READS:
                setattr(torch.Tensor, n, counting(n))
            model(input_ids=ids[:, :1], use_cache=True, **{key: cache})
        finally:
            for n, f in saved.items():
                setattr(torch.Tensor, n, f)
    print(f"host reads per eager decode step (2 layers, policy {args.policy}, {args.device}):", sum(sites.values()))
    for site, n in sites.most_common():
        print(f"  {n:3d}  {site}")


if __name__ == "__main__":
    main()
