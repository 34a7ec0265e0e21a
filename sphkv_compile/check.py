"""How much sphkv moves your model's predictions, at the settings you would serve it with.

    python -m sphkv_compile.check [--model PATH_OR_HUB_ID] [--setting bits=3.5]
                                  [--setting policy=rdr,budget=0.125] [--tokens 2048] [--prefix 1024]
                                  [--chunk 128] [--text FILE] [--json rows.json] [--plot out.png]

Teacher-forced next-token loss over a text, through the model's own forward: the first
`prefix` tokens are prefilled into the cache (so they are stored, compressed), then the rest is
fed `chunk` tokens at a time, each chunk attending over everything stored before it. The same
chunks run on transformers' dense cache and on a static sphkv cache per setting (optimize() with
those options, pools sized for the text), and over the tokens after the prefix each reports
perplexity, its change against dense, top-1 agreement with dense's predictions, and the
measured KV bytes against a dense 16-bit cache (report()). Without --model it runs the
embedded SmolLM2 on offline English text (the stdlib's pydoc topics); with --model, any causal
LM transformers loads (a local directory or a hub id) and its tokenizer.

This measures the cache, not a benchmark score: a prefill split into chunks is what a long
prompt does on a chunked-prefill server, and every later token's loss depends on the stored
past. The quality tables in docs/QUALITY.md compare methods at equal bytes on SmolLM2's tasks.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import warnings
from dataclasses import asdict, dataclass

import torch

from .options import SphkvCoverageWarning
from .tiers import TierSpec


@dataclass
class Scored:
    """Teacher-forced predictions of the tokens after the prefix."""

    nll: float  # summed negative log-likelihood (nats)
    count: int  # tokens scored
    top1: torch.Tensor  # [count] the argmax prediction of each scored token

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.count)


@dataclass
class CheckRow:
    setting: str
    perplexity: float
    delta: float  # perplexity - dense's
    agreement: float  # share of scored tokens whose top-1 prediction equals dense's
    kv_fraction: float  # resident KV bytes / a dense 16-bit cache's, measured (1.0 for dense)


def score(model, ids: torch.Tensor, prefix: int, chunk: int, cache, cache_keyword: str, progress=None) -> Scored:
    """ids [1, T]: prefill ids[:, :prefix] into `cache`, then feed the rest `chunk` tokens at a
    time; the predictions of ids[:, prefix:] are scored."""
    T = ids.shape[-1]
    if not 0 < prefix < T:
        raise ValueError(f"prefix must be between 1 and the text's {T - 1} tokens, got {prefix}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    nll, top1 = 0.0, []
    starts = [0] + list(range(prefix, T, chunk))
    last_only = _takes_keyword(model, "logits_to_keep")
    with torch.no_grad():
        for i, start in enumerate(starts):
            end = prefix if i == 0 else min(start + chunk, T)
            extra = {"logits_to_keep": 1} if i == 0 and last_only else {}  # the prefill scores one position
            logits = model(input_ids=ids[:, start:end], use_cache=True, **{cache_keyword: cache}, **extra).logits[0]
            first = prefix - 1 if i == 0 else start  # the position whose prediction is the first one scored
            targets = ids[0, first + 1:end + 1]  # the next tokens, as far as the text goes
            at = first - (end - logits.shape[0])  # logits cover the last logits.shape[0] positions of the chunk
            preds = logits[at:at + targets.shape[0]].float()
            nll += float(torch.nn.functional.cross_entropy(preds, targets, reduction="sum"))
            top1.append(preds.argmax(-1).cpu())
            if progress is not None:
                progress.update(end - start)
    top1 = torch.cat(top1)
    return Scored(nll, top1.shape[0], top1)


def _takes_keyword(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def parse_setting(text: str) -> dict:
    """'policy=rdr,budget=0.125' -> {'policy': 'rdr', 'budget': 0.125} (numbers, True, False and
    None where they parse). A tier ladder is tier specs joined by '+'
    ('policy=rdr,tiers=exact:exact+mid:k3.5:polar3.5:r16'), kv_dtype a torch dtype's name
    ('kv_dtype=float32')."""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"a setting is key=value pairs separated by commas, got {text!r}")
        if key == "tiers" and value != "None":
            out[key] = tuple(TierSpec.from_string(t.strip()) for t in value.split("+"))
        elif key == "kv_dtype" and value != "None":
            out[key] = _dtype(value)
        else:
            out[key] = _number(value)
    return out


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"kv_dtype={name!r} is not a floating torch dtype: write e.g. kv_dtype=float32 or bfloat16")
    return dtype


def _number(value: str):
    if value in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[value]
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def check(model, ids: torch.Tensor, settings: list, *, prefix: int, chunk: int, progress=None) -> list[CheckRow]:
    """Dense first (the model untouched, or transformers' cache if optimize() ran already), then
    optimize(model, **setting) in place for each setting ('key=value,...' or a dict of optimize()'s
    keywords) on a static sphkv cache sized for the text. Returns one row per run, dense first."""
    from transformers import DynamicCache

    from . import api
    from .report import report

    key = api.cache_keyword(model)
    with warnings.catch_warnings():  # a dense cache on purpose (hf_advice.warn_dense_cache)
        warnings.simplefilter("ignore", SphkvCoverageWarning)
        dense = score(model, ids, prefix, chunk, DynamicCache(config=model.config), key, progress)
    rows = [CheckRow("dense", dense.perplexity, 0.0, 1.0, 1.0)]
    for setting in settings:
        api.optimize(model, **(parse_setting(setting) if isinstance(setting, str) else setting))
        cache = api.new_cache(model, max_cache_len=ids.shape[-1])  # pools sized as a server would size them
        got = score(model, ids, prefix, chunk, cache, key, progress)
        kv = report()
        label = setting if isinstance(setting, str) else _label(setting)
        rows.append(CheckRow(label, got.perplexity, got.perplexity - dense.perplexity,
                             float((got.top1 == dense.top1).float().mean()),
                             kv["kv_bytes"] / kv["dense_kv_bytes"] if kv["dense_kv_bytes"] else float("nan")))
        del cache
    return rows


def _label(setting: dict) -> str:
    def text(value):
        if isinstance(value, (tuple, list)) and all(isinstance(t, TierSpec) for t in value):
            return "+".join(t.to_string() for t in value)
        return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else str(value)

    return ",".join(f"{k}={text(v)}" for k, v in setting.items())


def markdown(rows: list[CheckRow], scored: int, model_name: str) -> str:
    lines = [f"{model_name}: {scored} tokens scored after the prefix", "",
             "| setting | KV bytes / dense | perplexity | change | top-1 agreement with dense |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.setting} | {r.kv_fraction:.3f} | {r.perplexity:.3f} | {r.delta:+.3f} | {r.agreement:.3f} |")
    return "\n".join(lines)


def plot(rows: list[CheckRow], path: str, model_name: str) -> None:
    """Perplexity against measured KV bytes, one point per setting, dense at 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r.kv_fraction, r.perplexity, color="black" if r.setting == "dense" else None, zorder=3)
        ax.annotate(r.setting, (r.kv_fraction, r.perplexity), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("resident KV bytes / dense 16-bit cache (measured)")
    ax.set_ylabel("perplexity after the prefix")
    ax.set_title(f"sphkv check: {model_name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _load(name: str | None, device: str):
    """(tokenizer, model in eval mode on `device`, the name to print)."""
    if name is None:
        from .smollm2 import load_smollm2

        tokenizer, model = load_smollm2()
        return tokenizer, model.to(device) if device != "cpu" else model, "SmolLM2-135M (embedded)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    return tokenizer, model, name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sphkv_compile.check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a local directory or hub id (default: the embedded SmolLM2)")
    ap.add_argument("--setting", action="append", dest="settings",
                    help="optimize() options as key=value,...; repeat for several (default: bits=3.5 and "
                         "policy=rdr,budget=0.125); a tier ladder is specs joined by '+' "
                         "(tiers=exact:exact+mid:k3.5:polar3.5:r16), kv_dtype a dtype name (kv_dtype=float32)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of text to use")
    ap.add_argument("--prefix", type=int, help="tokens prefilled before scoring starts (default: half)")
    ap.add_argument("--chunk", type=int, default=128, help="tokens per forward after the prefix")
    ap.add_argument("--text", help="a UTF-8 text file (default: the stdlib's pydoc topics)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--plot", help="also plot perplexity against KV bytes here (needs matplotlib)")
    args = ap.parse_args(argv)
    settings = args.settings or ["bits=3.5", "policy=rdr,budget=0.125"]
    from .options import SphkvOptions

    for s in settings:  # a typo fails now, not after the dense run
        options = parse_setting(s)
        for own in ("kv_dtype", "trial"):  # optimize()'s own keywords, not backend options
            options.pop(own, None)
        SphkvOptions.from_dict(options)
    tokenizer, model, name = _load(args.model, args.device)
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    else:
        from .smollm2 import pydoc_text

        text = pydoc_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :args.tokens].to(args.device)
    if ids.shape[-1] < args.tokens:
        ap.error(f"the text has only {ids.shape[-1]} tokens, fewer than --tokens {args.tokens}")
    prefix = args.prefix or args.tokens // 2
    from tqdm import tqdm

    with tqdm(total=args.tokens * (1 + len(settings)), desc="tokens", unit="tok") as bar:
        rows = check(model, ids, settings, prefix=prefix, chunk=args.chunk, progress=bar)
    print(markdown(rows, args.tokens - prefix, name))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "tokens": args.tokens, "prefix": prefix, "chunk": args.chunk,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    if args.plot:
        plot(rows, args.plot, name)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
