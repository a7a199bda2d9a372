"""Continuation scoring against transformers' MptForCausalLM logits, and the rolling windows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_utils import hf_and_loaded

from mpt_jax.eval.scoring import (
    Scorer,
    fine_bucket,
    layout,
    pack,
    rolling_requests,
    rolling_windows,
    token_scores,
    tree_mask,
    trees,
)

HF_CONFIG = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=96, attn_config={"alibi": True})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf, cfg, params = hf_and_loaded(tmp_path_factory.mktemp("hf"), seed=3, **HF_CONFIG)
    return hf, cfg, jax.tree.map(jnp.asarray, params)


def reference(hf, context: list[int], continuation: list[int], max_length: int) -> tuple[float, bool]:
    """float64 log-softmax of transformers' logits over the (left-cut) sequence, one request alone."""
    full = (context + continuation)[-(max_length + 1) :]
    with torch.no_grad():
        logits = hf(torch.tensor([full[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    n = len(continuation)
    targets = torch.tensor(full[1:])[-n:]
    picked = logp[-n:].gather(-1, targets[:, None])[:, 0]
    greedy = bool((logits[-n:].argmax(-1) == targets).all())
    return float(picked.sum()), greedy


def test_loglikelihood_equals_transformers_batched_or_alone(models):
    """Requests of different lengths (some cut on the left to max_length), scored alone (batch 1,
    no padding) and together (batch 4, padded to a bucket): every sum within 1e-4 of the float64
    log-softmax of transformers' logits, and the greedy flags agree."""
    hf, cfg, params = models
    rng = np.random.default_rng(0)
    requests = []
    for ctx_len, cont_len in [(1, 1), (5, 3), (12, 1), (30, 4), (3, 9), (40, 2), (7, 7)]:
        requests.append((rng.integers(0, 96, ctx_len).tolist(), rng.integers(0, 96, cont_len).tolist()))
    # a continuation that is the model's own greedy choice, so a True flag is checked too
    ctx = rng.integers(0, 96, 6).tolist()
    with torch.no_grad():
        requests.append((ctx, [int(hf(torch.tensor([ctx])).logits[0, -1].argmax())]))
    want = [reference(hf, c, x, cfg.max_seq_len) for c, x in requests]
    assert any(g for _, g in want) and not all(g for _, g in want)
    for batch_size in (1, 4):
        got = Scorer(cfg, params, batch_size=batch_size).loglikelihood(requests)
        for (s, g), (ws, wg) in zip(got, want, strict=True):
            assert abs(s - ws) < 1e-4, (s, ws)
            assert g == wg


def test_choices_sharing_a_context_equal_transformers(models):
    """Multiple-choice-shaped requests (contexts shared by 1-5 continuations of 1-6 tokens, one
    context cut on the left) run each context once; every sum within 1e-4 of transformers'."""
    hf, cfg, params = models
    rng = np.random.default_rng(5)
    requests = []
    for ctx_len, n_choices in [(9, 4), (3, 2), (20, 5), (31, 3), (2, 1)]:
        ctx = rng.integers(0, 96, ctx_len).tolist()
        requests += [(ctx, rng.integers(0, 96, int(rng.integers(1, 7))).tolist()) for _ in range(n_choices)]
    order = rng.permutation(len(requests))
    requests = [requests[i] for i in order]
    want = [reference(hf, c, x, cfg.max_seq_len) for c, x in requests]
    for batch_size in (1, 4, 16):
        got = Scorer(cfg, params, batch_size=batch_size).loglikelihood(requests)
        for (s, g), (ws, wg) in zip(got, want, strict=True):
            assert abs(s - ws) < 1e-4, (batch_size, s, ws)
            assert g == wg


def test_learned_positions_score_as_the_full_forward():
    """A learned-position model (not in transformers' MPT): shared-context scoring equals the
    log-softmax of our full forward pass (itself equal to llm-foundry's), padding positions past
    the embedding table included."""
    from test_model_reference import LEARNED_POS, make_cfg, random_params

    from mpt_jax import MPT

    cfg = make_cfg(**LEARNED_POS)
    params = random_params(cfg, seed=2)
    rng = np.random.default_rng(3)
    n = cfg.max_seq_len
    ctx = rng.integers(0, cfg.vocab_size, n - 3).tolist()
    requests = [(ctx, rng.integers(0, cfg.vocab_size, k).tolist()) for k in (1, 2, 3)]
    got = Scorer(cfg, params, batch_size=4).loglikelihood(requests)
    for (c, x), (s, _) in zip(requests, got, strict=True):
        full = c + x
        logits = MPT(cfg).apply({"params": params}, jnp.asarray([full[:-1]]))[0]
        logp = jax.nn.log_softmax(logits.astype(jnp.float64) if jax.config.x64_enabled else logits, -1)
        want = sum(float(logp[len(c) - 1 + j, t]) for j, t in enumerate(x))
        assert abs(s - want) < 1e-4 and np.isfinite(s)


@pytest.mark.parametrize("n, max_length, stride", [(2, 4, None), (9, 4, None), (10, 4, 1), (23, 8, 3), (5, 8, 8)])
def test_rolling_windows_score_every_token_once(n, max_length, stride):
    """Every token after the first is a target exactly once; inputs never exceed max_length; with a
    stride each window's context is as long as fits."""
    windows = rolling_windows(n, max_length, stride)
    scored = [t for _, first, end in windows for t in range(first, end)]
    assert scored == list(range(1, n))
    for start, first, end in windows:
        assert end - start - 1 <= max_length
        assert start == max(0, end - max_length - 1)
        assert first > start


def test_rolling_requests_add_up_to_the_full_sequence_logprob(models):
    """A document shorter than max_length scores the same in one request or in strided windows
    (ALiBi attends only within a window, so longer context can only change what it sees: here the
    windows hold the whole prefix)."""
    hf, cfg, params = models
    tokens = np.random.default_rng(2).integers(0, 96, 20).tolist()
    scorer = Scorer(cfg, params, batch_size=2)
    whole = sum(s for s, _ in scorer.loglikelihood(rolling_requests(tokens, 32)))
    strided = sum(s for s, _ in scorer.loglikelihood(rolling_requests(tokens, 32, stride=5)))
    want = reference(hf, tokens[:1], tokens[1:], 32)[0]
    assert abs(whole - want) < 1e-4 and abs(strided - want) < 1e-4


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="continuation is empty"):
        layout([1], [], 8)
    with pytest.raises(ValueError, match="context is empty"):
        layout([], [1], 8)
    with pytest.raises(ValueError, match="does not fit max_length=2"):
        layout([1], [1, 2, 3], 2)
    with pytest.raises(ValueError, match="stride=9"):
        rolling_windows(10, 8, 9)


TREE_CASES = {  # model options whose terms depend on positions or on the mask
    "alibi": {},
    "learned_pos_emb": dict(alibi=False, learned_pos_emb=True),
    "rope_dail": dict(alibi=False, rope=True, rope_theta=100.0),
    "rope_hf_gqa": dict(alibi=False, rope=True, rope_impl="hf", attn_type="grouped_query_attention", kv_n_heads=2),
    "sliding_window_2": dict(sliding_window_size=2),
    "softcap_qk_gn": dict(attn_logit_softcapping=0.3, qk_gn=True),
}


@pytest.mark.parametrize("case", list(TREE_CASES))
def test_tree_rows_equal_separate_sequences(case):
    """Two trees packed in one row (a 4-token context with continuations of 3, 1 and 2 tokens; a
    3-token context with one of 2), through the model's attention_mask with tree positions: the
    logits at every token equal those of that token's own sequence (context + its continuation)
    run alone, for ALiBi, learned positions, RoPE, a sliding window, softcaps and GQA."""
    from test_model_reference import make_cfg, random_params

    from mpt_jax import MPT

    cfg = make_cfg(**TREE_CASES[case])
    params = random_params(cfg, seed=4)
    rng = np.random.default_rng(7)
    pieces = [(4, [3, 1, 2]), (3, [2])]
    tokens, positions, group, branch, sequences = [], [], [], [], []
    for g, (n, lengths) in enumerate(pieces):
        trunk = rng.integers(0, cfg.vocab_size, n).tolist()
        at_trunk = list(range(len(tokens), len(tokens) + n))
        tokens += trunk
        positions += list(range(n))
        group += [g] * n
        branch += [0] * n
        for j, k in enumerate(lengths, start=1):
            tail = rng.integers(0, cfg.vocab_size, k).tolist()
            sequences.append((trunk + tail, at_trunk + list(range(len(tokens), len(tokens) + k))))
            tokens += tail
            positions += list(range(n, n + k))
            group += [g] * k
            branch += [j] * k
    pad = cfg.max_seq_len - len(tokens)
    tokens, positions = tokens + [0] * pad, positions + [0] * pad
    group, branch = group + [-1] * pad, branch + [0] * pad
    model = MPT(cfg)
    mask = tree_mask(jnp.asarray([group]), jnp.asarray([branch]))
    packed = model.apply(
        {"params": params}, jnp.asarray([tokens]), positions=jnp.asarray([positions]), attention_mask=mask
    )[0]
    for sequence, where in sequences:
        alone = model.apply({"params": params}, jnp.asarray([sequence]))[0]
        np.testing.assert_allclose(np.asarray(packed[np.asarray(where)]), np.asarray(alone), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("vocab", [7, 96, 100, 4096])
def test_token_scores_equal_float64_with_ties(vocab):
    """log p(target) within 1e-5 of a float64 log-softmax and the greedy flag equal to argmax ==
    target (first index on ties), whether the vocabulary is reduced in chunks (96, 4096) or whole
    (7, 100): rows of all-equal logits and rows with a tied maximum included."""
    rng = np.random.default_rng(vocab)
    logits = (rng.normal(size=(3, 6, vocab)) * 4).astype(np.float32)
    targets = rng.integers(0, vocab, (3, 6))
    logits[0, 0] = 1.0  # all tied: only index 0 is the argmax
    targets[0, 0], targets[0, 1] = 0, vocab - 1
    logits[0, 1] = 1.0
    top = logits[1, 1].max() + 1.0
    logits[1, 1, 2], logits[1, 1, vocab - 2] = top, top  # a tie at 2 and vocab - 2
    targets[1, 1], targets[1, 2] = 2, vocab - 2
    logits[1, 2, 2], logits[1, 2, vocab - 2] = top, top
    targets[2, 0] = int(logits[2, 0].argmax())
    logp, greedy = token_scores(jnp.asarray(logits), jnp.asarray(targets))
    wide = logits.astype(np.float64)
    lse = np.log(np.exp(wide - wide.max(-1, keepdims=True)).sum(-1)) + wide.max(-1)
    want = np.take_along_axis(wide, targets[..., None], -1)[..., 0] - lse
    np.testing.assert_allclose(np.asarray(logp), want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(greedy), logits.argmax(-1) == targets)
    assert bool(greedy[0, 0]) and not bool(greedy[0, 1]) and bool(greedy[1, 1]) and not bool(greedy[1, 2])


def test_pack_places_every_tree_once_within_its_row():
    """Trees of random sizes (contexts shared by 1-5 continuations): every tree lands in exactly one
    row, no row holds more tokens than its width, widths are buckets within max_length, at most
    ``rows`` rows per batch, and the rows are mostly full (best fit, largest first)."""
    rng = np.random.default_rng(11)
    requests = []
    for _ in range(60):
        ctx = rng.integers(0, 50, int(rng.integers(1, 90))).tolist()
        requests += [(ctx, rng.integers(0, 50, int(rng.integers(1, 20))).tolist()) for _ in range(rng.integers(1, 6))]
    rows = [layout(c, x, 128) for c, x in requests]
    forest = trees(rows, 128)
    assert sorted(i for t in forest for i in t.members) == list(range(len(requests)))
    for t in forest:
        assert t.size == len(t.trunk) + sum(rows[i].n_targets - 1 for i in t.members) <= 128
    batches = pack(forest, 4, 128)
    seen = [id(t) for _, placed in batches for row in placed for t in row]
    assert sorted(seen) == sorted(id(t) for t in forest)
    held = slots = 0
    for width, placed in batches:
        assert width <= 128 and width == fine_bucket(width, minimum=16) and 1 <= len(placed) <= 4
        for row in placed:
            assert sum(t.size for t in row) <= width
        held += sum(t.size for row in placed for t in row)
        slots += width * len(placed)
    assert held / slots > 0.85, held / slots


def test_fine_bucket():
    assert [fine_bucket(n, minimum=16) for n in (1, 16, 17, 25, 33, 65, 97, 129, 193)] == [
        16,
        16,
        24,
        32,
        48,
        96,
        128,
        192,
        256,
    ]
    assert [fine_bucket(n, steps=4) for n in (9, 850, 1024, 1025)] == [10, 896, 1024, 1280]
