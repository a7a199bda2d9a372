"""Sampling (mpt_jax/sampling.py) against transformers' own logits processors, row by row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mpt_jax.sampling import SamplingParams, process_logits, sample, token_logprobs, top_logprobs

V = 1000
T = 24
process = jax.jit(process_logits)
sample_jit = jax.jit(sample)


def make_logits(seed: int = 0) -> np.ndarray:
    """Eight kinds of rows: continuous, tied (on a grid), peaked (with a zero-probability token), flat, wide, narrow."""
    rng = np.random.default_rng(seed)
    rows = [
        rng.normal(size=V) * 2,
        np.round(rng.normal(size=V) * 4) / 2,
        rng.normal(size=V) + np.eye(V)[7] * 20 - np.eye(V)[500] * 100,  # token 500's probability underflows to 0
        np.zeros(V),
        rng.normal(size=V) * 6,
        rng.normal(size=V) * 0.3,
        np.round(rng.normal(size=V) * 2) / 4,
        rng.normal(size=V) * 2 + np.eye(V)[3] * 3 + np.eye(V)[9] * 3,
    ]
    return np.stack(rows).astype(np.float32)


def make_context(batch: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token ids with repeats (ids < 60, so many are seen twice) and masked-out positions."""
    rng = np.random.default_rng(seed)
    context = rng.integers(0, 60, size=(batch, T)).astype(np.int32)
    mask = rng.random((batch, T)) > 0.3
    return context, mask


def hf_chain(row: np.ndarray, ids: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, penalty=1.0):
    """transformers' generate chain for one row, built as `_get_logits_processor` builds it."""
    chain = LogitsProcessorList()
    if penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(float(penalty)))
    if temperature > 0:  # do_sample=True: the warpers
        if temperature != 1.0:
            chain.append(TemperatureLogitsWarper(float(temperature)))
        if top_k != 0:
            chain.append(TopKLogitsWarper(int(top_k)))
        if top_p < 1.0:
            chain.append(TopPLogitsWarper(float(top_p)))
        if min_p > 0:
            chain.append(MinPLogitsWarper(float(min_p)))
    input_ids = torch.tensor(np.asarray(ids, dtype=np.int64)[None])
    return chain(input_ids, torch.tensor(row[None]))[0].numpy()


def ours(logits: np.ndarray, context=None, mask=None, **settings) -> np.ndarray:
    params = SamplingParams.make(logits.shape[0], **settings)
    if context is None:
        context = np.zeros((logits.shape[0], T), np.int32)
        mask = np.zeros((logits.shape[0], T), bool)
    return np.asarray(
        process(jnp.asarray(logits), params, context=jnp.asarray(context), context_mask=jnp.asarray(mask))
    )


def assert_same(got: np.ndarray, want: np.ndarray, *, top_p_ties: bool = False) -> None:
    """Same kept set, same values within 1e-5 where kept.

    With ``top_p_ties`` ours may also keep tokens tied with the least probable token
    transformers kept (which of those transformers keeps follows torch's unstable sort).
    """
    kept, kept_ref = np.isfinite(got), np.isfinite(want)
    assert np.all(got[~kept] == -np.inf)
    if top_p_ties:
        assert np.all(kept[kept_ref]), "ours dropped a token transformers keeps"
        extra = kept & ~kept_ref
        assert np.all(got[extra] == got[kept_ref].min()), "extra tokens are not ties at the cutoff"
    else:
        np.testing.assert_array_equal(kept, kept_ref)
    np.testing.assert_allclose(got[kept_ref], want[kept_ref], rtol=1e-5, atol=1e-5)


def test_repetition_penalty_matches_transformers():
    logits = make_logits()
    context, mask = make_context(len(logits))
    for penalty in (1.3, 0.7):
        got = ours(logits, context, mask, repetition_penalty=penalty)
        for b in range(len(logits)):
            assert_same(got[b], hf_chain(logits[b], context[b][mask[b]], penalty=penalty))
    # A token seen only at masked positions is not penalized; one seen twice is penalized once.
    b = 0
    only_masked = set(context[b][~mask[b]]) - set(context[b][mask[b]])
    assert only_masked, "the fixture should mask some token out entirely"
    got = ours(logits, context, mask, repetition_penalty=1.3)
    for t in only_masked:
        assert got[b, t] == logits[b, t]
    # Penalty 1 and an empty context leave the logits exactly as they were.
    np.testing.assert_array_equal(ours(logits, context, mask, repetition_penalty=1.0), logits)
    np.testing.assert_array_equal(ours(logits, context, np.zeros_like(mask), repetition_penalty=1.3), logits)


def test_temperature_matches_transformers():
    logits = make_logits()
    for temperature in (0.5, 2.0, 1.0):
        got = ours(logits, temperature=temperature)
        for b in range(len(logits)):
            assert_same(got[b], hf_chain(logits[b], [], temperature=temperature))
    np.testing.assert_array_equal(ours(logits, temperature=1.0), logits)


@pytest.mark.parametrize("top_k", [1, 5, 50, 999, 1000, 5000])
def test_top_k_matches_transformers_ties_kept(top_k):
    logits = make_logits()
    got = ours(logits, top_k=top_k)
    for b in range(len(logits)):
        assert_same(got[b], hf_chain(logits[b], [], top_k=top_k))
    # Row 1 lives on a 0.5 grid: the k-th value is tied, and every tied token stays.
    if top_k == 50:
        kth = np.sort(logits[1])[-50]
        assert np.isfinite(got[1]).sum() > 50
        assert np.all(np.isfinite(got[1][logits[1] == kth]))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99, 1.0])
def test_top_p_matches_transformers(top_p):
    logits = make_logits()
    got = ours(logits, top_p=top_p)
    for b in range(len(logits)):
        tied_row = len(np.unique(logits[b])) < V
        assert_same(got[b], hf_chain(logits[b], [], top_p=top_p), top_p_ties=tied_row)
    if top_p == 1.0:
        np.testing.assert_array_equal(got, logits)


def test_top_p_keeps_every_token_tied_at_the_cutoff():
    # Probabilities 0.4, 0.2, 0.2, 0.2 (and nothing else): top_p=0.5 must go into the tie.
    logits = np.full((1, V), -np.inf, np.float32)
    logits[0, :4] = np.log([0.4, 0.2, 0.2, 0.2])
    got = ours(logits, top_p=0.5)[0]
    want = hf_chain(logits[0], [], top_p=0.5)
    assert np.isfinite(want[:4]).sum() == 2, "transformers splits the tie"
    assert np.all(np.isfinite(got[:4])) and not np.any(np.isfinite(got[4:]))
    assert_same(got, want, top_p_ties=True)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.2, 0.9])
def test_min_p_matches_transformers(min_p):
    logits = make_logits()
    got = ours(logits, min_p=min_p)
    for b in range(len(logits)):
        assert_same(got[b], hf_chain(logits[b], [], min_p=min_p))
    if min_p == 0.0:
        np.testing.assert_array_equal(got, logits)


# One row per setting mix: (temperature, top_k, top_p, min_p, repetition_penalty).
MIXED = [
    (0.7, 40, 0.9, 0.0, 1.3),
    (1.0, 0, 1.0, 0.0, 1.0),
    (2.0, 5000, 0.95, 0.05, 1.0),
    (0.5, 10, 1.0, 0.1, 0.8),
    (1.3, 0, 0.6, 0.0, 1.3),
    (0.0, 20, 0.5, 0.3, 1.3),  # greedy: only the penalty applies
    (1.0, 3, 0.99, 0.02, 1.1),
    (0.9, 200, 0.8, 0.01, 1.0),
]


def mixed_params() -> dict[str, list]:
    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    return {name: [row[i] for row in MIXED] for i, name in enumerate(names)}


def test_mixed_batch_equals_transformers_row_by_row():
    logits = make_logits(seed=3)
    context, mask = make_context(len(logits), seed=4)
    got = ours(logits, context, mask, **mixed_params())
    for b, (t, k, p, mp, pen) in enumerate(MIXED):
        want = hf_chain(logits[b], context[b][mask[b]], temperature=t, top_k=k, top_p=p, min_p=mp, penalty=pen)
        assert_same(got[b], want, top_p_ties=len(np.unique(logits[b])) < V)
        # A row processed alone comes out the same as inside the mixed batch.
        alone = ours(
            logits[b : b + 1],
            context[b : b + 1],
            mask[b : b + 1],
            temperature=t,
            top_k=k,
            top_p=p,
            min_p=mp,
            repetition_penalty=pen,
        )
        np.testing.assert_array_equal(alone[0], got[b])


def _sample(logits, params, key, context=None, mask=None):
    if context is None:
        context = np.zeros((logits.shape[0], 1), np.int32)
        mask = np.zeros((logits.shape[0], 1), bool)
    tokens, logprobs = sample_jit(
        jnp.asarray(logits), params, key, context=jnp.asarray(context), context_mask=jnp.asarray(mask)
    )
    return np.asarray(tokens), np.asarray(logprobs)


def test_greedy_rows_take_the_penalized_argmax():
    logits = make_logits(seed=5)
    context, mask = make_context(len(logits), seed=6)
    logits[3] += 1.0  # the flat row, so that a penalized positive logit can fall below the rest
    logits[:, 11] = logits.max(axis=1) + 0.1  # the raw argmax, penalized in every context
    context[:, 0], mask[:, 0] = 11, True
    params = SamplingParams.make(len(logits), temperature=0.0, top_k=5, repetition_penalty=5.0)
    tokens, logprobs = _sample(logits, params, jax.random.key(0), context, mask)
    for b in range(len(logits)):
        penalized = hf_chain(logits[b], context[b][mask[b]], penalty=5.0)
        assert tokens[b] == int(torch.argmax(torch.tensor(penalized)))
        want = torch.log_softmax(torch.tensor(penalized), -1)[tokens[b]].item()
        np.testing.assert_allclose(logprobs[b], want, rtol=1e-5, atol=1e-5)
    assert np.sum(tokens != 11) >= 6, "the penalty should move most rows' argmax (all but the peaked row)"
    np.testing.assert_array_equal(_sample(logits, params, jax.random.key(99), context, mask)[0], tokens)


def test_same_key_same_tokens_and_rows_draw_independently():
    rng = np.random.default_rng(7)
    logits = np.tile(rng.normal(size=(1, V)).astype(np.float32) * 0.5, (16, 1))  # 16 identical rows
    params = SamplingParams.make(16, temperature=1.0, top_p=0.95)
    a, la = _sample(logits, params, jax.random.key(1))
    b, lb = _sample(logits, params, jax.random.key(1))
    c, _ = _sample(logits, params, jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert np.sum(a != c) >= 12, "different seeds should draw different tokens"
    assert len(set(a.tolist())) >= 12, "identical rows should draw independently"
    # Row i draws with fold_in(key, i): the same whatever the batch size; per-row keys work too.
    first, _ = _sample(logits[:1], SamplingParams.make(1, top_p=0.95), jax.random.key(1))
    assert first[0] == a[0]
    per_row = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(jnp.arange(16))
    np.testing.assert_array_equal(_sample(logits, params, per_row)[0], a)
    raw = jax.random.PRNGKey(1)  # legacy uint32 keys are accepted as well
    np.testing.assert_array_equal(_sample(logits, params, raw)[0], _sample(logits, params, raw)[0])


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.0, top_p=0.8),
        dict(temperature=1.5, min_p=0.1, repetition_penalty=1.5),
        dict(temperature=1.0, top_k=6, top_p=0.9, min_p=0.05),
    ],
)
def test_samples_follow_the_processed_distribution(settings):
    n, vocab = 20_000, 8
    row = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 1.2], np.float32)
    logits = np.tile(row, (n, 1))
    context = np.tile(np.array([[0, 3, 3]], np.int32), (n, 1))
    mask = np.ones_like(context, bool)
    params = SamplingParams.make(n, **settings)
    tokens, logprobs = _sample(logits, params, jax.random.key(3), context, mask)
    ref = hf_chain(row, [0, 3, 3], penalty=settings.get("repetition_penalty", 1.0), **_warpers(settings))
    probs = torch.softmax(torch.tensor(ref), -1).numpy().astype(np.float64)
    counts = np.bincount(tokens, minlength=vocab)
    assert np.all(counts[probs == 0] == 0), "a removed token was drawn"
    kept = probs > 0
    assert kept.sum() >= 2
    _, p_value = stats.chisquare(counts[kept], probs[kept] / probs[kept].sum() * n)
    assert p_value > 1e-3, (counts, probs * n)
    assert 0.5 * np.abs(counts / n - probs).sum() < 0.02
    np.testing.assert_allclose(logprobs, np.log(probs[tokens]), rtol=1e-5, atol=1e-5)


def _warpers(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != "repetition_penalty"}


def test_token_logprobs_matches_torch():
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(2, 5, 50)).astype(np.float32)
    tokens = rng.integers(0, 50, size=(2, 5))
    got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
    want = torch.log_softmax(torch.tensor(logits), -1).gather(-1, torch.tensor(tokens)[..., None])[..., 0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


top_jit = jax.jit(top_logprobs, static_argnums=1)


def test_top_logprobs_are_the_most_likely_of_the_distribution_sampled_from():
    """Against transformers' chain, in float64: the k most likely tokens of what each row draws
    from (filtered and renormalized; penalized only for the greedy row), the filtered-out ones
    reported as -inf, and the sampled token's log-prob equal to its entry there."""
    rng = np.random.default_rng(11)
    logits = (rng.normal(size=(len(MIXED), V)) * rng.uniform(0.5, 4, size=(len(MIXED), 1))).astype(np.float32)
    logits[2, 5] += 12  # a peaked row: top-p keeps few tokens
    context, mask = make_context(len(logits), seed=12)
    params = SamplingParams.make(len(logits), **mixed_params())
    k = 12
    processed = process(jnp.asarray(logits), params, context=jnp.asarray(context), context_mask=jnp.asarray(mask))
    ids, values = (np.asarray(x) for x in top_jit(processed, k))
    assert ids.shape == values.shape == (len(MIXED), k) and ids.dtype == np.int32
    tokens, logprobs = _sample(logits, params, jax.random.key(5), context, mask)
    kept_counts = []
    for b, (t, tk, p, mp, pen) in enumerate(MIXED):
        ref = hf_chain(logits[b], context[b][mask[b]], temperature=t, top_k=tk, top_p=p, min_p=mp, penalty=pen)
        ref = torch.log_softmax(torch.tensor(ref, dtype=torch.float64), -1).numpy()
        order = np.argsort(-ref, kind="stable")[:k]
        kept = np.isfinite(ref[order])
        kept_counts.append(int(kept.sum()))
        np.testing.assert_array_equal(ids[b][kept], order[kept])
        np.testing.assert_allclose(values[b][kept], ref[order][kept], rtol=1e-5, atol=1e-5)
        assert np.all(values[b][~kept] == -np.inf), "a filtered-out token was reported as an alternative"
        assert np.all(values[b][:-1] >= values[b][1:])  # most likely first
        if tokens[b] in ids[b]:
            assert values[b][list(ids[b]).index(tokens[b])] == pytest.approx(logprobs[b], abs=1e-6)
    greedy = [b for b, row in enumerate(MIXED) if row[0] == 0]
    assert greedy and all(ids[b][0] == tokens[b] for b in greedy)  # greedy's token is the first alternative
    assert min(kept_counts) < k <= max(kept_counts), "some row should keep fewer than k tokens, another more"


def test_top_logprobs_order_ties_by_id_and_check_k():
    flat = jnp.zeros((2, 10)).at[1, 7].set(1.0)
    ids, values = top_jit(flat, 4)
    np.testing.assert_array_equal(np.asarray(ids), [[0, 1, 2, 3], [7, 0, 1, 2]])
    np.testing.assert_allclose(np.asarray(values)[0], np.log(0.1), rtol=1e-6)
    greedy, _ = _sample(np.asarray(flat), SamplingParams.greedy(2), jax.random.key(0))
    np.testing.assert_array_equal(greedy, np.asarray(ids)[:, 0])  # argmax and top_k break ties alike
    for bad in (0, 11):
        with pytest.raises(ValueError, match=rf"k={bad} must be in \[1, 10\]"):
            top_logprobs(flat, bad)


def test_params_are_a_pytree_with_row_helpers():
    params = SamplingParams.make(3, temperature=[0.5, 1.0, 0.0], top_k=[1, 2, 3])
    assert params.batch_size == 3
    assert [leaf.shape for leaf in jax.tree.leaves(params)] == [(3,)] * 5
    replaced = jax.jit(lambda p, i, o: p.set_row(i, o))(params, 1, SamplingParams.make(1, temperature=0.3, top_k=9))
    np.testing.assert_allclose(np.asarray(replaced.temperature), [0.5, 0.3, 0.0])
    np.testing.assert_array_equal(np.asarray(replaced.top_k), [1, 9, 3])
    np.testing.assert_array_equal(np.asarray(params.top_k), [1, 2, 3])  # the original is untouched
    stacked = SamplingParams.stack([params.row(2), params.row(0)])
    np.testing.assert_array_equal(np.asarray(stacked.top_k), [3, 1])
    greedy = SamplingParams.greedy(2)
    np.testing.assert_array_equal(np.asarray(greedy.temperature), [0.0, 0.0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), r"temperature\[0\] = -0.1"),
        (dict(temperature=[1.0, float("nan")]), r"temperature\[1\]"),
        (dict(top_p=0.0), r"top_p\[0\] = 0 must be in \(0, 1\]"),
        (dict(top_p=[0.5, 1.5]), r"top_p\[1\] = 1.5"),
        (dict(min_p=1.0), r"min_p\[0\] = 1 must be in \[0, 1\)"),
        (dict(min_p=-0.1), r"min_p\[0\]"),
        (dict(top_k=-1), r"top_k\[0\] = -1 must be an integer >= 0"),
        (dict(top_k=2.5), r"top_k\[0\] = 2.5"),
        (dict(repetition_penalty=0.0), r"repetition_penalty\[0\] = 0 must be finite and > 0"),
        (dict(temperature=[1.0, 1.0, 1.0]), r"temperature has shape \(3,\) but batch is 2"),
    ],
)
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams.make(2, **kwargs)


def test_bad_calls_are_named():
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        SamplingParams.make(0)
    params = SamplingParams.make(2)
    with pytest.raises(ValueError, match="other must have batch 1"):
        params.set_row(0, params)
    with pytest.raises(ValueError, match="no rows"):
        SamplingParams.stack([])
    logits = jnp.zeros((2, 10))
    with pytest.raises(ValueError, match="both context and context_mask"):
        process_logits(logits, params, context=jnp.zeros((2, 3), jnp.int32), context_mask=None)
    with pytest.raises(ValueError, match=r"context \(3, 3\)"):
        process_logits(logits, params, context=jnp.zeros((3, 3), jnp.int32), context_mask=jnp.ones((3, 3), bool))
    with pytest.raises(ValueError, match="one PRNG key or 2 of them"):
        sample(logits, params, jax.random.split(jax.random.key(0), 3), context=None, context_mask=None)
