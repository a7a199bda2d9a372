"""Records how LLM Foundry builds and scores ICL tasks on our fixtures (run by hand, in its venv).

llm-foundry pins torch 2.7 and transformers 4.51, so it lives in its own venv. ``code_evaluation``
was removed from LLM Foundry in 0.9; its last implementation, 0.8.0's, is read from that
release's wheel (only downloaded, never installed):

    python3 -m venv /tmp/lf && /tmp/lf/bin/pip install llm-foundry==0.22.0
    /tmp/lf/bin/pip download llm-foundry==0.8.0 --no-deps -d /tmp/lf08
    /tmp/lf/bin/python tests/llmfoundry_icl_reference.py \
        --llmfoundry08_wheel=/tmp/lf08/llm_foundry-0.8.0-py3-none-any.whl

It writes ``tests/fixtures/icl/llmfoundry_prompts.json``, which ``tests/test_icl.py`` compares
``mpt_jax.eval.icl`` with. For each case (a task config in LLM Foundry's keys, a tokenizer and a
``max_seq_len``) and each ``num_fewshot`` (and each category of a ``has_categories`` task) it holds:

- what LLM Foundry's dataset class passed to ``tokenize_example`` per example (the prompt string
  and few-shot examples, and the example's own context string or strings), and the token ids it
  produced: per request the context ids (trimmed as LLM Foundry trims them) and the continuation
  ids, or for generation tasks the prompt ids, the answers and ``max_new_tokens``;
- scores from a fixed random bigram "model" (logits of a position depend on its token only):
  each request's continuation log-prob sum and greediness, computed from those logits, and the
  accuracy LLM Foundry's own metric class computes from the same logits;
- for generation and code tasks, fixed fake model outputs and the exact match / pass@k that LLM
  Foundry's metric computes from them (code: a stub eval client that passes a program when it is
  the prompt plus the canonical solution, whitespace at the end aside).

The two tokenizers are built here (no hub): ``bpe``, a GPT-2/NeoX-style byte-level BPE (a leading
space is part of a word: LLM Foundry adds one before continuations), and ``sp``, a
SentencePiece-style Metaspace BPE that adds ``<s>`` to the text it encodes with special tokens (no
prefix space; the prompt's first id is BOS). Their ``tokenizer.json`` is stored in the output.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import types
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "icl")
OUT = os.path.join(FIXTURES, "llmfoundry_prompts.json")

# Tasks in LLM Foundry's own keys (what its eval yaml's icl_tasks entries hold).
CASES: list[dict] = [
    dict(
        name="lm_default",
        tokenizer="bpe",
        max_seq_len=256,
        task=dict(
            label="lm", dataset_uri="language_modeling.jsonl", icl_task_type="language_modeling", num_fewshot=[0, 1, 3]
        ),
    ),
    dict(
        name="lm_prompt_trimmed",
        tokenizer="bpe",
        max_seq_len=40,
        task=dict(
            label="lm_prompt",
            dataset_uri="language_modeling.jsonl",
            icl_task_type="language_modeling",
            num_fewshot=[3],
            prompt_string="Finish each sentence.",
            continuation_delimiter=" ->",
            example_delimiter="\n\n",
            fewshot_random_seed=7,
        ),
    ),
    dict(
        name="mc",
        tokenizer="bpe",
        max_seq_len=256,
        task=dict(
            label="mc",
            dataset_uri="multiple_choice.jsonl",
            icl_task_type="multiple_choice",
            num_fewshot=[0, 1, 3],
            prelimiter="Question: ",
            continuation_delimiter="\nAnswer:",
            example_delimiter="\n\n",
        ),
    ),
    dict(
        name="mc_categories",
        tokenizer="bpe",
        max_seq_len=256,
        task=dict(
            label="mc_cat",
            dataset_uri="multiple_choice_categories.jsonl",
            icl_task_type="multiple_choice",
            num_fewshot=[0, 2],
            continuation_delimiter=" Answer:",
            has_categories=True,
        ),
    ),
    dict(
        name="schema",
        tokenizer="bpe",
        max_seq_len=256,
        task=dict(label="schema", dataset_uri="schema.jsonl", icl_task_type="schema", num_fewshot=[0, 1, 3]),
    ),
    dict(
        name="schema_prompt",
        tokenizer="bpe",
        max_seq_len=256,
        task=dict(
            label="schema_prompt",
            dataset_uri="schema.jsonl",
            icl_task_type="schema",
            num_fewshot=[0, 2],
            prompt_string="Choose the sentence that makes sense.",
            fewshot_random_seed=99,
            continuation_delimiter=" ... ",
            prelimiter="> ",
        ),
    ),
    dict(
        name="gen",
        tokenizer="bpe",
        max_seq_len=256,
        task=dict(
            label="gen",
            dataset_uri="generation_task_with_answers.jsonl",
            icl_task_type="generation_task_with_answers",
            num_fewshot=[0, 1, 3],
            continuation_delimiter="\nA:",
            early_stopping_criteria=["\n", "Q:"],
        ),
    ),
    dict(
        name="gen_trimmed",
        tokenizer="bpe",
        max_seq_len=40,
        task=dict(
            label="gen_trim",
            dataset_uri="generation_task_with_answers.jsonl",
            icl_task_type="generation_task_with_answers",
            num_fewshot=[3],
            continuation_delimiter="\nA:",
            generation_kwargs={"max_new_tokens": 5},
        ),
    ),
    dict(
        name="gen_cot",
        tokenizer="bpe",
        max_seq_len=256,
        task=dict(
            label="gen_cot",
            dataset_uri="generation_cot.jsonl",
            icl_task_type="generation_task_with_answers",
            num_fewshot=[0, 2],
            continuation_delimiter="\nA: ",
            cot_delimiter=" #### ",
            do_normalization=False,
            early_stopping_criteria=["\n\n"],
        ),
    ),
    dict(
        name="code",
        tokenizer="bpe",
        max_seq_len=256,
        task=dict(
            label="code",
            dataset_uri="code_evaluation.jsonl",
            icl_task_type="code_evaluation",
            num_fewshot=[0, 1],
            generations_per_sample=4,
            pass_at_k=[1, 2],
        ),
    ),
    dict(
        name="sp_lm",
        tokenizer="sp",
        max_seq_len=256,
        task=dict(
            label="lm", dataset_uri="language_modeling.jsonl", icl_task_type="language_modeling", num_fewshot=[0, 1]
        ),
    ),
    dict(
        name="sp_mc",
        tokenizer="sp",
        max_seq_len=256,
        task=dict(
            label="mc",
            dataset_uri="multiple_choice.jsonl",
            icl_task_type="multiple_choice",
            num_fewshot=[0, 2],
            continuation_delimiter="\nAnswer:",
        ),
    ),
    dict(
        name="sp_schema",
        tokenizer="sp",
        max_seq_len=256,
        task=dict(label="schema", dataset_uri="schema.jsonl", icl_task_type="schema", num_fewshot=[0, 1]),
    ),
    dict(
        name="sp_gen",
        tokenizer="sp",
        max_seq_len=256,
        task=dict(
            label="gen",
            dataset_uri="generation_task_with_answers.jsonl",
            icl_task_type="generation_task_with_answers",
            num_fewshot=[1],
            continuation_delimiter="\nA:",
            early_stopping_criteria=["Q:", "\n"],
        ),
    ),
    dict(
        name="sp_code",
        tokenizer="sp",
        max_seq_len=256,
        task=dict(
            label="code",
            dataset_uri="code_evaluation.jsonl",
            icl_task_type="code_evaluation",
            num_fewshot=[1],
            generations_per_sample=2,
            pass_at_k=1,
        ),
    ),
]

# Fake model outputs for generation examples (index i gets GEN_OUTPUTS[i % len]); {a} is the
# example's answer, {alias} its first alias (or the answer), {a_broken} the answer with a newline
# for its first space (a stop string inside the answer).
GEN_OUTPUTS = [
    " {a}\nQ: something else",
    " The {alias}!",
    " {a_broken}",
    "{a}",
    " {a}, I think",
    " wrong #### {a}",
    " {alias_upper}.",
    " no idea",
]
# Fake code completions per generation j of a sample: the solution, followed by what LLM Foundry
# cuts off (a new top-level statement), or a wrong one.
CODE_OUTPUTS = [
    "{solution}\n\ndef helper():\n    return 0\n",
    "    return None\n",
    "{solution}print('done')\n",
    "{solution}\n# trailing comment\n",
]


def build_tokenizers(texts: list[str]) -> dict:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=520,
            special_tokens=["<|endoftext|>", "<|padding|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    # Llama-style: "\u2581" before the text and for every space, so " a" is two tokens ("\u2581", "\u2581a").
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    sp.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False),
    )
    sp.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", sp.token_to_id("<s>"))]
    )
    return {
        "bpe": {
            "json": bpe.to_str(),
            "eos_token": "<|endoftext|>",
            "bos_token": "<|endoftext|>",
            "pad_token": "<|padding|>",
        },
        "sp": {"json": sp.to_str(), "eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>"},
    }


def hf_tokenizer(spec: dict):
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(spec["json"]),
        eos_token=spec["eos_token"],
        bos_token=spec["bos_token"],
        pad_token=spec["pad_token"],
        clean_up_tokenization_spaces=False,
    )


def fixture_texts() -> list[str]:
    """Every string in the fixtures (what the tokenizers are trained on)."""

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)

    texts = []
    for name in sorted(os.listdir(FIXTURES)):
        if name.endswith(".jsonl"):
            for row in read_rows(os.path.join(FIXTURES, name)):
                texts.extend(strings(row))
    return texts


def load_llmfoundry08(wheel: str) -> tuple[types.ModuleType, types.ModuleType]:
    """0.8.0's ICL datasets and metrics modules, executed from the wheel's files (its helpers are
    the same as 0.22's); its code-eval metric's client module no longer exists in composer and is
    replaced by ``StubClient`` (set below per case)."""
    client_mod = types.ModuleType("composer.utils.eval_client")
    for name in ("EvalClient", "LambdaEvalClient", "LocalEvalClient", "MosaicMLLambdaEvalClient"):
        setattr(client_mod, name, StubClient)
    sys.modules["composer.utils.eval_client"] = client_mod
    mods = []
    with zipfile.ZipFile(wheel) as z:
        for path, name in (
            ("llmfoundry/eval/datasets/in_context_learning_evaluation.py", "llmfoundry08_icl"),
            ("llmfoundry/eval/metrics/nlp.py", "llmfoundry08_metrics"),
        ):
            mod = types.ModuleType(name)
            mod.__file__ = f"{wheel}!{path}"
            sys.modules[name] = mod
            exec(compile(z.read(path).decode("utf-8"), mod.__file__, "exec"), mod.__dict__)
            mods.append(mod)
    return mods[0], mods[1]


class StubClient:
    """Stands in for LLM Foundry's code-eval client: a program passes when it equals its prompt
    plus the canonical solution (trailing whitespace aside); inputs and outputs are not run."""

    expected: dict[str, str] = {}
    calls = 0

    def invoke(self, payload):
        StubClient.calls += 1
        code = payload[0][0][0]["code"]
        entry = payload[0][0][0]["entry_point"]
        return [[[code.rstrip() == StubClient.expected[entry].rstrip()]]]

    def close(self):
        pass


class TokenizeSpy:
    """Records the strings LLM Foundry's datasets pass to ``tokenize_example`` (outermost call only:
    the generation and code classes call their parent's)."""

    def __init__(self, classes):
        self.records: list[dict] = []
        self.depth = 0
        for cls in classes:
            if "tokenize_example" in cls.__dict__:
                cls.tokenize_example = self._wrap(cls.__dict__["tokenize_example"])

    def _wrap(self, fn):
        spy = self

        def tokenize_example(ds, prompt_and_fewshot, ctxt, example):
            spy.depth += 1
            try:
                if spy.depth == 1:
                    spy.records.append({"preamble": prompt_and_fewshot, "context": ctxt})
                return fn(ds, prompt_and_fewshot, ctxt, example)
            finally:
                spy.depth -= 1

        return tokenize_example


def bigram_table(vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, vocab, generator=g) * 2.0


def score_batch(batch, table):
    """Outputs and shifted labels as composer's eval_forward makes them for an ``icl_task`` batch,
    from the bigram table; per row the continuation's log-prob sum and whether it is greedy."""
    import torch

    outputs = table[batch["input_ids"]]
    labels = batch["input_ids"].clone()
    labels[:, :-1] = labels[:, 1:].clone()
    logp = torch.log_softmax(outputs.float(), dim=-1)
    scores = []
    for row, cont in enumerate(batch["continuation_indices"]):
        pos = cont - 1
        targets = labels[row, pos]
        lp = logp[row, pos].gather(-1, targets[:, None])[:, 0]
        greedy = bool((outputs[row, pos].argmax(-1) == targets).all())
        scores.append([float(lp.double().sum()), greedy])
    return outputs, labels, scores


def make_greedy(table, requests, every: int = 2):
    """Biases the bigram table so that every ``every``-th request's continuation is greedy."""
    for i, (ctx, cont) in enumerate(requests):
        if i % every == 0:
            seq = list(ctx) + list(cont)
            for j in range(len(ctx), len(seq)):
                prev, tok = seq[j - 1], seq[j]
                table[prev, tok] = table[prev].max() + 1.0


def gen_output(i: int, answer: str, aliases: list[str]) -> str:
    alias = next((a for a in sorted(aliases) if a != answer), answer)  # aliases come from a set
    a = answer.strip()
    return GEN_OUTPUTS[i % len(GEN_OUTPUTS)].format(
        a=a, alias=alias, alias_upper=alias.upper(), a_broken=a.replace(" ", "\n", 1)
    )


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_case(case: dict, tok, spy: TokenizeSpy, lf08, tmp: str) -> list[dict]:
    from llmfoundry.eval.datasets import get_icl_task_dataloader
    from llmfoundry.eval.datasets.utils import tokenizer_needs_prefix_space
    from llmfoundry.eval.metrics import (
        InContextLearningGenerationExactMatchAccuracy,
        InContextLearningLMAccuracy,
        InContextLearningMultipleChoiceAccuracy,
    )

    task = case["task"]
    kind = task["icl_task_type"]
    uri = os.path.join(FIXTURES, task["dataset_uri"])
    pad_id = tok.pad_token_id
    out = []
    for num_fewshot in task["num_fewshot"]:
        kwargs = {
            k: v
            for k, v in task.items()
            if k not in ("label", "icl_task_type", "has_categories", "num_fewshot", "dataset_uri")
        }
        kwargs.update(num_fewshot=num_fewshot, pad_tok_id=pad_id, max_seq_len=case["max_seq_len"])
        dest = os.path.join(tmp, f"{case['name']}-{num_fewshot}.jsonl")
        start = len(spy.records)  # 0.8.0's datasets build their prompts at construction, 0.22's on first access
        if kind == "code_evaluation":
            kwargs.setdefault("prompt_string", "")
            kwargs.setdefault("example_delimiter", "\n")
            kwargs.setdefault("continuation_delimiter", " ")
            kwargs.setdefault("fewshot_random_seed", 1234)
            datasets = {
                None: lf08.InContextLearningCodeEvalDataset(
                    dataset_uri=uri,
                    tokenizer=tok,
                    destination_path=dest,
                    hf_loading_vars={},
                    hf_parsing_map={},
                    **kwargs,
                )
            }
        else:
            spec = get_icl_task_dataloader(
                icl_task_type=kind,
                dataset_uri=uri,
                tokenizer=tok,
                batch_size=4,
                has_categories=task.get("has_categories", False),
                destination_path=dest,
                kwargs=kwargs,
            )
            specs = spec if isinstance(spec, dict) else {None: spec}
            datasets = {cat: s.dataloader.dataset for cat, s in specs.items()}
        for category, ds in datasets.items():
            items = [ds[i] for i in range(len(ds))]
            records, start = spy.records[start:], len(spy.records)
            result = {
                "case": case["name"],
                "num_fewshot": num_fewshot,
                "category": category,
                "prefix_space": tokenizer_needs_prefix_space(tok),
            }
            if kind in ("language_modeling", "multiple_choice", "schema"):
                assert len(records) == len(items), (len(records), len(items))
                batch = ds.collate_fn(items)
                table = bigram_table(len(tok), seed=len(items) + num_fewshot)
                examples = []
                requests = []
                for rec, item in zip(records, items, strict=True):
                    if kind == "language_modeling":
                        rows = [(item["context"], item["continuation"], item["continuation_indices"])]
                    else:
                        key = "query" if kind == "multiple_choice" else "context_options"
                        rows = list(zip(item[key], item["answer"], item["continuation_indices"], strict=True))
                    reqs = []
                    for padded, cont, idx in rows:
                        assert padded[idx[0] : idx[-1] + 1] == cont
                        reqs.append([padded[: idx[0]], cont])
                    requests.extend(reqs)
                    ex = dict(rec, requests=reqs)
                    if kind != "language_modeling":
                        ex["gold"] = item["gold"]
                    examples.append(ex)
                make_greedy(table, requests)
                outputs, labels, scores = score_batch(batch, table)
                metric = (
                    InContextLearningLMAccuracy()
                    if kind == "language_modeling"
                    else InContextLearningMultipleChoiceAccuracy()
                )
                details = metric.update(batch, outputs, labels)
                result.update(
                    examples=examples,
                    scores=scores,
                    accuracy=float(metric.compute()),
                    results=[int(r) for r in details["result"]],
                )
            elif kind == "generation_task_with_answers":
                assert len(records) == len(items), (len(records), len(items))
                batch = ds.collate_fn(items)
                examples, raw = [], []
                for i, (rec, item) in enumerate(zip(records, items, strict=True)):
                    ids = [t for t in item["context"] if t != pad_id]  # left padded with a dedicated pad id
                    answer = read_rows(uri)[i]["answer"]
                    examples.append(dict(rec, prompt_ids=ids, aliases=sorted(item["aliases"])))
                    raw.append(gen_output(i, answer, item["aliases"]))
                # composer's eval_forward adds a space to a decoded generation when the tokenizer
                # does not need a prefix space (SentencePiece-style).
                outputs = raw if tokenizer_needs_prefix_space(tok) else [" " + r for r in raw]
                metric = InContextLearningGenerationExactMatchAccuracy()
                details = metric.update(batch, outputs, batch["labels"])
                result.update(
                    examples=examples,
                    outputs=raw,
                    accuracy=float(metric.compute()),
                    results=[int(r) for r in details["result"]],
                    generation_kwargs={
                        k: v for k, v in batch["generation_kwargs"].items() if k not in ("stopping_criteria",)
                    },
                    stopping_criteria=batch["stopping_criteria"],
                    cot_delimiter=batch["cot_delimiter"],
                    do_normalization=batch["do_normalization"],
                )
            else:  # code_evaluation (0.8.0): the dataset repeats each sample generations_per_sample times
                n = ds.base_batch["generations_per_sample"]
                assert len(records) * n == len(items), (len(records), n, len(items))
                batch = ds.collate_fn(items)
                examples, raw = [], []
                StubClient.expected = {}
                for s, rec in enumerate(records):
                    item = items[s * n]
                    assert item["sample_id"] == s
                    row = ds.dataset[s * n]
                    StubClient.expected[item["entry_point"]] = item["prompt_text"] + row["canonical_solution"]
                    examples.append(
                        dict(
                            rec,
                            prompt_ids=[t for t in item["prompt"] if t != pad_id],
                            prompt_text=item["prompt_text"],
                            entry_point=item["entry_point"],
                        )
                    )
                    for j in range(n):
                        raw.append(CODE_OUTPUTS[(s + j) % len(CODE_OUTPUTS)].format(solution=row["canonical_solution"]))
                outputs = raw if tokenizer_needs_prefix_space(tok) else [" " + r for r in raw]
                os.environ["CODE_EVAL_DEVICE"] = "LOCAL"
                metric = lf08_metrics().InContextLearningCodeEvalAccuracy()
                details = metric.update(batch, outputs, batch["labels"])
                value = metric.compute()
                values = (
                    {k: float(v) for k, v in value.items()}
                    if isinstance(value, dict)
                    else {f"pass@{batch['pass_at_k'][0]}": float(value)}
                )
                gk = dict(batch["generation_kwargs"])
                result.update(
                    examples=examples,
                    outputs=raw,
                    pass_at_k=values,
                    results=[int(r) for r in details["result"]],
                    generation_kwargs={k: gk[k] for k in ("max_new_tokens", "temperature", "do_sample", "num_beams")},
                )
            out.append(result)
    return out


_LF08_METRICS = None


def lf08_metrics():
    return _LF08_METRICS


def main() -> None:
    global _LF08_METRICS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llmfoundry08_wheel", required=True, help="llm_foundry-0.8.0-py3-none-any.whl")
    p.add_argument("--out", default=OUT)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = os.path.join(tmp, "hf")
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        import datasets
        import llmfoundry
        from llmfoundry.eval.datasets import in_context_learning_evaluation as icl22

        datasets.disable_caching()
        datasets.utils.logging.disable_progress_bar()
        lf08, _LF08_METRICS = load_llmfoundry08(args.llmfoundry08_wheel)
        lf_classes = [
            icl22.InContextLearningDataset,
            icl22.InContextLearningMultipleChoiceTaskDataset,
            icl22.InContextLearningSchemaTaskDataset,
            icl22.InContextLearningGenerationTaskWithAnswersDataset,
            lf08.InContextLearningDataset,
            lf08.InContextLearningCodeEvalDataset,
        ]
        spy = TokenizeSpy(lf_classes)
        tokenizers = build_tokenizers(fixture_texts())
        hf = {name: hf_tokenizer(spec) for name, spec in tokenizers.items()}
        results = []
        for case in CASES:
            random.seed(0)
            results.extend(run_case(case, hf[case["tokenizer"]], spy, lf08, tmp))
            print(f"{case['name']}: done", flush=True)
        assert StubClient.calls > 0
        data = {
            "generated_by": "tests/llmfoundry_icl_reference.py",
            "llmfoundry": llmfoundry.__version__,
            "code_evaluation_llmfoundry": "0.8.0",
            "tokenizers": tokenizers,
            "cases": copy.deepcopy(CASES),
            "results": results,
        }
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KiB, {len(results)} results)")


if __name__ == "__main__":
    main()
