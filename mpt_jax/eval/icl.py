"""LLM Foundry's in-context-learning (ICL) tasks: its jsonl formats, its prompts, its metrics.

MPT was judged by these (LLM Foundry's eval gauntlet), so the numbers must come out the same from
the same files. Everything here restates what llm-foundry 0.22 does
(``llmfoundry/eval/datasets/in_context_learning_evaluation.py``, ``datasets/utils.py``,
``metrics/nlp.py``; ``code_evaluation``, removed in 0.9, as 0.8.0 did it), and
``tests/test_icl.py`` checks prompts, token ids and metrics against records made with its own
classes (``tests/llmfoundry_icl_reference.py``):

- A task file is jsonl, one example a line, with the keys ``ROW_KEYS`` names per task type.
  String values are stripped (``strip_dataset``, not for code), lists are not.
- Few-shot examples for example i: ``random.Random(fewshot_random_seed)``, one generator per
  (task, num_fewshot[, row category]) consumed example after example; ``min(n - 1, k)`` indices
  drawn by ``rng.sample``, the example's own index replaced by ``rng.choice`` draws; the examples
  are used in the order CPython iterates that *set* of indices (not sorted, not drawn order).
- A prompt is ``prompt_string``, then each few-shot example (``example_delimiter`` before it
  unless nothing precedes it, ``prelimiter``, its context, ``continuation_delimiter``, its answer),
  then the example's context the same way without the answer. The preamble (prompt string and
  few-shot examples) is tokenized with the tokenizer's special tokens (a trailing EOS dropped), the
  context separately without them, right-stripped when the data is stripped, and joined as ids.
- Continuations (and choices) get a leading space when the tokenizer keeps spaces with the next
  word (``" a"`` is one token) and they lack one; contexts are cut on the left so that context and
  continuation fit ``max_seq_len``.
- Schema tasks score one continuation after each context option (the few-shot examples use the
  gold one); generation tasks answer with ``answer`` or any of ``aliases`` (after an optional
  chain of thought and ``cot_delimiter``); code tasks complete ``prompt`` and are run against
  ``test_inputs``/``test_outputs``.
- Metrics: language modeling, whether every continuation token is the greedy one; multiple choice
  and schema, whether the gold choice has the highest mean log-prob per continuation token (LLM
  Foundry picks the lowest perplexity; ties go to the first); generation, whether the output (cut
  at the first stop string, the last ``cot_delimiter`` part, normalized TriviaQA-style unless
  ``do_normalization=False``) starts with a normalized answer; code, pass@k over
  ``generations_per_sample`` completions, each appended to the bare prompt (no few-shot
  examples), cut at its first new top-level line and run against the tests (``check``).

The model enters through callables, so this module imports none of it: ``loglikelihood`` (what
``mpt_jax.eval.scoring.Scorer.loglikelihood`` is), ``generate`` (``generator_fn`` adapts an
``mpt_jax.generate.Generator``) and, for code, ``check`` (a sandboxed test run). Prompts reach
``generate`` as token ids: LLM Foundry tokenizes the preamble and the context separately, which
encoding the joined text would not reproduce.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import string
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from absl import logging

Ids = list[int]
Request = tuple[Ids, Ids]  # (context token ids, continuation token ids)

TASK_TYPES = ("language_modeling", "multiple_choice", "schema", "generation_task_with_answers", "code_evaluation")
LOGLIKELIHOOD_TYPES = ("language_modeling", "multiple_choice", "schema")
GENERATION = "generation_task_with_answers"
CODE = "code_evaluation"

# LLM Foundry's default metric per task type (its metric class names, used in result labels).
METRIC_NAMES = {
    "language_modeling": "InContextLearningLMAccuracy",
    "multiple_choice": "InContextLearningMultipleChoiceAccuracy",
    "schema": "InContextLearningMultipleChoiceAccuracy",
    GENERATION: "InContextLearningGenerationExactMatchAccuracy",
    CODE: "InContextLearningCodeEvalAccuracy",
}

_STR, _STRS, _INT = "a string", "a list of strings", "an integer"
# The keys a row of each task type must have, with what each must be.
ROW_KEYS: dict[str, dict[str, str]] = {
    "language_modeling": {"context": _STR, "continuation": _STR},
    "multiple_choice": {"query": _STR, "choices": _STRS, "gold": _INT},
    "schema": {"context_options": _STRS, "continuation": _STR, "gold": _INT},
    GENERATION: {"context": _STR, "answer": _STR},
    CODE: {
        "prompt": _STR,
        "entry_point": _STR,
        "canonical_solution": _STR,
        "test_inputs": _STRS,
        "test_outputs": _STRS,
    },
}
# Keys a row may have (checked when present).
OPTIONAL_ROW_KEYS: dict[str, dict[str, str]] = {
    GENERATION: {"aliases": _STRS, "chain_of_thought": _STR},
    CODE: {"language": _STR, "task_id": _STR, "test": _STR},
}
# Where each type's example context and few-shot answer come from.
_CONTEXT_KEY = {"language_modeling": "context", "multiple_choice": "query", GENERATION: "context", CODE: "prompt"}

# Task options that only some task types take (LLM Foundry's dataset classes reject the others).
_TYPE_OPTIONS = {
    "cot_delimiter": (GENERATION,),
    "early_stopping_criteria": (GENERATION,),
    "do_normalization": (GENERATION,),
    "generation_kwargs": (GENERATION, CODE),
    "pass_at_k": (CODE,),
    "generations_per_sample": (CODE,),
    "strip_dataset": LOGLIKELIHOOD_TYPES + (GENERATION,),
}
# The HF ``generate`` keyword arguments LLM Foundry's generation_kwargs may carry that we honour.
GENERATION_KWARGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams", "use_cache")
HF_DEFAULT_TOP_K = 50  # transformers' GenerationConfig default, in force when LLM Foundry samples
CODE_SAMPLING = {"do_sample": True, "temperature": 0.2}  # 0.8.0's code-eval defaults
ANSWER_BUFFER = 10  # tokens LLM Foundry adds to the longest answer (CoT generation, code)


# -- the task config ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ICLTask:
    """One entry of LLM Foundry's ``icl_tasks`` list, in its keys and defaults.

    ``dataset_uri`` is a local jsonl file. ``max_seq_len`` defaults to the model's context (given
    to ``run_tasks``). ``category`` is ours: tasks with one are averaged per category.
    ``has_categories`` splits the file by its rows' ``category`` into tasks of their own (LLM
    Foundry's MMLU-style option). ``strip_dataset`` None means LLM Foundry's default: strip, except
    for code, which is never stripped.
    """

    label: str
    dataset_uri: str
    icl_task_type: str
    num_fewshot: tuple[int, ...] = (0,)
    prompt_string: str = ""
    example_delimiter: str = "\n"
    continuation_delimiter: str = " "
    prelimiter: str = ""
    fewshot_random_seed: int = 1234
    max_seq_len: int | None = None
    strip_dataset: bool | None = None
    category: str | None = None
    has_categories: bool = False
    # generation_task_with_answers
    cot_delimiter: str = ""
    early_stopping_criteria: tuple[str, ...] | None = None
    do_normalization: bool = True
    # generation_task_with_answers and code_evaluation: HF generate kwargs (GENERATION_KWARGS)
    generation_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # code_evaluation
    pass_at_k: tuple[int, ...] = (1,)
    generations_per_sample: int = 1

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if isinstance(self.num_fewshot, int):
            fix("num_fewshot", (self.num_fewshot,))
        if isinstance(self.pass_at_k, int):
            fix("pass_at_k", (self.pass_at_k,))
        fix("num_fewshot", tuple(self.num_fewshot))
        fix("pass_at_k", tuple(self.pass_at_k))
        if self.early_stopping_criteria is not None:
            fix("early_stopping_criteria", tuple(self.early_stopping_criteria))
        fix("generation_kwargs", dict(self.generation_kwargs))
        self.validate()

    @property
    def strip(self) -> bool:
        return self.icl_task_type != CODE and self.strip_dataset is not False

    def validate(self) -> None:
        """Raises ValueError naming the task and the option that cannot work."""
        where = f"ICL task {self.label!r}"
        if not self.label or not isinstance(self.label, str):
            raise ValueError(f"ICL task with dataset_uri={self.dataset_uri!r}: label must be a non-empty string")
        if self.icl_task_type not in TASK_TYPES:
            raise ValueError(f"{where}: icl_task_type={self.icl_task_type!r} is not one of {TASK_TYPES}")
        if not self.num_fewshot or any(not isinstance(k, int) or k < 0 for k in self.num_fewshot):
            raise ValueError(f"{where}: num_fewshot={list(self.num_fewshot)} must be a non-empty list of ints >= 0")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"{where}: max_seq_len={self.max_seq_len} must be at least 2")
        defaults = {f.name: f.default for f in dataclasses.fields(ICLTask) if f.default is not dataclasses.MISSING}
        defaults["generation_kwargs"] = {}
        for name, types in _TYPE_OPTIONS.items():
            if self.icl_task_type not in types and getattr(self, name) != defaults[name]:
                raise ValueError(f"{where}: {name} is an option of {', '.join(types)} tasks, not {self.icl_task_type}")
        unknown = sorted(set(self.generation_kwargs) - set(GENERATION_KWARGS))
        if unknown:
            raise ValueError(f"{where}: generation_kwargs {unknown} are not supported (supported: {GENERATION_KWARGS})")
        if self.generation_kwargs.get("num_beams", 1) != 1:
            raise ValueError(f"{where}: generation_kwargs num_beams={self.generation_kwargs['num_beams']}: only 1")
        if self.generation_kwargs.get("max_new_tokens", 1) < 1:
            raise ValueError(f"{where}: generation_kwargs max_new_tokens must be positive")
        if not self.pass_at_k or any(not isinstance(k, int) or k < 1 for k in self.pass_at_k):
            raise ValueError(f"{where}: pass_at_k={list(self.pass_at_k)} must be ints >= 1")
        if self.generations_per_sample < max(self.pass_at_k):
            raise ValueError(
                f"{where}: generations_per_sample={self.generations_per_sample} must be at least "
                f"max(pass_at_k)={max(self.pass_at_k)}"
            )
        if self.early_stopping_criteria is not None and not all(
            isinstance(s, str) and s for s in self.early_stopping_criteria
        ):
            raise ValueError(f"{where}: early_stopping_criteria must be non-empty strings")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, base_dir: str | None = None) -> ICLTask:
        """A task from an ``icl_tasks`` entry in LLM Foundry's keys (``question_prelimiter`` is read
        as ``prelimiter``, as LLM Foundry does); a relative ``dataset_uri`` is taken from
        ``base_dir``. Unknown keys are an error naming them."""
        config = dict(config)
        label = config.get("label", "?")
        funcs = config.pop("post_processing_funcs", None) or []  # older gauntlet yamls name their normalization
        names = sorted({f.get("name") if isinstance(f, Mapping) else f for f in funcs} - {"qa_normalization"})
        if names:
            raise ValueError(f"ICL task {label!r}: post_processing_funcs {names} (only qa_normalization is known)")
        if "question_prelimiter" in config:
            if "prelimiter" in config:
                raise ValueError(f"ICL task {label!r}: give prelimiter or question_prelimiter, not both")
            config["prelimiter"] = config.pop("question_prelimiter")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"ICL task {label!r}: unknown keys {unknown} (known: {sorted(names)})")
        missing = [k for k in ("label", "dataset_uri", "icl_task_type") if k not in config]
        if missing:
            raise ValueError(f"ICL task {label!r}: missing keys {missing}")
        uri = str(config["dataset_uri"])
        if "://" in uri:
            raise ValueError(f"ICL task {label!r}: dataset_uri={uri!r}: only local jsonl files are read")
        if base_dir is not None and not os.path.isabs(os.path.expanduser(uri)):
            config["dataset_uri"] = os.path.join(base_dir, uri)
        return cls(**config)


def tasks_from_config(config: Any, *, base_dir: str | None = None) -> list[ICLTask]:
    """ICL tasks from a config: a mapping (or ``ml_collections.ConfigDict``) with ``icl_tasks``
    (LLM Foundry's yaml key), or a list of task mappings. Labels must be unique (they name the
    results)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, Mapping):
        if "icl_tasks" not in config:
            raise ValueError(f"an ICL task config needs 'icl_tasks' (a list of tasks); it has {sorted(config)}")
        config = config["icl_tasks"]
    tasks = [ICLTask.from_dict(e.to_dict() if hasattr(e, "to_dict") else dict(e), base_dir=base_dir) for e in config]
    seen: set[str] = set()
    for t in tasks:
        if t.label in seen:
            raise ValueError(f"ICL task label {t.label!r} appears twice; labels name the results")
        seen.add(t.label)
    return tasks


def tasks_from_file(spec: str, *, base_dir: str | None = None) -> list[ICLTask]:
    """The tasks of a task config file: ``configs/eval/NAME.py[:ARG]`` (its ``get_config()``, or
    ``get_config(ARG)``), or an LLM Foundry yaml with ``icl_tasks`` (``tasks_v0.3.yaml``, read as
    it is). Relative ``dataset_uri``s are taken from ``base_dir`` (default: the file's folder; for
    LLM Foundry's own yamls, its ``scripts/`` folder, where ``eval/local_data`` lives)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no ICL task config at {path}")
    base_dir = base_dir or os.path.dirname(os.path.abspath(path))
    if path.endswith((".yaml", ".yml")):
        import yaml

        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML ({e})") from None
        return tasks_from_config(data, base_dir=base_dir)
    if not path.endswith(".py"):
        raise ValueError(f"ICL task config {path}: expected a .py config (get_config()) or an LLM Foundry .yaml")
    import importlib.util

    module_spec = importlib.util.spec_from_file_location(f"_icl_tasks_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"ICL task config {path} has no get_config()")
    return tasks_from_config(module.get_config(arg) if arg else module.get_config(), base_dir=base_dir)


# -- reading task files ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One example of a task file: its fields as written and where it is."""

    data: dict[str, Any]
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}: line {self.line}"


def _check_value(row: Row, key: str, kind: str, task_type: str) -> None:
    value = row.data[key]
    ok = {
        _STR: isinstance(value, str),
        _STRS: isinstance(value, list) and all(isinstance(v, str) for v in value),
        _INT: isinstance(value, int) and not isinstance(value, bool),
    }[kind]
    if not ok:
        raise ValueError(f"{row.where}: {key!r} must be {kind} in a {task_type} row, got {value!r:.80}")


def read_rows(task: ICLTask) -> list[Row]:
    """The task file's examples, each checked for the keys its task type needs.

    Errors name the file, the line and the key: a missing file (FileNotFoundError), bad JSON, a
    missing or mistyped key, a ``gold`` out of range, a row category missing."""
    path = os.path.expanduser(task.dataset_uri)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ICL task {task.label!r}: no task file at {task.dataset_uri}")
    kind = task.icl_task_type
    required, optional = ROW_KEYS[kind], OPTIONAL_ROW_KEYS.get(kind, {})
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
            row = Row(data, path, n)
            if not isinstance(data, dict):
                raise ValueError(f"{row.where}: expected a JSON object, got {type(data).__name__}")
            for key, what in required.items():
                if key not in data:
                    raise ValueError(
                        f"{row.where}: missing key {key!r} (a {kind} row needs {', '.join(required)}; "
                        f"this one has {', '.join(sorted(data)) or 'none'})"
                    )
                _check_value(row, key, what, kind)
            for key, what in optional.items():
                if key in data:
                    _check_value(row, key, what, kind)
            _check_row(row, kind)
            if task.has_categories and not isinstance(data.get("category"), str):
                raise ValueError(f"{row.where}: has_categories=True needs a string 'category' in every row")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples (an empty task file)")
    if kind == GENERATION:
        with_cot = [r for r in rows if "chain_of_thought" in r.data]
        if with_cot and len(with_cot) != len(rows):
            bad = next(r for r in rows if "chain_of_thought" not in r.data)
            raise ValueError(f"{bad.where}: missing key 'chain_of_thought' (other rows of the file have one)")
    return rows


def _check_row(row: Row, kind: str) -> None:
    d = row.data
    if kind in ("multiple_choice", "schema"):
        options = d["choices" if kind == "multiple_choice" else "context_options"]
        if not options:
            raise ValueError(f"{row.where}: no choices")
        if not 0 <= d["gold"] < len(options):
            raise ValueError(f"{row.where}: gold={d['gold']} is not an index of its {len(options)} choices")
    if kind == CODE:
        if len(d["test_inputs"]) != len(d["test_outputs"]) or not d["test_inputs"]:
            raise ValueError(
                f"{row.where}: {len(d['test_inputs'])} test_inputs for {len(d['test_outputs'])} test_outputs "
                "(need the same number, at least one)"
            )
        if d.get("language", "python") != "python":
            raise ValueError(f"{row.where}: language={d['language']!r}: only python code is run")


def _stripped(data: dict[str, Any]) -> dict[str, Any]:
    """LLM Foundry's ``strip_data``: top-level strings stripped, lists left alone."""
    return {k: v.strip() if isinstance(v, str) else v for k, v in data.items()}


# -- tokenization -----------------------------------------------------------------------------------


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...


class _Tok:
    """What prompt building needs from a tokenizer (``mpt_jax.data.tokenizer.Tokenizer`` or any
    object with ``encode``): encoding with and without special tokens, EOS, the pad id LLM
    Foundry uses (pad, else EOS), and whether continuations get a leading space."""

    def __init__(self, tokenizer: TokenizerLike):
        self.encode = tokenizer.encode
        backend = getattr(tokenizer, "tk", None)  # a tokenizers.Tokenizer applies its post-processor (BOS)
        self.encode_special = (
            (lambda text: backend.encode(text, add_special_tokens=True).ids)
            if backend is not None
            else tokenizer.encode
        )
        self.eos_id = getattr(tokenizer, "eos_id", None)
        pad_id = getattr(tokenizer, "pad_id", None)
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        self.prefix_space = needs_prefix_space(tokenizer)

    def preamble(self, text: str) -> Ids:
        ids = list(self.encode_special(text))
        if self.eos_id is not None and len(ids) > 1 and ids[-1] == self.eos_id:
            ids = ids[:-1]  # an EOS appended by the tokenizer would sit inside the prompt
        return ids


def needs_prefix_space(tokenizer: TokenizerLike) -> bool:
    """LLM Foundry's test: a GPT-2/NeoX-style BPE encodes ``" a"`` as one token, so a continuation
    is scored with the space that separates it from the context; SentencePiece-style ones do not."""
    return len(tokenizer.encode(" a")) == 1


def _with_space(text: str, prefix_space: bool) -> str:
    return f" {text}" if prefix_space and not text.startswith(" ") else text


def trim_context(context: Ids, continuation: Ids, max_seq_len: int, *, where: str) -> Ids:
    """The context cut on the left so that context + continuation fit ``max_seq_len``."""
    if len(context) + len(continuation) <= max_seq_len:
        return context
    room = max_seq_len - len(continuation)
    if room < 1:
        raise ValueError(
            f"{where}: a continuation of {len(continuation)} tokens leaves no room for context in "
            f"max_seq_len={max_seq_len}"
        )
    return context[-room:]


# -- prompts ----------------------------------------------------------------------------------------


def fewshot_indices(dataset_size: int, num_fewshot: int, example_index: int, rng: random.Random) -> set[int]:
    """The few-shot examples of ``example_index``, drawn as LLM Foundry draws them (the same calls
    on the same generator); a set, iterated in CPython's order as LLM Foundry iterates it."""
    num_fewshot = min(dataset_size - 1, num_fewshot)
    chosen = set(rng.sample(range(0, dataset_size), num_fewshot))
    if example_index in chosen:
        chosen.remove(example_index)
        if len(chosen) >= dataset_size - 1:
            return chosen
        replacement = rng.choice(range(0, dataset_size))
        while replacement in chosen or replacement == example_index:
            replacement = rng.choice(range(0, dataset_size))
        chosen.add(replacement)
    return chosen


def _answer(task: ICLTask, row: dict[str, Any], has_cot: bool) -> str:
    """The answer a few-shot example shows."""
    kind = task.icl_task_type
    if kind in ("language_modeling", "schema"):
        return row["continuation"]
    if kind == "multiple_choice":
        return row["choices"][row["gold"]]
    if kind == GENERATION:
        return f"{row['chain_of_thought']}{task.cot_delimiter}{row['answer']}" if has_cot else row["answer"]
    return row["canonical_solution"]


def _context(task: ICLTask, row: dict[str, Any], preceding: str, *, answer: str | None) -> str:
    """An example as text: the delimiter (when text precedes it), prelimiter, context,
    continuation delimiter and, for a few-shot example, its answer. A schema few-shot example is
    its gold context option and continuation, with the prelimiter before the delimiter, as LLM
    Foundry writes it (its example's own contexts are ``_schema_contexts``)."""
    if task.icl_task_type == "schema":
        text = row["context_options"][row["gold"]]
        if preceding:
            text = f"{task.example_delimiter}{text}"
        return f"{task.prelimiter}{text}{task.continuation_delimiter}{answer}"
    text = f"{task.prelimiter}{row[_CONTEXT_KEY[task.icl_task_type]]}"
    if preceding:
        text = f"{task.example_delimiter}{text}"
    text = f"{text}{task.continuation_delimiter}"
    return text if answer is None else f"{text}{answer}"


def _schema_contexts(task: ICLTask, row: dict[str, Any], preceding: str) -> list[str]:
    """The example's context options: after a preamble they carry the delimiters (the
    continuation delimiter right-stripped when data is stripped); alone, only the prelimiter."""
    if not preceding:
        return [f"{task.prelimiter}{c}" for c in row["context_options"]]
    delimiter = task.continuation_delimiter.rstrip() if task.strip else task.continuation_delimiter
    return [f"{task.prelimiter}{task.example_delimiter}{c}{delimiter}" for c in row["context_options"]]


@dataclasses.dataclass
class Example:
    """One example as the model sees it.

    ``preamble`` is the prompt string and few-shot examples, ``context`` the example's own text
    (schema: one per context option) as built, before right-stripping; ``requests`` the
    (context ids, continuation ids) scored per choice (one for language modeling), ``gold`` the
    right choice; ``prompt_ids`` a generation or code task's model input, ``answers`` the answer
    and its aliases; code tasks also keep the bare ``prompt`` (what completions extend),
    ``entry_point`` and the tests.
    """

    index: int
    row: Row
    preamble: str
    context: str | list[str]
    requests: list[Request] = dataclasses.field(default_factory=list)
    gold: int | None = None
    prompt_ids: Ids | None = None
    answers: list[str] = dataclasses.field(default_factory=list)
    prompt: str | None = None
    entry_point: str | None = None
    test_inputs: list[str] = dataclasses.field(default_factory=list)
    test_outputs: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Subtask:
    """One evaluation LLM Foundry runs: a task at one ``num_fewshot`` (and, for ``has_categories``,
    one row category), with its examples built and, for generation and code, how to generate."""

    task: ICLTask
    num_fewshot: int
    row_category: str | None
    examples: list[Example]
    max_new_tokens: int | None = None
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)  # temperature, top_p, top_k
    stop: list[str] = dataclasses.field(default_factory=list)
    prefix_space: bool = True

    @property
    def label(self) -> str:
        """LLM Foundry's evaluator label: ``<label>/<N>-shot[/<row category>]``."""
        label = f"{self.task.label}/{self.num_fewshot}-shot"
        return label if self.row_category is None else f"{label}/{self.row_category}"


def prepare(task: ICLTask, tokenizer: TokenizerLike, max_seq_len: int | None = None) -> list[Subtask]:
    """The task's evaluations (one per ``num_fewshot``, times its row categories), every prompt
    built and tokenized. ``max_seq_len`` (the model's context) is used when the task sets none.
    All file errors surface here, before any model call."""
    seq_len = task.max_seq_len or max_seq_len
    if not seq_len:
        raise ValueError(f"ICL task {task.label!r}: no max_seq_len (set it in the task or give the model's)")
    rows = read_rows(task)
    groups: dict[str | None, list[Row]] = {None: rows}
    if task.has_categories:
        groups = {c: [r for r in rows if r.data["category"] == c] for c in sorted({r.data["category"] for r in rows})}
    tok = _Tok(tokenizer)
    return [
        _build(task, group, k, category, tok, seq_len) for k in task.num_fewshot for category, group in groups.items()
    ]


def _build(task: ICLTask, rows: list[Row], num_fewshot: int, category: str | None, tok: _Tok, seq_len: int):
    """One evaluation's examples; ``rows`` are its file rows (one row category's, if split)."""
    kind = task.icl_task_type
    answer_ids = lambda text: tok.encode(_with_space(text, tok.prefix_space))  # noqa: E731
    data = [_stripped(r.data) if task.strip else dict(r.data) for r in rows]
    has_cot = kind == GENERATION and "chain_of_thought" in rows[0].data
    rng = random.Random(task.fewshot_random_seed)
    sub = Subtask(task, num_fewshot, category, [], prefix_space=tok.prefix_space)
    if kind == GENERATION:
        answer_len = _max_answer_length(task, rows, has_cot, tok)
        seq_len = max(seq_len, answer_len)  # as LLM Foundry does (with a warning)
        prompt_room = seq_len - answer_len
        if prompt_room < 1:
            raise ValueError(
                f"ICL task {task.label!r}: answers of up to {answer_len} tokens leave no room for a prompt in "
                f"max_seq_len={seq_len}"
            )
        sub.max_new_tokens = int(task.generation_kwargs.get("max_new_tokens", max(answer_len, 1)))
        sub.stop = list(task.early_stopping_criteria or [])
    for i, (row, d) in enumerate(zip(rows, data, strict=True)):
        preamble = task.prompt_string
        if num_fewshot > 0:
            for j in fewshot_indices(len(data), num_fewshot, i, rng):
                preamble += _context(task, data[j], preamble, answer=_answer(task, data[j], has_cot))
        pre_ids = tok.preamble(preamble)
        ex = Example(i, row, preamble, "")
        if kind == "schema":
            ex.context = _schema_contexts(task, d, preamble)
            continuation = answer_ids(d["continuation"])
            ex.requests = [_request(pre_ids + tok.encode(c), continuation, seq_len, row) for c in ex.context]
            ex.gold = d["gold"]
        else:
            ex.context = _context(task, d, preamble, answer=None)
            ctx_ids = pre_ids + tok.encode(ex.context.rstrip() if task.strip else ex.context)
            if kind == "language_modeling":
                ex.requests = [_request(ctx_ids, answer_ids(d["continuation"]), seq_len, row)]
            elif kind == "multiple_choice":
                ex.requests = [_request(ctx_ids, answer_ids(c), seq_len, row) for c in d["choices"]]
                ex.gold = d["gold"]
            elif kind == GENERATION:
                ex.prompt_ids = trim_context(ctx_ids, [], prompt_room, where=row.where)
                ex.answers = [row.data["answer"], *row.data.get("aliases", [])]
            else:
                ex.prompt_ids = [t for t in trim_context(ctx_ids, [], seq_len, where=row.where) if t != tok.pad_id]
                ex.prompt, ex.entry_point = d["prompt"], d["entry_point"]
                ex.test_inputs, ex.test_outputs = list(d["test_inputs"]), list(d["test_outputs"])
        sub.examples.append(ex)
    if kind == CODE:
        _code_generation(sub, rows, tok, seq_len)
    elif kind == GENERATION:
        sub.sampling = _sampling(task.generation_kwargs)
    return sub


def _request(context: Ids, continuation: Ids, seq_len: int, row: Row) -> Request:
    if not continuation:
        raise ValueError(f"{row.where}: the continuation is empty after tokenization: nothing to score")
    context = trim_context(context, continuation, seq_len, where=row.where)
    if not context:
        raise ValueError(f"{row.where}: the context is empty: its first continuation token has nothing to follow")
    return context, continuation


def _max_answer_length(task: ICLTask, rows: list[Row], has_cot: bool, tok: _Tok) -> int:
    """LLM Foundry's generation budget: the longest answer or alias in tokens (with special
    tokens, chain of thought included, measured before stripping), plus ``ANSWER_BUFFER`` when a
    ``cot_delimiter`` is set."""
    longest = 0
    for row in rows:
        d = row.data
        for answer in [d["answer"], *d.get("aliases", [])]:
            text = f"{d['chain_of_thought']}{task.cot_delimiter}{answer}" if has_cot else answer
            longest = max(longest, len(tok.encode_special(text)))
    return longest + (ANSWER_BUFFER if task.cot_delimiter else 0)


def _code_generation(sub: Subtask, rows: list[Row], tok: _Tok, seq_len: int) -> None:
    """0.8.0's code budget: the longest canonical solution plus ``ANSWER_BUFFER`` tokens, at most
    what the longest prompt leaves of ``max_seq_len``; sampling at temperature 0.2 by default."""
    longest_prompt = max(len(e.prompt_ids or []) for e in sub.examples)
    answer_len = max(len(tok.encode(r.data["canonical_solution"])) for r in rows) + ANSWER_BUFFER
    budget = answer_len if answer_len < seq_len - longest_prompt else seq_len - longest_prompt
    kwargs = {**CODE_SAMPLING, **sub.task.generation_kwargs}
    sub.max_new_tokens = int(kwargs.get("max_new_tokens", max(budget, 1)))
    sub.sampling = _sampling(kwargs)


def _sampling(generation_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """HF ``generate`` settings as our generator's: greedy unless ``do_sample`` (then HF's
    defaults: temperature 1, top_p 1, top_k 50)."""
    if not generation_kwargs.get("do_sample", False):
        return {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    return {
        "temperature": float(generation_kwargs.get("temperature", 1.0)),
        "top_p": float(generation_kwargs.get("top_p", 1.0)),
        "top_k": int(generation_kwargs.get("top_k", HF_DEFAULT_TOP_K)),
    }


# -- metrics ----------------------------------------------------------------------------------------


def best_choice(scores: Sequence[float], lengths: Sequence[int]) -> int:
    """The choice with the highest mean log-prob per continuation token (LLM Foundry's lowest
    perplexity); the first of equals."""
    means = [s / n for s, n in zip(scores, lengths, strict=True)]
    return means.index(max(means))


def normalize_answer(text: str) -> str:
    """TriviaQA's answer normalization as LLM Foundry applies it: underscores and punctuation
    (quotes and backtick included) to spaces, lower case, articles dropped, whitespace collapsed."""
    punctuation = set(string.punctuation + "\u2018\u2019\u00b4`")
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in punctuation else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split()).strip()


def exact_match(
    output: str, answers: Iterable[str], *, stop: Sequence[str] = (), cot_delimiter: str = "", normalize: bool = True
) -> bool:
    """Whether a generation answers: cut at the first stop string (LLM Foundry joins them into
    one regular expression), keep what follows the last ``cot_delimiter``, then compare (normalized,
    or stripped) by prefix with each answer."""
    if stop:
        output = re.split("|".join(stop), output)[0]
    if cot_delimiter:
        output = output.split(cot_delimiter)[-1]
    clean = normalize_answer if normalize else str.strip
    output = clean(output)
    return any(output.startswith(clean(a)) for a in answers)


# -- running ----------------------------------------------------------------------------------------


class LoglikelihoodFn(Protocol):
    def __call__(self, requests: list[Request]) -> list[tuple[float, bool]]: ...


class GenerateFn(Protocol):
    """Completions of token-id prompts, as text (the new tokens only, special tokens left out)."""

    def __call__(
        self,
        prompts: list[Ids],
        *,
        max_new_tokens: int,
        stop: list[str],
        temperature: float,
        top_p: float,
        top_k: int,
        seed: list[int],
    ) -> list[str]: ...


# check(prompt, completion, entry_point, test_inputs, test_outputs): whether the program LLM Foundry
# builds (the completion cut at its first new top-level line, after the bare prompt) passes every
# test: ``mpt_jax.eval.sandbox.check_program``.
CheckFn = Callable[[str, str, str, list[str], list[str]], bool]
PassAtK = Callable[[int, int, int], float]  # (n samples, c correct, k)


def generator_fn(generator: Any) -> GenerateFn:
    """``generate`` over an ``mpt_jax.generate.Generator`` (anything whose ``generate`` returns
    completions with ``.text``)."""

    def generate(prompts: list[Ids], *, stop: list[str], **kwargs) -> list[str]:
        return [c.text for c in generator.generate(prompts, stop=list(stop) or None, **kwargs)]

    return generate


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """One evaluation's numbers. ``values``: ``{"accuracy": x}``, or ``{"pass@k": x, ...}`` for
    code; ``results``: per example (per generation for code) 1 if right, as LLM Foundry lists them."""

    label: str
    task: str
    num_fewshot: int
    icl_task_type: str
    category: str | None
    row_category: str | None
    metric: str
    values: dict[str, float]
    examples: int
    results: list[int]
    seconds: float

    @property
    def value(self) -> float:
        """The headline number: accuracy, or pass@k for the first k."""
        return next(iter(self.values.values()))


@dataclasses.dataclass(frozen=True)
class ICLResults:
    tasks: list[TaskResult]
    categories: dict[str, float]  # category -> mean of its tasks' values (see ``category_averages``)

    def as_dict(self) -> dict[str, Any]:
        return {"tasks": [dataclasses.asdict(t) for t in self.tasks], "categories": dict(self.categories)}


def evaluate(
    sub: Subtask,
    *,
    loglikelihood: LoglikelihoodFn | None = None,
    generate: GenerateFn | None = None,
    check: CheckFn | None = None,
    pass_at_k: PassAtK | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> TaskResult:
    """Scores one prepared evaluation (its first ``limit`` examples) with the model's callables."""
    task, kind = sub.task, sub.task.icl_task_type
    examples = sub.examples[:limit] if limit is not None else sub.examples
    start = time.perf_counter()
    if kind in LOGLIKELIHOOD_TYPES:
        if loglikelihood is None:
            raise ValueError(f"{sub.label}: a {kind} task needs loglikelihood")
        requests = [r for e in examples for r in e.requests]
        scores = list(loglikelihood(requests))
        if len(scores) != len(requests):
            raise ValueError(f"{sub.label}: loglikelihood gave {len(scores)} scores for {len(requests)} requests")
        results, at = [], 0
        for e in examples:
            own, at = scores[at : at + len(e.requests)], at + len(e.requests)
            if kind == "language_modeling":
                results.append(int(bool(own[0][1])))
            else:
                pick = best_choice([float(s) for s, _ in own], [len(c) for _, c in e.requests])
                results.append(int(pick == e.gold))
        values = {"accuracy": sum(results) / len(results)}
    elif kind == GENERATION:
        outputs = _generate(sub, examples, generate, 1, seed)
        results = [
            int(
                exact_match(
                    o, e.answers, stop=sub.stop, cot_delimiter=task.cot_delimiter, normalize=task.do_normalization
                )
            )
            for o, e in zip(outputs, examples, strict=True)
        ]
        values = {"accuracy": sum(results) / len(results)}
    else:
        if check is None:
            raise ValueError(f"{sub.label}: a code_evaluation task needs check (mpt_jax.eval.sandbox's)")
        if pass_at_k is None:
            from mpt_jax.eval.sandbox import pass_at_k
        n = task.generations_per_sample
        outputs = _generate(sub, examples, generate, n, seed)
        results = []
        for i, e in enumerate(examples):
            for out in outputs[i * n : (i + 1) * n]:
                results.append(int(bool(check(e.prompt, out, e.entry_point, e.test_inputs, e.test_outputs))))
        correct = [sum(results[i * n : (i + 1) * n]) for i in range(len(examples))]
        values = {f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in task.pass_at_k}
    seconds = time.perf_counter() - start
    result = TaskResult(
        sub.label, task.label, sub.num_fewshot, kind, task.category, sub.row_category, METRIC_NAMES[kind],
        values, len(examples), results, seconds,
    )  # fmt: skip
    logging.info("ICL %s: %s over %d examples (%.1f s)", sub.label, values, len(examples), seconds)
    return result


def _generate(sub: Subtask, examples: list[Example], generate: GenerateFn | None, n: int, seed: int) -> list[str]:
    """Each example's prompt ``n`` times (one seed per generation); composer adds a space before
    what a SentencePiece-style tokenizer decodes (it drops a leading one), so do we."""
    if generate is None:
        raise ValueError(f"{sub.label}: a {sub.task.icl_task_type} task needs generate")
    prompts = [list(e.prompt_ids or []) for e in examples for _ in range(n)]
    outputs = list(
        generate(
            prompts,
            max_new_tokens=sub.max_new_tokens,
            stop=list(sub.stop),
            seed=[seed + i for i in range(len(prompts))],
            **sub.sampling,
        )
    )
    if len(outputs) != len(prompts):
        raise ValueError(f"{sub.label}: generate gave {len(outputs)} outputs for {len(prompts)} prompts")
    return outputs if sub.prefix_space else [f" {o}" for o in outputs]


def category_averages(results: Sequence[TaskResult]) -> dict[str, float]:
    """Per category, the mean over its (task, num_fewshot) evaluations of their values; a
    ``has_categories`` task counts once per num_fewshot, with the mean of its row categories."""
    units: dict[tuple[str, str, int], list[float]] = {}
    for r in results:
        if r.category is not None:
            units.setdefault((r.category, r.task, r.num_fewshot), []).append(r.value)
    by_category: dict[str, list[float]] = {}
    for (category, _, _), values in units.items():
        by_category.setdefault(category, []).append(sum(values) / len(values))
    return {c: sum(v) / len(v) for c, v in sorted(by_category.items())}


def run_tasks(
    tasks: Sequence[ICLTask],
    loglikelihood: LoglikelihoodFn | None,
    generate: GenerateFn | None,
    check: CheckFn | None,
    tokenizer: TokenizerLike,
    *,
    max_seq_len: int | None = None,
    pass_at_k: PassAtK | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> ICLResults:
    """Every task at every ``num_fewshot``: all files read and prompts built first (errors before
    any model call), then scored. ``max_seq_len`` is the model's context (tasks may set less);
    ``limit`` keeps each evaluation's first examples (few-shot examples still come from all)."""
    prepared = [sub for task in tasks for sub in prepare(task, tokenizer, max_seq_len)]
    return run_prepared(prepared, loglikelihood, generate, check, pass_at_k=pass_at_k, limit=limit, seed=seed)


def run_prepared(
    prepared: Sequence[Subtask],
    loglikelihood: LoglikelihoodFn | None,
    generate: GenerateFn | None,
    check: CheckFn | None,
    *,
    pass_at_k: PassAtK | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> ICLResults:
    """``run_tasks`` on evaluations already built by ``prepare`` (training builds them once and
    evaluates them at every eval)."""
    kinds = {s.task.icl_task_type for s in prepared}
    needs = {
        "loglikelihood": (loglikelihood, kinds & set(LOGLIKELIHOOD_TYPES)),
        "generate": (generate, kinds & {GENERATION, CODE}),
        "check": (check, kinds & {CODE}),
    }
    for name, (fn, wanted) in needs.items():
        if fn is None and wanted:
            raise ValueError(f"ICL tasks of type {sorted(wanted)} need {name}")
    results = [
        evaluate(
            s, loglikelihood=loglikelihood, generate=generate, check=check, pass_at_k=pass_at_k, limit=limit, seed=seed
        )
        for s in prepared
    ]
    return ICLResults(results, category_averages(results))


# -- reporting --------------------------------------------------------------------------------------


def flat_metrics(results: ICLResults, prefix: str = "icl/") -> dict[str, float]:
    """``{name: value}`` for TensorBoard and metrics.jsonl: ``<prefix><label>/<metric>`` per
    evaluation (``icl/hellaswag/0-shot/accuracy``, ``icl/humaneval/0-shot/pass@1``) and
    ``<prefix>category/<category>`` per category."""
    out = {f"{prefix}{r.label}/{name}": float(v) for r in results.tasks for name, v in r.values.items()}
    out.update({f"{prefix}category/{c}": float(v) for c, v in results.categories.items()})
    return out


def results_table(results: ICLResults) -> str:
    """A markdown table per evaluation, and one per category when tasks have categories."""
    lines = ["| task | type | category | metric | value | examples |", "|---|---|---|---|---|---|"]
    for r in results.tasks:
        for name, v in r.values.items():
            lines.append(f"| {r.label} | {r.icl_task_type} | {r.category or ''} | {name} | {v:.4f} | {r.examples} |")
    if results.categories:
        lines += ["", "| category | average |", "|---|---|"]
        lines += [f"| {c} | {v:.4f} |" for c, v in results.categories.items()]
    return "\n".join(lines)


def write_results(results: ICLResults, path: str) -> str:
    """Writes the results as JSON to a new file (atomically; an existing file is an error)."""
    from mpt_jax.files import write_new_json

    return write_new_json(path, results.as_dict())
