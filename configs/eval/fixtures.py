"""Our small ICL task files, one per LLM Foundry format (tests/fixtures/icl): a smoke test of the
whole evaluation path on any model, in about a minute on a CPU for the tiny model.

    python -m mpt_jax.train --config=configs/tiny.py --workdir=workdirs/tiny
    python -m mpt_jax.eval icl --model=workdirs/tiny --tasks=configs/eval/fixtures.py

Measured on the README's main job (configs/tiny.py, 240 steps on the Python standard library,
held-out loss 3.52), 2-core CPU, 33 s: every task runs; a 5M-parameter model of Python code knows
nothing of these English questions: language modeling 0/11, multiple choice 0/10 (0- and 3-shot),
schema 6/9 (0-shot) and 4/9 (1-shot), question answering 0/10, code pass@1 0/5.
"""

import os

import ml_collections

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures", "icl")


def get_config() -> ml_collections.ConfigDict:
    tasks = [
        dict(label="lm", dataset_uri="language_modeling.jsonl", icl_task_type="language_modeling", num_fewshot=[0, 2]),
        dict(
            label="mc",
            dataset_uri="multiple_choice.jsonl",
            icl_task_type="multiple_choice",
            num_fewshot=[0, 3],
            continuation_delimiter="\nAnswer: ",
            category="knowledge",
        ),
        dict(
            label="mc_categories",
            dataset_uri="multiple_choice_categories.jsonl",
            icl_task_type="multiple_choice",
            num_fewshot=[1],
            has_categories=True,
            category="knowledge",
        ),
        dict(label="schema", dataset_uri="schema.jsonl", icl_task_type="schema", num_fewshot=[0, 1]),
        dict(
            label="qa",
            dataset_uri="generation_task_with_answers.jsonl",
            icl_task_type="generation_task_with_answers",
            num_fewshot=[2],
            early_stopping_criteria=["\n"],
        ),
        dict(
            label="code",
            dataset_uri="code_evaluation.jsonl",
            icl_task_type="code_evaluation",
            num_fewshot=[0],
            generation_kwargs=dict(max_new_tokens=32),
        ),
    ]
    for t in tasks:
        t["dataset_uri"] = os.path.normpath(os.path.join(FIXTURES, t["dataset_uri"]))
    return ml_collections.ConfigDict(dict(icl_tasks=tasks))
