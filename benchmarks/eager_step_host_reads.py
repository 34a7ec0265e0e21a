"""Host reads (item, tolist, bool, int, float, index on a tensor: each a sync on a GPU) of one
eager decode step on a dynamic sphkv cache: a tiny random Llama (2 layers) on the CPU, after a
40-token prefill. Counted at the Python level, so reads inside the sphkv custom ops count too
(a TorchDispatchMode does not see them).

    python benchmarks/eager_step_host_reads.py      # from the repo root
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch, transformers as tf
from tests import test_zoo as zoo
from sphkv_compile import api
model = zoo.build(lambda: zoo._llama_like(tf.LlamaConfig), 0)
api.optimize(model, sink=2, recent=4)
ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
key = api.cache_keyword(model)
cache = api.new_cache(model)
count = [0]
names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
saved = {n: getattr(torch.Tensor, n) for n in names}
def wrap(n):
    f = saved[n]
    def g(t, *a):
        count[0] += 1
        return f(t, *a)
    return g
with torch.no_grad():
    model(input_ids=ids, use_cache=True, **{key: cache})
    for n in names: setattr(torch.Tensor, n, wrap(n))
    model(input_ids=ids[:, :1], use_cache=True, **{key: cache})
    for n, f in saved.items(): setattr(torch.Tensor, n, f)
print("host reads per eager decode step (2 layers):", count[0])
