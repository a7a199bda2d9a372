"""The lm-evaluation-harness backend (``mpt_jax.eval.harness``) against lm-eval's own ``hf`` backend.

One random tiny MPT is converted once (``save_hf``, with a BPE trained on the fixture text) and
read by both backends. The fixture tasks (tests/fixtures/harness: multiple choice with two shots,
LAMBADA-style loglikelihood, wikitext-style loglikelihood_rolling, generate_until) run through
``lm_eval.simple_evaluate`` with ``model="mpt_jax"`` and ``model="hf"``; every request's
log-likelihood must agree within 1e-4 and every metric and generated text exactly.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import glob  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import lm_eval  # noqa: E402
import pytest  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from test_model_reference import random_params  # noqa: E402

import mpt_jax.eval  # noqa: E402, F401  (registers the backend)
from mpt_jax.config import MPTConfig  # noqa: E402
from mpt_jax.data.tokenizer import train_bpe  # noqa: E402
from mpt_jax.eval.harness import MPTJaxLM  # noqa: E402
from mpt_jax.hf import save_hf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "harness")
TASKS = ["mpt_jax_mc", "mpt_jax_lambada", "mpt_jax_rolling", "mpt_jax_gen"]
MAX_LENGTH = 64
TOL = 1e-4


def read_jsonl(name: str) -> list[dict]:
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def fixture_texts() -> list[str]:
    texts = []
    for path in sorted(glob.glob(os.path.join(FIXTURES, "*.jsonl"))):
        for doc in read_jsonl(os.path.basename(path)):
            for value in doc.values():
                texts += value if isinstance(value, list) else [str(value)]
    return texts


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """A converted checkpoint: random params of a config transformers' MptForCausalLM implements,
    written by save_hf with its tokenizer (ids exactly the model's vocabulary)."""
    tok = train_bpe(fixture_texts() * 4, 400, name="harness-bpe")
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=MAX_LENGTH, vocab_size=tok.vocab_size).validate()
    assert not cfg.hf_native_unsupported()
    out = str(tmp_path_factory.mktemp("harness") / "model")
    save_hf(cfg, random_params(cfg, seed=0), out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def ours(folder) -> MPTJaxLM:
    return MPTJaxLM(folder, batch_size=4)


@pytest.fixture(scope="module")
def theirs(folder) -> HFLM:
    return HFLM(pretrained=folder, device="cpu", dtype="float32", batch_size=1, max_length=MAX_LENGTH)


def evaluate(model: str, model_args: str, batch_size: int) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        task_manager=TaskManager(include_path=FIXTURES, include_defaults=False),
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
    )


@pytest.fixture(scope="module")
def both(folder) -> tuple[dict, dict]:
    """simple_evaluate through each backend by registry name, ours batched, theirs one at a time."""
    ours = evaluate("mpt_jax", f"pretrained={folder}", batch_size=4)
    theirs = evaluate("hf", f"pretrained={folder},dtype=float32,max_length={MAX_LENGTH}", batch_size=1)
    return ours, theirs


def samples(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def paired_responses(both, task: str):
    """(our response, their response, the request's arguments) for every request of ``task``."""
    ours, theirs = both
    for a, b in zip(samples(ours, task), samples(theirs, task), strict=True):
        assert a["doc_id"] == b["doc_id"] and a["arguments"] == b["arguments"]
        for args, ra, rb in zip(a["arguments"], a["resps"], b["resps"], strict=True):
            yield ra[0], rb[0], args


# ------------------------------------------------------------------------------------------------
# Registration


def test_registered_under_mpt_jax():
    assert get_model("mpt_jax") is MPTJaxLM
    assert get_model("hf") is HFLM  # lm-eval's own backends are still found


def test_importing_mpt_jax_eval_registers_lazily():
    """A fresh process: the name is there after ``import mpt_jax.eval`` while the backend module
    is not yet imported; lm-eval's own backends are listed too. Without lm-eval it imports all the same."""
    code = (
        "import sys, mpt_jax.eval\n"
        "assert 'mpt_jax.eval.harness' not in sys.modules\n"
        "from lm_eval.api.registry import get_model\n"
        "assert get_model('mpt_jax').__module__ == 'mpt_jax.eval.harness'\n"
        "assert get_model('hf').__name__ == 'HFLM'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
    # without lm-eval (an import of it fails) mpt_jax.eval still imports
    absent = "import sys\nsys.modules['lm_eval'] = None\nimport mpt_jax.eval\n"
    subprocess.run([sys.executable, "-c", absent], check=True, cwd=ROOT, timeout=300)


# ------------------------------------------------------------------------------------------------
# Requests, one backend against the other


def test_tokenization_is_the_hf_backends(ours, theirs):
    for text in ["Question: What?\nAnswer:", "  leading and trailing  ", "", "<|endoftext|>Hello there", "a\n\nb"]:
        assert ours.tok_encode(text) == theirs.tok_encode(text), text
    assert ours.prefix_token_id == theirs.prefix_token_id and ours.eot_token_id == theirs.eot_token_id
    pairs = [("The cat sat on the ", "mat"), ("Answer:", " yes"), ("Hello", " world ")]
    assert [ours._encode_pair(c, x) for c, x in pairs] == [theirs._encode_pair(c, x) for c, x in pairs]


def test_loglikelihood_requests_match_hf(ours, theirs):
    """Trailing whitespace moved onto the continuation, an empty context (the prefix token stands
    in), a context longer than max_length (cut on the left), a duplicate request."""
    long_context = " ".join(["the river ran past the old stone bridge"] * 12)
    assert len(ours.tok_encode(long_context)) > MAX_LENGTH
    args = [
        ("The sun rises in the ", "east"),
        ("", "Hello there"),
        (long_context, " and on to the sea"),
        ("Question: What do bees make?\nAnswer:", " honey"),
        ("Question: What do bees make?\nAnswer:", " honey"),
        ("A", "B"),
    ]
    requests = [Instance("loglikelihood", {}, a, i) for i, a in enumerate(args)]
    got, want = ours.loglikelihood(requests), theirs.loglikelihood(requests, disable_tqdm=True)
    for (s, g), (ws, wg), a in zip(got, want, args, strict=True):
        assert abs(s - ws) < TOL, (a, s, ws)
        assert g == wg, a


def test_generate_until_cuts_at_stop_strings_like_hf(ours, theirs):
    """A stop string taken from the greedy text itself: both backends cut there, and the text is
    what precedes it (the other context of the batch is cut wherever it holds the stop, if at all)."""
    contexts = ["Q: Where do fish live?\nA:", "Q: What color is grass?\nA:"]
    plain = {"until": [], "max_gen_toks": 10, "do_sample": False}
    free = ours.generate_until([Instance("generate_until", {}, (c, plain), i) for i, c in enumerate(contexts)])
    assert free == theirs.generate_until(
        [Instance("generate_until", {}, (c, plain), i) for i, c in enumerate(contexts)], disable_tqdm=True
    )
    # the first character after the start that is new there
    cut = next(k for k in range(1, len(free[0])) if free[0][k] not in free[0][:k])
    stop = free[0][cut]
    kwargs = {"until": [stop], "max_gen_toks": 10, "do_sample": False}
    requests = [Instance("generate_until", {}, (c, kwargs), i) for i, c in enumerate(contexts)]
    got = ours.generate_until(requests)
    assert got == theirs.generate_until(requests, disable_tqdm=True)
    assert got[0] == free[0][:cut]


def test_sampling_is_seeded_and_settings_are_checked(ours):
    context = "Q: What do cows drink?\nA:"
    sample = {"until": ["\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0, "top_k": 50}
    first = ours.generate_until([Instance("generate_until", {}, (context, sample), 0)])
    assert first == ours.generate_until([Instance("generate_until", {}, (context, sample), 0)])
    with pytest.raises(ValueError, match="do_sample=True needs temperature > 0"):
        ours.generate_until([Instance("generate_until", {}, (context, {"do_sample": True}), 0)])
    with pytest.raises(ValueError, match=r"generation_kwargs \['num_beams'\] are not supported"):
        ours.generate_until([Instance("generate_until", {}, (context, {"num_beams": 2}), 0)])
    with pytest.raises(ValueError, match="max_gen_toks=64 leaves no room"):
        ours.generate_until([Instance("generate_until", {}, (context, {"max_gen_toks": MAX_LENGTH}), 0)])


def test_model_args_are_checked(folder):
    with pytest.raises(ValueError, match=r"unknown model_args \['revison'\]"):
        MPTJaxLM(folder, revison="main")
    with pytest.raises(ValueError, match="batch_size=0"):
        MPTJaxLM(folder, batch_size=0)
    with pytest.raises(ValueError, match="dtype='int8'"):
        MPTJaxLM(folder, dtype="int8")
    with pytest.raises(FileNotFoundError):
        MPTJaxLM(os.path.join(folder, "missing"))
    lm = get_model("mpt_jax").create_from_arg_string(
        f"pretrained={folder},dtype=auto,max_length=32", {"batch_size": "auto", "max_batch_size": 2, "device": "cpu"}
    )
    assert (lm.batch_size, lm.max_length) == (2, 32)
    assert MPTJaxLM(folder, max_length=2 * MAX_LENGTH).cfg.max_seq_len == 2 * MAX_LENGTH  # ALiBi runs past it


# ------------------------------------------------------------------------------------------------
# The fixture tasks through simple_evaluate


@pytest.mark.slow
def test_multiple_choice_and_loglikelihood_tasks_match_hf(both, ours):
    ours_results, theirs_results = both
    n = 0
    for task in ("mpt_jax_mc", "mpt_jax_lambada"):
        for (s, g), (ws, wg), _ in paired_responses(both, task):
            assert abs(s - ws) < TOL and g == wg, (task, s, ws)
            n += 1
    assert n == sum(len(doc["choices"]) for doc in read_jsonl("mc.jsonl")) + len(read_jsonl("lambada.jsonl"))
    for task, metrics in (("mpt_jax_mc", ("acc,none", "acc_norm,none")), ("mpt_jax_lambada", ("acc,none",))):
        for metric in metrics:
            assert ours_results["results"][task][metric] == theirs_results["results"][task][metric], (task, metric)
    perplexity = "perplexity,none"
    a, b = (
        ours_results["results"]["mpt_jax_lambada"][perplexity],
        theirs_results["results"]["mpt_jax_lambada"][perplexity],
    )
    assert abs(a - b) <= 1e-4 * b
    # The fixtures reach what they are there for: contexts cut to max_length, an empty context.
    contexts = [args[0] for _, _, args in paired_responses(both, "mpt_jax_mc")]
    assert max(len(ours.tok_encode(c)) for c in contexts) > MAX_LENGTH
    assert "" in [args[0] for _, _, args in paired_responses(both, "mpt_jax_lambada")]


@pytest.mark.slow
def test_rolling_task_matches_hf(both, ours):
    ours_results, theirs_results = both
    pages = []
    for got, want, args in paired_responses(both, "mpt_jax_rolling"):
        assert abs(got - want) < TOL, (got, want)
        pages.append(args[0])
    assert max(len(ours.tok_encode(p)) for p in pages) > 2 * MAX_LENGTH  # several windows
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        a, b = ours_results["results"]["mpt_jax_rolling"][metric], theirs_results["results"]["mpt_jax_rolling"][metric]
        assert abs(a - b) <= 1e-4 * abs(b), (metric, a, b)


@pytest.mark.slow
def test_generate_until_task_matches_hf(both):
    ours_results, theirs_results = both
    texts = [(got, want) for got, want, _ in paired_responses(both, "mpt_jax_gen")]
    assert len(texts) == 6 and all(got == want for got, want in texts), texts
    assert any(got for got, _ in texts)
    metric = "exact_match,none"
    assert ours_results["results"]["mpt_jax_gen"][metric] == theirs_results["results"]["mpt_jax_gen"][metric]


# ------------------------------------------------------------------------------------------------
# The CLI


@pytest.mark.slow
def test_harness_cli_prints_the_table_and_writes_results_once(folder, tmp_path):
    """`python -m mpt_jax.eval harness`: lm-eval's table on stdout, the results JSON written once;
    the same --output again and an unknown task are one-line errors."""
    out = str(tmp_path / "results.json")
    cmd = [sys.executable, "-m", "mpt_jax.eval", "harness", f"--model={folder}", f"--include_path={FIXTURES}"]
    # lm-eval's stderr bootstrap forks a process pool (JAX warns about forks): skipped here
    argv = [*cmd, "--tasks=mpt_jax_lambada", "--limit=3", f"--output={out}", "--bootstrap_iters=0"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mpt_jax_lambada" in done.stdout and "perplexity" in done.stdout
    with open(out, encoding="utf-8") as f:
        written = json.load(f)
    assert 0.0 <= written["results"]["mpt_jax_lambada"]["acc,none"] <= 1.0
    assert written["config"]["model"] == "mpt_jax"
    before = os.path.getmtime(out)
    again = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 1 and "results are never overwritten" in again.stderr
    assert os.path.getmtime(out) == before
    bad = subprocess.run([*cmd, "--tasks=no_such_task"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "unknown tasks ['no_such_task']" in bad.stderr
