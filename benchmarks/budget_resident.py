"""What report() measures against the budget asked for: policy 'rdr' at budget=0.125 on a
2-layer random Llama (2 KV heads, head dim 64), CPU, after a prefill of T tokens in chunks of
2,048, on a static cache sized for it and on a dynamic one. The whole store counts (pools,
page slack, metadata, the exact sink/recent/headroom tokens), against a dense 16-bit cache.

    python benchmarks/budget_resident.py [--tokens 2048 8192 32768] [--budget 0.125]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sphkv_compile  # noqa: E402
from sphkv_compile import api  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--budget", type=float, default=0.125)
    args = ap.parse_args()
    print("| tokens | cache | KV bytes / dense (report) | prefill s |\n|---:|---|---:|---:|")
    for T in args.tokens:
        torch.manual_seed(0)
        config = tf.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(T, 256))
        model = api.optimize(tf.LlamaForCausalLM(config).eval(), policy="rdr", budget=args.budget)
        key = api.cache_keyword(model)
        ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(0))
        for kind in ("static", "dynamic"):
            cache = api.new_cache(model, max_cache_len=T + 8) if kind == "static" else api.new_cache(model)
            start = time.time()
            with torch.no_grad():
                for s in range(0, T, 2048):
                    model(input_ids=ids[:, s:s + 2048], use_cache=True, **{key: cache})
            r = sphkv_compile.report()
            print(f"| {T} | {kind} | {r['kv_bytes'] / r['dense_kv_bytes']:.4f} | {time.time() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
