"""LLM Foundry's ICL tasks: prompts, token ids and metrics against llm-foundry's own classes.

``fixtures/icl/llmfoundry_prompts.json`` was written by ``tests/llmfoundry_icl_reference.py``
with llm-foundry 0.22 (0.8.0 for code evaluation) on our fixture files, for two tokenizers (a
GPT-NeoX-style BPE and a SentencePiece-style one that adds BOS), several prompt settings,
num_fewshot 0/1/2/3 and three seeds. Metrics are also computed by hand from chosen log-probs.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import tokenizers

from mpt_jax.data.tokenizer import Tokenizer
from mpt_jax.eval import icl

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "icl")
REFERENCE = os.path.join(FIXTURES, "llmfoundry_prompts.json")


@pytest.fixture(scope="module")
def reference() -> dict:
    with open(REFERENCE, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def toks(reference) -> dict[str, Tokenizer]:
    return {
        name: Tokenizer(
            tokenizers.Tokenizer.from_str(spec["json"]),
            name=name,
            eos_token=spec["eos_token"],
            special_tokens={"bos_token": spec["bos_token"], "pad_token": spec["pad_token"]},
        )
        for name, spec in reference["tokenizers"].items()
    }


def case_task(case: dict) -> icl.ICLTask:
    return icl.ICLTask.from_dict(dict(case["task"], max_seq_len=case["max_seq_len"]), base_dir=FIXTURES)


def prepared_cases(reference, toks):
    """(case, our evaluation, LLM Foundry's record) for every recorded evaluation."""
    out = []
    for case in reference["cases"]:
        subs = icl.prepare(case_task(case), toks[case["tokenizer"]])
        records = {(r["num_fewshot"], r["category"]): r for r in reference["results"] if r["case"] == case["name"]}
        assert {(s.num_fewshot, s.row_category) for s in subs} == set(records), case["name"]
        out += [(case, s, records[s.num_fewshot, s.row_category]) for s in subs]
    return out


def test_reference_covers_every_format_and_setting(reference):
    kinds = {c["task"]["icl_task_type"] for c in reference["cases"]}
    assert kinds == set(icl.TASK_TYPES)
    shots = {r["num_fewshot"] for r in reference["results"]}
    assert {0, 1, 3} <= shots
    assert {r["prefix_space"] for r in reference["results"]} == {True, False}  # both tokenizer styles
    assert any(r["category"] for r in reference["results"])  # has_categories


def test_prompts_and_token_ids_equal_llmfoundry(reference, toks):
    """Preamble (prompt string + few-shot examples), context string(s), and per request the
    context and continuation ids, for every format, tokenizer, num_fewshot and seed."""
    n = 0
    for case, sub, ref in prepared_cases(reference, toks):
        where = f"{case['name']} {sub.label}"
        assert sub.prefix_space == ref["prefix_space"], where
        assert len(sub.examples) == len(ref["examples"]), where
        for ex, want in zip(sub.examples, ref["examples"], strict=True):
            at = f"{where} example {ex.index}"
            assert ex.preamble == want["preamble"], at
            assert ex.context == want["context"], at
            if "requests" in want:
                assert [[list(c), list(k)] for c, k in ex.requests] == want["requests"], at
                assert ex.gold == want.get("gold"), at
            else:
                assert ex.prompt_ids == want["prompt_ids"], at
            if "aliases" in want:
                assert sorted(set(ex.answers)) == want["aliases"], at
            if "prompt_text" in want:
                assert (ex.prompt, ex.entry_point) == (want["prompt_text"], want["entry_point"]), at
            n += 1
        if "generation_kwargs" in ref:
            assert sub.max_new_tokens == ref["generation_kwargs"]["max_new_tokens"], where
        if "stopping_criteria" in ref:
            assert sub.stop == list(ref["stopping_criteria"] or []), where
        if case["task"]["icl_task_type"] == "code_evaluation":
            assert sub.sampling["temperature"] == ref["generation_kwargs"]["temperature"], where
    assert n == sum(len(r["examples"]) for r in reference["results"]) == 276


def test_fewshot_examples_depend_on_seed_and_exclude_the_example(reference, toks):
    case = next(c for c in reference["cases"] if c["name"] == "lm_default")
    task = case_task(case)
    seven = icl.prepare(icl.ICLTask.from_dict(dict(case["task"], fewshot_random_seed=7, num_fewshot=[3]),
                                              base_dir=FIXTURES), toks["bpe"], 256)[0]  # fmt: skip
    three = [s for s in icl.prepare(task, toks["bpe"]) if s.num_fewshot == 3][0]
    assert [e.preamble for e in seven.examples] != [e.preamble for e in three.examples]
    for ex in three.examples:
        own = f"{ex.row.data['context'].strip()} {ex.row.data['continuation'].strip()}"
        assert own not in ex.preamble
        assert ex.preamble.count("\n") == 2  # three examples, two delimiters
    # Wrap-around in CPython's set order: more than 8 rows, so iteration is not sorted.
    import random

    rng = random.Random(1234)
    orders = [list(icl.fewshot_indices(11, 3, i, rng)) for i in range(11)]
    assert any(o != sorted(o) for o in orders)
    assert all(i not in o and len(o) == 3 for i, o in enumerate(orders))
    assert icl.fewshot_indices(2, 5, 0, random.Random(0)) == {1}


def _fake_loglikelihood(scores: dict):
    def loglikelihood(requests):
        return [tuple(scores[tuple(c), tuple(k)]) for c, k in requests]

    return loglikelihood


def test_loglikelihood_metrics_equal_llmfoundry(reference, toks):
    """LM accuracy, MC and schema accuracy from the same bigram-model scores as LLM Foundry's own
    metric classes computed from the logits (MC: mean log-prob per token, not the sum)."""
    for case, sub, ref in prepared_cases(reference, toks):
        if sub.task.icl_task_type not in icl.LOGLIKELIHOOD_TYPES:
            continue
        flat = [tuple(map(tuple, r)) for e in ref["examples"] for r in e["requests"]]
        fake = _fake_loglikelihood(dict(zip(flat, ref["scores"], strict=True)))
        result = icl.evaluate(sub, loglikelihood=fake)
        assert result.results == ref["results"], (case["name"], sub.label)
        assert result.values["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-6)
        assert result.metric == icl.METRIC_NAMES[sub.task.icl_task_type]


def test_generation_and_code_metrics_equal_llmfoundry(reference, toks):
    """Exact match (stop strings, CoT delimiter, normalization or not) and pass@k from the same
    fake outputs as LLM Foundry's metrics (code: 0.8.0's, with a check that passes the prompt
    plus the canonical solution)."""
    for case, sub, ref in prepared_cases(reference, toks):
        kind = sub.task.icl_task_type
        if kind in icl.LOGLIKELIHOOD_TYPES:
            continue
        n = sub.task.generations_per_sample
        calls = []
        generate = _replay([e["prompt_ids"] for e in ref["examples"] for _ in range(n)], ref["outputs"], calls)
        result = icl.evaluate(sub, generate=generate, check=_check_by_solution)  # sandbox.pass_at_k
        assert result.results == ref["results"], (case["name"], sub.label)
        assert calls == [(sub.max_new_tokens, sub.stop, sub.sampling["temperature"])]
        if kind == "code_evaluation":
            assert result.values == pytest.approx(ref["pass_at_k"], abs=1e-6)
        else:
            assert result.values["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-6)


def _replay(prompts: list, outputs: list[str], calls: list):
    """A fake ``generate`` that expects ``prompts`` (one seed each) and answers ``outputs``."""

    def generate(got, *, max_new_tokens, stop, temperature, top_p, top_k, seed):
        assert got == prompts and len(seed) == len(set(seed)) == len(got)
        calls.append((max_new_tokens, stop, temperature))
        return list(outputs)

    return generate


def _check_by_solution(prompt, completion, entry_point, test_inputs, test_outputs):
    """A check that runs nothing: the program the sandbox would build (the completion cut at its
    end) must be the prompt plus the canonical solution, trailing whitespace aside."""
    from mpt_jax.eval.sandbox import build_program

    row = next(r for r in _rows("code_evaluation.jsonl") if r["entry_point"] == entry_point)
    return build_program(prompt, completion).rstrip() == (row["prompt"] + row["canonical_solution"]).rstrip()


def _pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator, by hand: 1 - C(n - c, k) / C(n, k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _rows(name: str) -> list[dict]:
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -- hand computations ------------------------------------------------------------------------------


def _write(tmp_path, name: str, rows: list) -> str:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _by_text(tok, table: dict[str, tuple[float, bool]]):
    """A fake model: a request's score chosen by its continuation's text."""

    def loglikelihood(requests):
        return [table[tok.decode(k).strip()] for _, k in requests]

    return loglikelihood


def test_accuracy_by_hand_language_modeling(tmp_path, toks):
    tok = toks["bpe"]
    path = _write(
        tmp_path, "lm.jsonl", [{"context": f"The {w} is", "continuation": w} for w in ("red", "blue", "green")]
    )
    task = icl.ICLTask("lm", path, "language_modeling", num_fewshot=(0, 1))
    fake = _by_text(tok, {"red": (-1.0, True), "blue": (-0.5, False), "green": (-9.0, True)})
    res = icl.run_tasks([task], fake, None, None, tok, max_seq_len=64)
    assert [r.values["accuracy"] for r in res.tasks] == [2 / 3, 2 / 3]  # greedy: red, green
    assert res.tasks[0].results == [1, 0, 1]


def test_accuracy_by_hand_multiple_choice_uses_mean_per_token(tmp_path, toks):
    tok = toks["bpe"]
    long_choice = "a very long and winding answer"
    rows = [
        {"query": "Q1?", "choices": [long_choice, "x"], "gold": 0},
        {"query": "Q2?", "choices": ["yes", "no", "maybe"], "gold": 2},
        {"query": "Q3?", "choices": ["up", "down"], "gold": 0},
    ]
    path = _write(tmp_path, "mc.jsonl", rows)
    n_long = len(tok.encode(" " + long_choice))
    assert n_long >= 4 and len(tok.encode(" x")) == 1
    means = {
        long_choice: -1.0,  # mean -1 beats "x"'s -3, though its sum (-n_long) is lower
        "x": -3.0,
        "yes": -2.0,
        "no": -1.0,
        "maybe": -1.5,  # "no" wins: wrong
        "up": -2.0,
        "down": -2.0,  # a tie goes to the first: right
    }
    table = {text: (m * len(tok.encode(" " + text)), False) for text, m in means.items()}
    assert table[long_choice][0] < table["x"][0]
    task = icl.ICLTask("mc", path, "multiple_choice", continuation_delimiter=" A:")
    res = icl.run_tasks([task], _by_text(tok, table), None, None, tok, max_seq_len=64)
    assert res.tasks[0].results == [1, 0, 1]
    assert res.tasks[0].values["accuracy"] == pytest.approx(2 / 3)


def test_accuracy_by_hand_schema(tmp_path, toks):
    tok = toks["bpe"]
    rows = [
        {"context_options": ["Ann hid because Ann", "Ann hid because Bob"], "continuation": "was scared.", "gold": 0},
        {"context_options": ["It broke as it", "It broke as the wall"], "continuation": "was weak.", "gold": 1},
    ]
    path = _write(tmp_path, "schema.jsonl", rows)
    scores = {
        "Ann hid because Ann": -3.0,
        "Ann hid because Bob": -2.0,
        "It broke as it": -4.0,
        "It broke as the wall": -1.0,
    }

    def loglikelihood(requests):  # the context option decides the score (the continuation is shared)
        out = []
        for c, _ in requests:
            text = tok.decode(c).strip()
            out.append((next(v for k, v in scores.items() if text.endswith(k)), False))
        return out

    res = icl.run_tasks([icl.ICLTask("s", path, "schema")], loglikelihood, None, None, tok, max_seq_len=64)
    assert res.tasks[0].results == [0, 1]


def test_accuracy_by_hand_generation(tmp_path, toks):
    tok = toks["bpe"]
    rows = [
        {"context": "Q: sky?", "answer": "blue", "aliases": ["azure"]},
        {"context": "Q: capital of France?", "answer": "Paris", "aliases": []},
        {"context": "Q: two plus two?", "answer": "4", "aliases": ["four"]},
        {"context": "Q: author of Hamlet?", "answer": "Shakespeare", "aliases": []},
    ]
    path = _write(tmp_path, "gen.jsonl", rows)
    outputs = [" The Azure!\nQ: next", " paris, France", " 5", " shakes"]  # right, right (prefix), wrong, wrong
    task = icl.ICLTask("g", path, "generation_task_with_answers", early_stopping_criteria=("\n",))

    def generate(prompts, **kw):
        assert kw["temperature"] == 0.0 and kw["stop"] == ["\n"]
        return outputs

    res = icl.run_tasks([task], None, generate, None, tok, max_seq_len=64)
    assert res.tasks[0].results == [1, 1, 0, 0]
    assert icl.normalize_answer("  The_Quick, `brown´ fox!  ") == "quick brown fox"
    assert not icl.exact_match("Blue", ["blue"], normalize=False)
    assert icl.exact_match("so #### 12 apples", ["12"], cot_delimiter=" #### ", normalize=False)


def test_pass_at_k_by_hand(tmp_path, toks):
    tok = toks["bpe"]
    rows = _rows("code_evaluation.jsonl")[:2]
    path = _write(tmp_path, "code.jsonl", rows)
    task = icl.ICLTask("c", path, "code_evaluation", generations_per_sample=3, pass_at_k=(1, 2))
    good = [r["canonical_solution"] + "\nprint('cut here')" for r in rows]
    outputs = [good[0], "    return 0\n", good[0], "    pass\n", "    pass\n", good[1]]  # 2/3 and 1/3 right

    def generate(prompts, **kw):
        assert kw["temperature"] == 0.2 and kw["top_k"] == 50 and len(prompts) == 6
        return outputs

    by_hand = icl.run_tasks([task], None, generate, _check_by_solution, tok, max_seq_len=256, pass_at_k=_pass_at_k)
    r = by_hand.tasks[0]
    assert r.results == [1, 0, 1, 0, 0, 1]
    assert r.values["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert r.values["pass@2"] == pytest.approx((1.0 + (1 - 1 / 3)) / 2)  # C(1,2)=0; 1 - C(2,2)/C(3,2)
    default = icl.run_tasks([task], None, generate, _check_by_solution, tok, max_seq_len=256)  # sandbox.pass_at_k
    assert default.tasks[0].values == pytest.approx(r.values)


def test_code_evaluation_with_the_sandbox(tmp_path, toks):
    """The sandbox's real check (programs run in child processes) and pass@k."""
    from mpt_jax.eval import sandbox

    rows = _rows("code_evaluation.jsonl")[:2]
    path = _write(tmp_path, "code.jsonl", rows)
    task = icl.ICLTask("c", path, "code_evaluation", generations_per_sample=2, pass_at_k=(1,))
    outputs = [rows[0]["canonical_solution"] + "\ndef extra():\n", "    return a - b\n", rows[1]["canonical_solution"],
               "    return True\n"]  # fmt: skip
    res = icl.run_tasks([task], None, lambda p, **kw: outputs, sandbox.check_program, toks["bpe"], max_seq_len=256)
    assert res.tasks[0].results == [1, 0, 1, 0]
    assert res.tasks[0].values["pass@1"] == pytest.approx(0.5)


# -- running, reporting ------------------------------------------------------------------------------


def test_run_tasks_categories_table_json_and_metrics(tmp_path, toks):
    tok = toks["bpe"]
    lm = icl.ICLTask.from_dict(
        {"label": "lm", "dataset_uri": "language_modeling.jsonl", "icl_task_type": "language_modeling",
         "num_fewshot": [0, 1], "category": "language"}, base_dir=FIXTURES)  # fmt: skip
    mc = icl.ICLTask.from_dict(
        {"label": "mmlu", "dataset_uri": "multiple_choice_categories.jsonl", "icl_task_type": "multiple_choice",
         "num_fewshot": [1], "has_categories": True, "category": "knowledge"}, base_dir=FIXTURES)  # fmt: skip

    def loglikelihood(requests):  # greedy on every other request; shorter choices score higher
        return [(-float(len(k)), i % 2 == 0) for i, (_, k) in enumerate(requests)]

    res = icl.run_tasks([lm, mc], loglikelihood, None, None, tok, max_seq_len=128, limit=3)
    labels = [r.label for r in res.tasks]
    assert labels == ["lm/0-shot", "lm/1-shot", "mmlu/1-shot/arithmetic", "mmlu/1-shot/geography"]
    assert all(r.examples == 3 for r in res.tasks)
    lm_mean = (res.tasks[0].value + res.tasks[1].value) / 2
    mmlu_mean = (res.tasks[2].value + res.tasks[3].value) / 2
    assert res.categories == pytest.approx({"knowledge": mmlu_mean, "language": lm_mean})
    metrics = icl.flat_metrics(res)
    assert metrics["icl/lm/0-shot/accuracy"] == res.tasks[0].value
    assert metrics["icl/mmlu/1-shot/geography/accuracy"] == res.tasks[3].value
    assert metrics["icl/category/knowledge"] == pytest.approx(mmlu_mean)
    table = icl.results_table(res)
    assert "| mmlu/1-shot/arithmetic | multiple_choice | knowledge | accuracy |" in table
    assert "| language |" in table
    out = icl.write_results(res, str(tmp_path / "r" / "icl.json"))
    with open(out, encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(res.as_dict()))
    with pytest.raises(FileExistsError):
        icl.write_results(res, out)


def test_generator_fn_adapts_a_generator():
    class Completion:
        def __init__(self, text):
            self.text = text

    class FakeGenerator:
        def generate(self, prompts, **kw):
            self.kw = kw
            return [Completion(f"out{len(p)}") for p in prompts]

    gen = FakeGenerator()
    fn = icl.generator_fn(gen)
    assert fn([[1, 2], [3]], max_new_tokens=4, stop=[], temperature=0.0, top_p=1.0, top_k=0, seed=[0, 1]) == [
        "out2",
        "out1",
    ]
    assert gen.kw == dict(max_new_tokens=4, stop=None, temperature=0.0, top_p=1.0, top_k=0, seed=[0, 1])


def test_tasks_from_config(tmp_path):
    cfg = {"icl_tasks": [
        {"label": "a", "dataset_uri": "language_modeling.jsonl", "icl_task_type": "language_modeling",
         "num_fewshot": [0, 5], "question_prelimiter": "Q: "},
    ]}  # fmt: skip
    (task,) = icl.tasks_from_config(cfg, base_dir=FIXTURES)
    assert task.num_fewshot == (0, 5) and task.prelimiter == "Q: "
    assert task.dataset_uri == os.path.join(FIXTURES, "language_modeling.jsonl")
    with pytest.raises(ValueError, match="'a' appears twice"):
        icl.tasks_from_config(cfg["icl_tasks"] * 2)
    import ml_collections

    assert icl.tasks_from_config(ml_collections.ConfigDict(cfg), base_dir=FIXTURES) == [task]


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, rows, match",
    [
        ("multiple_choice", ['{"query": "q", "choices": ["a"], "gold": 0}', "{not json"], r"mc\.jsonl: line 2: not valid JSON"),
        ("multiple_choice", [{"query": "q", "choices": ["a", "b"]}], r"line 1: missing key 'gold'"),
        ("multiple_choice", [{"query": "q", "choices": ["a", "b"], "gold": 2}], r"line 1: gold=2 is not an index"),
        ("multiple_choice", [{"query": "q", "choices": "a", "gold": 0}], r"line 1: 'choices' must be a list of strings"),
        ("schema", [{"context_options": ["a"], "gold": 0}], r"line 1: missing key 'continuation'"),
        ("language_modeling", ["", {"context": 3, "continuation": "x"}], r"line 2: 'context' must be a string"),
        ("generation_task_with_answers", [{"context": "c", "answer": "a", "chain_of_thought": "t"},
                                          {"context": "c", "answer": "b"}], r"line 2: missing key 'chain_of_thought'"),
        ("generation_task_with_answers", [{"context": "c", "answer": "a", "aliases": "b"}], r"'aliases' must be a list"),
        ("code_evaluation", [{"prompt": "p", "entry_point": "f", "canonical_solution": "s", "test_inputs": ["1"],
                              "test_outputs": []}], r"line 1: 1 test_inputs for 0 test_outputs"),
        ("code_evaluation", [{"prompt": "p", "entry_point": "f", "canonical_solution": "s", "test_inputs": ["(1,)"],
                              "test_outputs": ["1"], "language": "c++"}], r"only python"),
        ("language_modeling", [], r"no examples"),
    ],
)  # fmt: skip
def test_bad_task_files_are_named_errors(tmp_path, toks, kind, rows, match):
    path = _write(tmp_path, "mc.jsonl", rows)
    with pytest.raises(ValueError, match=match) as e:
        icl.prepare(icl.ICLTask("t", path, kind), toks["bpe"], 64)
    assert path in str(e.value)


def test_bad_task_configs_are_named_errors(tmp_path, toks):
    with pytest.raises(FileNotFoundError, match="no task file at /nowhere.jsonl"):
        icl.prepare(icl.ICLTask("t", "/nowhere.jsonl", "language_modeling"), toks["bpe"], 64)
    with pytest.raises(ValueError, match="icl_task_type='qa' is not one of"):
        icl.ICLTask("t", "x.jsonl", "qa")
    with pytest.raises(ValueError, match=r"unknown keys \['metric_name'\]"):
        icl.ICLTask.from_dict({"label": "t", "dataset_uri": "x", "icl_task_type": "schema", "metric_name": "x"})
    with pytest.raises(ValueError, match="cot_delimiter is an option of generation_task_with_answers"):
        icl.ICLTask("t", "x", "multiple_choice", cot_delimiter="###")
    with pytest.raises(ValueError, match=r"generations_per_sample=1 must be at least max\(pass_at_k\)=5"):
        icl.ICLTask("t", "x", "code_evaluation", pass_at_k=(1, 5))
    with pytest.raises(ValueError, match="num_beams=4: only 1"):
        icl.ICLTask("t", "x", "generation_task_with_answers", generation_kwargs={"num_beams": 4})
    with pytest.raises(ValueError, match="only local jsonl"):
        icl.ICLTask.from_dict({"label": "t", "dataset_uri": "hf://a/b", "icl_task_type": "schema"})
    path = _write(tmp_path, "cat.jsonl", [{"query": "q", "choices": ["a"], "gold": 0}])
    with pytest.raises(ValueError, match=r"cat\.jsonl: line 1: has_categories=True needs a string 'category'"):
        icl.prepare(icl.ICLTask("t", path, "multiple_choice", has_categories=True), toks["bpe"], 64)
    lm = _write(tmp_path, "lm.jsonl", [{"context": "a b c d e f", "continuation": "g h i j"}])
    with pytest.raises(ValueError, match=r"lm\.jsonl: line 1: a continuation of \d+ tokens leaves no room"):
        icl.prepare(icl.ICLTask("t", lm, "language_modeling"), toks["bpe"], 3)
    with pytest.raises(ValueError, match="need loglikelihood"):
        icl.run_tasks([icl.ICLTask("t", lm, "language_modeling")], None, None, None, toks["bpe"], max_seq_len=64)
    with pytest.raises(ValueError, match="no max_seq_len"):
        icl.prepare(icl.ICLTask("t", lm, "language_modeling"), toks["bpe"])


@pytest.mark.slow
def test_with_our_scorer_generator_and_sandbox(toks):
    """Every format end to end on a tiny random model: the Scorer's loglikelihood, a Generator
    through ``generator_fn`` (token-id prompts, one seed per prompt, stop strings) and the
    sandbox; the metrics agree with the model's own scores and generations."""
    import jax
    import jax.numpy as jnp
    from test_model_reference import make_cfg, random_params

    from mpt_jax.eval import sandbox
    from mpt_jax.eval.scoring import Scorer
    from mpt_jax.generate import Generator

    tok = toks["bpe"]
    cfg = make_cfg(vocab_size=tok.vocab_size, max_seq_len=128)
    params = jax.tree.map(jnp.asarray, random_params(cfg, seed=1))
    scorer, gen = Scorer(cfg, params, batch_size=8), Generator(cfg, params, tok, max_batch=4)
    names = ("lm_default", "mc", "schema", "gen", "code")
    tasks = [
        icl.ICLTask.from_dict(
            dict(c["task"], num_fewshot=[1], **(_CODE_2 if c["name"] == "code" else {})), base_dir=FIXTURES
        )
        for c in _reference_cases()
        if c["name"] in names
    ]
    generate = icl.generator_fn(gen)
    res = icl.run_tasks(tasks, scorer.loglikelihood, generate, sandbox.check_program, tok, max_seq_len=128, limit=2)
    assert [r.label for r in res.tasks] == ["lm/1-shot", "mc/1-shot", "schema/1-shot", "gen/1-shot", "code/1-shot"]
    subs = {s.task.label: s for t in tasks for s in icl.prepare(t, tok, 128)}
    # language modeling and multiple choice: what the scores say
    lm = subs["lm"].examples[:2]
    assert res.tasks[0].results == [int(g) for _, g in scorer.loglikelihood([e.requests[0] for e in lm])]
    mc = subs["mc"].examples[:2]
    picks = [
        icl.best_choice([s for s, _ in scorer.loglikelihood(e.requests)], [len(k) for _, k in e.requests]) for e in mc
    ]
    assert res.tasks[1].results == [int(p == e.gold) for p, e in zip(picks, mc, strict=True)]
    # generation: greedy text of the same token-id prompts, cut at the stop strings
    g = subs["gen"]
    texts = [c.text for c in gen.generate([e.prompt_ids for e in g.examples[:2]], max_new_tokens=g.max_new_tokens,
                                         temperature=0.0, stop=g.stop)]  # fmt: skip
    want = [int(icl.exact_match(t, e.answers, stop=g.stop)) for t, e in zip(texts, g.examples, strict=False)]
    assert res.tasks[3].results == want
    assert res.tasks[4].values["pass@1"] == 0.0  # a random model writes no passing code
    assert len(res.tasks[4].results) == 2 * 2


_CODE_2 = {"generations_per_sample": 2, "pass_at_k": [1, 2]}


def _reference_cases() -> list[dict]:
    with open(REFERENCE, encoding="utf-8") as f:
        return json.load(f)["cases"]
