"""Offline task samples. Each sample is a prompt whose KV cache gets compressed, and target
tokens scored with teacher forcing through the compressed cache.

  ppl        pydoc_data.topics text: the prefix is compressed, the continuation scored (NLL)
  agreement  the dense model's greedy continuation of a pydoc prefix; the score is how many of
             its tokens each method also predicts greedily (teacher-forced top-1 agreement)
  passkey    a 5-digit pass key hidden at a depth of repeated filler text
  multikey / multivalue / vartrack: RULER-style (niah_multikey: 8 keys, 1 queried;
             niah_multivalue: 1 key, 8 values; vt: 1 chain, 4 hops), with pydoc text as the
             haystack. Wording and haystack are our own.
Scores for the retrieval tasks: exact match (every answer token is the greedy prediction,
so greedy decoding would produce the answer) and token accuracy.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from ..smollm2 import pydoc_text


@dataclass
class Sample:
    task: str
    prompt: torch.Tensor  # [1, P] token ids; the cache of all of them is compressed
    target: torch.Tensor  # [1, A] token ids scored after the prompt
    info: dict


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _pydoc_ids(tokenizer, start_char: int, n_tokens: int) -> list[int]:
    text = pydoc_text()
    start_char %= max(1, len(text) - 8 * n_tokens)
    ids = _ids(tokenizer, text[start_char:start_char + 8 * n_tokens])
    if len(ids) < n_tokens:
        raise ValueError(f"pydoc text too short for {n_tokens} tokens at {start_char}")
    return ids[:n_tokens]


def ppl_samples(tokenizer, count: int, prefix: int, continuation: int) -> list[Sample]:
    out = []
    for i in range(count):
        ids = _pydoc_ids(tokenizer, 97_531 * i + 1_000, prefix + continuation)
        out.append(Sample("ppl", torch.tensor([ids[:prefix]]), torch.tensor([ids[prefix:]]), {"length": prefix}))
    return out


def agreement_samples(model, tokenizer, count: int, prefix: int, generate: int) -> list[Sample]:
    out = []
    for i in range(count):
        ids = torch.tensor([_pydoc_ids(tokenizer, 55_555 * i + 200_000, prefix)])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=generate, do_sample=False, min_new_tokens=generate,
                                 pad_token_id=tokenizer.eos_token_id)
        out.append(Sample("agreement", ids, gen[:, prefix:], {"length": prefix}))
    return out


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _fit(tokenizer, head: str, body_parts: list[str], needles: list[tuple[float, str]], tail: str, length: int) -> str:
    """Join filler parts up to about `length` tokens, with needles inserted at their depths."""
    fixed = len(_ids(tokenizer, head + tail + "".join(n for _, n in needles)))
    part_tokens = max(1, len(_ids(tokenizer, body_parts[0])))
    k = max(1, (length - fixed) // part_tokens)
    body = [body_parts[j % len(body_parts)] for j in range(k)]
    for depth, needle in sorted(needles, reverse=True):
        body.insert(int(round(depth * len(body))), needle)
    return head + "".join(body) + tail


def passkey_samples(tokenizer, lengths, depths, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for length in lengths:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            head = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it "
                    "and remember it. I will ask you about it.\n")
            needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
            text = _fit(tokenizer, head, [FILLER], [(depth, needle)], "\nWhat is the pass key? The pass key is", length)
            out.append(Sample("passkey", torch.tensor([_ids(tokenizer, text)]), torch.tensor([_ids(tokenizer, " " + key)]),
                              {"length": length, "depth": depth}))
    return out


def _haystack_parts(tokenizer, seed: int, n_parts: int = 64) -> list[str]:
    text = pydoc_text()
    rng = random.Random(seed)
    sentences = [s.strip() + " " for s in re.split(r"(?<=[.!?])\s+", text) if 40 < len(s) < 300 and "\n" not in s]
    return [rng.choice(sentences) for _ in range(n_parts)]


def _words(seed: int, n: int) -> list[str]:
    vocab = sorted({w.lower() for w in re.findall(r"[A-Za-z]{5,10}", pydoc_text())})
    return random.Random(seed).sample(vocab, n)


def _number(rng) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def multikey_samples(tokenizer, lengths, count: int, seed: int = 1) -> list[Sample]:
    out = []
    for length in lengths:
        for i in range(count):
            rng = random.Random(seed * 1000 + length + i)
            keys = _words(rng.randint(0, 1 << 30), 8)
            values = [_number(rng) for _ in keys]
            needles = [(rng.random(), f"One of the special magic numbers for {k} is: {v}. ") for k, v in zip(keys, values)]
            q = rng.randrange(len(keys))
            head = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n"
            tail = (f"\nWhat is the special magic number for {keys[q]} mentioned in the text? "
                    f"The special magic number for {keys[q]} mentioned in the text is")
            text = _fit(tokenizer, head, _haystack_parts(tokenizer, rng.randint(0, 1 << 30)), needles, tail, length)
            out.append(Sample("multikey", torch.tensor([_ids(tokenizer, text)]),
                              torch.tensor([_ids(tokenizer, " " + values[q])]), {"length": length}))
    return out


def multivalue_samples(tokenizer, lengths, count: int, seed: int = 2) -> list[Sample]:
    out = []
    for length in lengths:
        for i in range(count):
            rng = random.Random(seed * 1000 + length + i)
            key = _words(rng.randint(0, 1 << 30), 1)[0]
            values = [_number(rng) for _ in range(8)]
            depths = sorted(rng.random() for _ in values)
            needles = [(dp, f"One of the special magic numbers for {key} is: {v}. ") for dp, v in zip(depths, values)]
            head = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n"
            tail = (f"\nWhat are all the special magic numbers for {key} mentioned in the text? "
                    f"The special magic numbers for {key} mentioned in the text are")
            text = _fit(tokenizer, head, _haystack_parts(tokenizer, rng.randint(0, 1 << 30)), needles, tail, length)
            answer = " " + ", ".join(values)  # in order of appearance
            out.append(Sample("multivalue", torch.tensor([_ids(tokenizer, text)]), torch.tensor([_ids(tokenizer, answer)]),
                              {"length": length}))
    return out


def vartrack_samples(tokenizer, lengths, count: int, seed: int = 3, hops: int = 4) -> list[Sample]:
    out = []
    for length in lengths:
        for i in range(count):
            rng = random.Random(seed * 1000 + length + i)
            names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
            value = str(rng.randint(10000, 99999))
            statements = [f"VAR {names[0]} = {value}. "] + [f"VAR {names[j + 1]} = VAR {names[j]}. " for j in range(hops)]
            depths = sorted(rng.random() for _ in statements)
            head = "Memorize and track the chain of variable assignments hidden in the following text.\n"
            tail = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                    f"Answer: According to the chain of variable assignments in the text above, {hops + 1} variables "
                    f"are assigned the value {value}, they are:")
            text = _fit(tokenizer, head, _haystack_parts(tokenizer, rng.randint(0, 1 << 30)),
                        list(zip(depths, statements)), tail, length)
            out.append(Sample("vartrack", torch.tensor([_ids(tokenizer, text)]),
                              torch.tensor([_ids(tokenizer, " " + " ".join(names))]), {"length": length}))
    return out
