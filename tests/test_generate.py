"""KV-cache decoding and the generation engine: decoding equals the full forward; greedy equals
transformers' generate; seeds, stops, streaming, bad input; a sharded model generates the same tokens."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from hf_utils import hf_and_loaded
from test_model_reference import GQA, LEARNED_POS, MQA, make_cfg, random_params, random_tokens

from mpt_jax import MPT
from mpt_jax.generate import Generator, bucket
from mpt_jax.model import init_cache, unstack_layers
from mpt_jax.sampling import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _cached_apply(cfg, prefill: bool, scan_layers: bool = True):
    def fn(params, tokens, cache, positions):
        model = MPT(cfg, scan_layers=scan_layers)
        return model.apply({"params": params}, tokens, cache=cache, cache_positions=positions, prefill=prefill)

    return jax.jit(fn)


@pytest.mark.parametrize(
    "overrides",
    [{}, GQA, MQA, LEARNED_POS, dict(sliding_window_size=3, attn_logit_softcapping=0.5, qk_ln=True)],
    ids=["mha_alibi", "gqa", "mqa", "learned_pos", "window_softcap_qkln"],
)
@pytest.mark.parametrize("scan_layers", [True, False], ids=["stacked", "per_layer"])
def test_decoding_token_by_token_equals_the_full_forward(overrides, scan_layers):
    """Rows with prompts of different lengths (3 and 7 tokens, prefilled together right-padded),
    then one token at a time with per-row cache positions: every position's logits equal those of
    the full forward (stacked layout) over the same sequence (float32, 1e-5), in both layouts."""
    cfg = make_cfg(**overrides)
    params = random_params(cfg, seed=1)
    total = 14
    tokens = random_tokens(cfg, (2, total), seed=2)
    full = np.asarray(MPT(cfg).apply({"params": params}, jnp.asarray(tokens)))
    if not scan_layers:
        params = unstack_layers(params, cfg.n_layers)
        assert "blocks" not in params and f"blocks_{cfg.n_layers - 1}" in params
        per_layer = MPT(cfg, scan_layers=False).apply({"params": params}, jnp.asarray(tokens))
        np.testing.assert_allclose(np.asarray(per_layer), full, atol=1e-5, rtol=1e-5)
    lengths = np.array([3, 7])
    chunk = np.zeros((2, 8), np.int32)
    for r, n in enumerate(lengths):
        chunk[r, :n] = tokens[r, :n]
    logits, cache = _cached_apply(cfg, True, scan_layers)(
        params, jnp.asarray(chunk), init_cache(cfg, 2, 16, scan_layers=scan_layers), jnp.zeros(2, jnp.int32)
    )
    logits = np.asarray(logits)
    for r, n in enumerate(lengths):
        np.testing.assert_allclose(logits[r, :n], full[r, :n], atol=1e-5, rtol=1e-5)
    positions = jnp.asarray(lengths, jnp.int32)
    for step in range(total - lengths.max()):
        feed = tokens[np.arange(2), lengths + step][:, None]
        logits, cache = _cached_apply(cfg, False, scan_layers)(params, jnp.asarray(feed), cache, positions)
        for r in range(2):
            np.testing.assert_allclose(np.asarray(logits)[r, 0], full[r, lengths[r] + step], atol=1e-5, rtol=1e-5)
        positions = positions + 1


def test_alibi_decodes_past_max_seq_len():
    """An ALiBi model with max_seq_len 16 decodes to 40 positions: the cached logits equal the full
    forward (which ALiBi also runs past max_seq_len)."""
    cfg = make_cfg()
    params = random_params(cfg, seed=3)
    tokens = random_tokens(cfg, (1, 40), seed=4)
    full = np.asarray(MPT(cfg).apply({"params": params}, jnp.asarray(tokens)))
    _, cache = _cached_apply(cfg, True)(
        params, jnp.asarray(tokens[:, :10]), init_cache(cfg, 1, 48), jnp.zeros(1, jnp.int32)
    )
    for i in range(10, 40):
        logits, cache = _cached_apply(cfg, False)(params, jnp.asarray(tokens[:, i : i + 1]), cache, jnp.asarray([i]))
        np.testing.assert_allclose(np.asarray(logits)[0, 0], full[0, i], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Greedy generation against transformers.

HF_CONFIGS = {
    "3heads": dict(d_model=48, n_heads=3, n_layers=2, max_seq_len=64, vocab_size=97),
    "4heads_clip": dict(
        d_model=64, n_heads=4, n_layers=3, max_seq_len=64, vocab_size=128, attn_config={"clip_qkv": 0.3}
    ),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_greedy_equals_transformers_generate(name, tmp_path):
    """A batch of prompts of lengths 1..9 through one engine (4 rows, so some wait for a free row):
    each continuation equals transformers' MptForCausalLM.generate(do_sample=False) token for token."""
    import torch

    hf, cfg, params = hf_and_loaded(tmp_path, seed=5, **HF_CONFIGS[name])
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (1, 5, 9, 2, 7)]
    new = 12
    gen = Generator(cfg, jax.tree.map(jnp.asarray, params), max_batch=4)
    ours = gen.generate(prompts, max_new_tokens=new, temperature=0.0, stop_token_ids=[])
    for prompt, out in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )[0, len(prompt) :].tolist()
        assert out.token_ids == ref
        assert out.finish_reason == "length"


# ------------------------------------------------------------------------------------------------
# Sampling, seeds, stops, streaming.


@functools.cache
def _small():
    cfg = make_cfg(vocab_size=64, max_seq_len=64)
    return cfg, random_params(cfg, seed=7)


def test_same_seed_same_tokens_in_any_batch():
    """A seeded request gives the same tokens alone, in a batch, and in another row; another seed
    gives other tokens."""
    cfg, params = _small()
    gen = Generator(cfg, params, max_batch=4)
    kw = dict(max_new_tokens=10, temperature=3.0, top_k=40, stop_token_ids=[])
    alone = gen.generate([[1, 2, 3]], seed=11, **kw)[0].token_ids
    batch = gen.generate([[5, 6], [1, 2, 3], [9] * 7], seed=[3, 11, 4], **kw)
    assert batch[1].token_ids == alone
    again = Generator(cfg, params, max_batch=1).generate([[1, 2, 3]], seed=11, **kw)[0].token_ids
    assert again == alone
    assert gen.generate([[1, 2, 3]], seed=12, **kw)[0].token_ids != alone


def test_engine_runs_either_params_layout_to_the_same_tokens():
    """The engine follows the params' layout: stacked params (one scanned block, a stacked cache)
    and per-layer params (a cache per layer) sample the same tokens with the same log-probs."""
    from mpt_jax.generate import Engine
    from mpt_jax.sampling import SamplingParams

    cfg, params = _small()
    out = {}
    for name, tree in [("stacked", params), ("per_layer", unstack_layers(params, cfg.n_layers))]:
        engine = Engine(cfg, tree, rows=3, cache_len=32)
        assert engine.scan_layers == (name == "stacked")
        assert isinstance(engine.cache, dict) == (name == "stacked")
        sampling = SamplingParams.make(2, temperature=[0.0, 2.0], top_k=[0, 20])
        first = engine.insert([2, 0], [[1, 2, 3], [4, 5, 6, 7, 8]], sampling, seeds=[5, 6])
        steps = [engine.step() for _ in range(6)]
        out[name] = (first, steps)
    (first_s, steps_s), (first_l, steps_l) = out["stacked"], out["per_layer"]
    np.testing.assert_array_equal(first_s[0], first_l[0])
    for (tok_s, logp_s), (tok_l, logp_l) in zip(steps_s, steps_l, strict=True):
        np.testing.assert_array_equal(tok_s[[0, 2]], tok_l[[0, 2]])
        np.testing.assert_allclose(logp_s[[0, 2]], logp_l[[0, 2]], atol=1e-5)


def test_stop_token_and_max_new_tokens_and_logprobs():
    cfg, params = _small()
    gen = Generator(cfg, params, max_batch=2)
    greedy = gen.generate([[4, 5, 6]], max_new_tokens=8, temperature=0.0, stop_token_ids=[], logprobs=True)[0]
    assert len(greedy.token_ids) == 8 and len(greedy.logprobs) == 8 and greedy.finish_reason == "length"
    assert all(lp <= 0 for lp in greedy.logprobs)
    stop_at = greedy.token_ids[3]
    first = greedy.token_ids.index(stop_at)
    stopped = gen.generate([[4, 5, 6]], max_new_tokens=8, temperature=0.0, stop_token_ids=[stop_at])[0]
    assert stopped.token_ids == greedy.token_ids[:first] and stopped.finish_reason == "stop"


def test_alternatives_are_the_models_log_softmax_and_cost_nothing_when_off():
    """``top_logprobs=5``: a greedy row's alternatives are the 5 most likely tokens of a float64
    log_softmax of the full forward's logits at each step (its token first, with its log-prob); a
    sampled row with top_k=3 reports its 3 kept tokens, renormalized. Tokens and log-probs are the
    same as without alternatives, and an engine without them returns only (tokens, logprobs)."""
    from mpt_jax.generate import Engine

    cfg, params = _small()
    kw = dict(max_new_tokens=8, temperature=[0.0, 1.5], top_k=[0, 3], seed=4, stop_token_ids=[], logprobs=True)
    prompts = [[4, 5, 6], [1, 2]]
    got = Generator(cfg, params, max_batch=2, top_logprobs=5).generate(prompts, **kw)
    plain = Generator(cfg, params, max_batch=2).generate(prompts, **kw)
    for g, p in zip(got, plain, strict=True):
        assert g.token_ids == p.token_ids and p.top_logprobs is None
        np.testing.assert_allclose(g.logprobs, p.logprobs, atol=1e-6)
        assert len(g.top_logprobs) == len(g.token_ids) == 8

    greedy = got[0]
    seq = prompts[0] + greedy.token_ids
    logits = np.asarray(MPT(cfg).apply({"params": params}, jnp.asarray([seq])))[0]
    ref = scipy.special.log_softmax(logits.astype(np.float64), axis=-1)
    for t, alternatives in enumerate(greedy.top_logprobs):
        step = ref[len(prompts[0]) - 1 + t]
        want = np.argsort(-step, kind="stable")[:5]
        assert [i for i, _ in alternatives] == want.tolist()
        np.testing.assert_allclose([lp for _, lp in alternatives], step[want], atol=1e-5)
        assert alternatives[0] == (greedy.token_ids[t], greedy.logprobs[t])

    sampled = got[1]
    for token, logprob, alternatives in zip(sampled.token_ids, sampled.logprobs, sampled.top_logprobs, strict=True):
        assert len(alternatives) == 3  # top_k=3: the filtered tokens are not alternatives
        assert dict(alternatives)[token] == pytest.approx(logprob, abs=1e-6)
        assert np.exp([lp for _, lp in alternatives]).sum() == pytest.approx(1.0, abs=1e-5)

    engine = Engine(cfg, params, rows=1, cache_len=16)
    assert len(engine.insert([0], [[1, 2]], SamplingParams.greedy(1), [0])) == 2 and len(engine.step()) == 2
    assert Engine(cfg, params, rows=1, cache_len=16, top_logprobs=1000).top_logprobs == cfg.vocab_size
    with pytest.raises(ValueError, match="top_logprobs=-1"):
        Generator(cfg, params, top_logprobs=-1)


class _CharTokenizer:
    """Token i is the character chr(97 + i % 26) (enough for stop strings and streaming)."""

    eos_id = 0

    def encode(self, text):
        return [(ord(c) - 97) % 26 + 1 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + (i - 1) % 26) for i in ids)

    def token_to_id(self, token):
        return None


def test_stop_strings_and_streaming_concatenate_to_the_text():
    cfg, params = _small()
    gen = Generator(cfg, params, _CharTokenizer(), max_batch=2)
    kw = dict(max_new_tokens=20, temperature=0.0, stop_token_ids=[])
    full = gen.generate(["abc"], **kw)[0]
    assert len(full.text) == 20
    stop = full.text[5:7]
    cut = gen.generate(["abc"], stop=[stop], **kw)[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    events = list(gen.stream(["abc", "xyz"], stop=[stop], **kw))
    texts = ["".join(e.text for e in events if e.index == i) for i in range(2)]
    assert texts[0] == cut.text
    assert [e.finish_reason for e in events if e.finish_reason] and all(
        sum(1 for e in events if e.index == i and e.finish_reason) == 1 for i in range(2)
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[]]), "prompt 0 is empty"),
        (dict(prompts=[[1, 2, 999]]), r"outside the vocabulary \[0, 64\)"),
        (dict(prompts=[[1] * 60], max_new_tokens=10), "prompt 0 has 60 tokens"),
        (dict(prompts=[[1]], temperature=-0.5), "temperature"),
        (dict(prompts=[[1]], top_p=0.0), "top_p"),
        (dict(prompts=[[1]], top_p=1.5), "top_p"),
        (dict(prompts=["text"]), "need a tokenizer"),
        (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=[[1]], max_new_tokens=64), "max_new_tokens=64 leaves no room"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    cfg, params = _small()
    gen = Generator(cfg, params, max_batch=1)
    prompts = kwargs.pop("prompts")
    kwargs.setdefault("max_new_tokens", 8)
    with pytest.raises(ValueError, match=match):
        gen.generate(prompts, **kwargs)


def test_truncate_left_keeps_the_last_tokens():
    cfg, params = _small()
    gen = Generator(cfg, params, max_batch=1)
    long = list(range(1, 61))
    out = gen.generate([long], max_new_tokens=8, temperature=0.0, truncate="left", stop_token_ids=[])[0]
    assert out.prompt_tokens == long[-56:]
    same = gen.generate([long[-56:]], max_new_tokens=8, temperature=0.0, stop_token_ids=[])[0]
    assert out.token_ids == same.token_ids


def test_bucket():
    assert [bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


SHARDED = textwrap.dedent(
    """
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {tests!r})
    from test_model_reference import make_cfg, random_params, GQA
    from mpt_jax.generate import Generator
    from mpt_jax.sharding import make_mesh, param_shardings
    cfg = make_cfg(n_heads=8, d_model=64, vocab_size=64, max_seq_len=64, **GQA)
    params = random_params(cfg, seed=9)
    prompts = [[1, 2, 3], [4] * 9, [7, 8], [9, 10, 11, 12]]
    kw = dict(max_new_tokens=8, temperature=0.7, top_p=0.9, seed=[1, 2, 3, 4], stop_token_ids=[])
    out = {{"single": [c.token_ids for c in Generator(cfg, params, max_batch=4).generate(prompts, **kw)]}}
    for shape in [(1, 2, 4), (2, 2, 2), (1, 8, 1)]:
        mesh = make_mesh(shape)
        placed = jax.device_put(params, param_shardings(cfg, mesh))
        gen = Generator(cfg, placed, max_batch=4, mesh=mesh)
        out[str(shape)] = [c.token_ids for c in gen.generate(prompts, **kw)]
        out[str(shape) + "_cache"] = str(gen._engine.cache[0]["k"].sharding.spec)
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_sharded_model_generates_the_same_tokens(tmp_path):
    """On 8 simulated devices, with params sharded over tensor and fsdp, the cache sharded like k/v,
    sampling gives the tokens of one device."""
    import json

    script = tmp_path / "sharded.py"
    script.write_text(SHARDED.format(tests=os.path.join(ROOT, "tests")))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for shape in ["(1, 2, 4)", "(2, 2, 2)", "(1, 8, 1)"]:
        assert out[shape] == out["single"], shape
    assert "tensor" in out["(2, 2, 2)_cache"]  # 2 kv heads over tensor 2 (over 4 they stay whole)
