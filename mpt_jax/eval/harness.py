"""EleutherAI's lm-evaluation-harness driving an mpt-jax model: the ``mpt_jax`` backend and its CLI.

    lm_eval.simple_evaluate(model="mpt_jax", model_args="pretrained=PATH,dtype=float32", tasks=[...])
    python -m mpt_jax.eval harness --model=PATH --tasks=hellaswag,lambada_openai [--include_path=DIR]

``MPTJaxLM`` is built like lm-eval's own ``hf`` backend (``pretrained``, ``dtype``, ``batch_size``,
``max_length``) from any source ``mpt_jax.load`` reads, and gives it the same requests: text is
tokenized as that backend tokenizes it (lm-eval's ``TemplateLM``: a context's trailing whitespace
moves onto the continuation, ``context + continuation`` is encoded whole and split; an empty
context becomes the prefix token), documents are cut into lm-eval's rolling windows, and a
generation is cut at the first stop string. Scoring is ``eval.scoring.Scorer``; generation is
``generate.Generator``. Importing ``mpt_jax.eval`` registers the name (lazily: this module loads
when lm-eval first asks for the model).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from absl import logging
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from mpt_jax.config import DTYPES

NAME = "mpt_jax"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf backend's default for a task that does not say
DEFAULT_SEED = 1234  # lm-eval's default seeds
# Generation settings a task's ``generation_kwargs`` may give, beyond until / max_gen_toks / do_sample.
SAMPLING_KWARGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{NAME}: {name}={value!r}; expected a positive integer")
    return value


def _batch_size(batch_size: Any, max_batch_size: Any) -> int:
    """lm-eval's ``batch_size``: a number, or ``auto``/``auto:N`` (here: DEFAULT_BATCH_SIZE rows, at
    most ``max_batch_size``; the rows of a compiled shape are fixed, so nothing is probed)."""
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        cap = DEFAULT_BATCH_SIZE if max_batch_size is None else _positive_int("max_batch_size", max_batch_size)
        return min(DEFAULT_BATCH_SIZE, cap)
    if isinstance(batch_size, str) and batch_size.isdigit():
        batch_size = int(batch_size)
    return _positive_int("batch_size", batch_size)


@register_model(NAME)
class MPTJaxLM(TemplateLM):
    """An mpt-jax model as an lm-eval ``LM``: ``loglikelihood``, ``loglikelihood_rolling`` and
    ``generate_until``.

    ``pretrained``: an HF folder or hub id, an mpt-jax model checkpoint or a training workdir.
    ``dtype``: float32 / bfloat16 / float16 (None or "auto": as stored). ``batch_size``: rows per
    forward and cache rows for generation. ``max_length``: the longest input (default the model's
    ``max_seq_len``; an ALiBi model may be given more). ``max_gen_toks``: tokens generated when a
    task does not say. ``seed``: sampling seed (request i of a batch uses ``seed + i``).
    ``prefix_token_id``: the token that stands in for an empty context (default BOS, else EOS).
    ``device`` and ``max_batch_size`` are what lm-eval passes every backend: JAX places the model on
    its default backend, and ``max_batch_size`` caps ``batch_size=auto``.
    """

    def __init__(
        self,
        pretrained: str,
        *,
        dtype: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int = DEFAULT_SEED,
        prefix_token_id: int | None = None,
        device: str | None = None,
        **unknown: Any,
    ):
        super().__init__()
        if unknown:
            raise ValueError(
                f"{NAME}: unknown model_args {sorted(unknown)}; accepted: pretrained, dtype, batch_size, "
                "max_batch_size, max_length, max_gen_toks, seed, prefix_token_id, device"
            )
        if not isinstance(pretrained, str | os.PathLike) or not str(pretrained):
            raise ValueError(f"{NAME}: pretrained={pretrained!r}; expected a checkpoint path or hub id")
        dtype = None if dtype in (None, "auto") else str(dtype)
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"{NAME}: dtype={dtype!r}; expected one of {DTYPES}, 'auto' or None")
        self._batch_size = _batch_size(batch_size, max_batch_size)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.seed = int(seed)
        if max_length is not None:
            max_length = _positive_int("max_length", max_length)
        import jax

        import mpt_jax
        from mpt_jax.eval.scoring import Scorer
        from mpt_jax.load import with_max_seq_len

        if device is not None:
            logging.info("%s: device=%s is not used; JAX runs on %s", NAME, device, jax.default_backend())
        self.pretrained = str(pretrained)
        self.cfg, self.params, self.tokenizer = mpt_jax.load(self.pretrained, dtype=dtype, scan_layers=False)
        if self.tokenizer is None:
            raise ValueError(f"{NAME}: {self.pretrained} has no tokenizer; lm-eval gives text, so one is needed")
        if max_length is not None and max_length > self.cfg.max_seq_len:  # ALiBi/RoPE only (else an error)
            self.cfg = with_max_seq_len(self.cfg, max_length)
        self._max_length = max_length or self.cfg.max_seq_len
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.scorer = Scorer(self.cfg, self.params, batch_size=self._batch_size, max_length=self._max_length)
        self._generator = None  # built on first use: scoring-only tasks never compile the decoder

    # -- what lm-eval asks of a backend --

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and a document's first window condition on: as the hf backend
        chooses it (a given id, else BOS, else EOS)."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_id
        return self.tokenizer.eos_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name.replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        import jax

        n = sum(int(x.size) for x in jax.tree.leaves(self.params))
        return {"model_num_parameters": n, "model_dtype": self.cfg.param_dtype, "model_backend": NAME}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids as transformers' fast tokenizer gives them: the tokenizer.json's post-processor
        runs (``add_special_tokens``, default True) unless the text already starts with the prefix token."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tokenizer.decode([self.prefix_token_id]))
        ids = self.tokenizer.tk.encode(string, add_special_tokens=add_special_tokens).ids
        left = kwargs.get("left_truncate_len")
        return ids[-left:] if left else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        """(log-prob, greedy) of each (key, context ids, continuation ids); equal requests are scored once."""
        unique: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        for _, context, continuation in requests:
            unique.setdefault((tuple(context), tuple(continuation)), len(unique))
        scores = self.scorer.loglikelihood(list(unique))
        out = []
        for key, context, continuation in requests:
            logprob, greedy = scores[unique[(tuple(context), tuple(continuation))]]
            answer = (logprob, greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each document's log-probability in lm-eval's disjoint windows of ``max_length`` (the first
        conditioned on the prefix token, each later one on the tokens before it); all windows of all
        documents are scored together."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, cut before the first stop string (``until`` plus the EOS text);
        requests with the same generation settings are generated together, ``batch_size`` rows at a time."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str] = [""] * len(requests)
        for members in groups.values():
            gen_kwargs = requests[members[0]].args[1]
            texts = self._generate([requests[i].args[0] for i in members], gen_kwargs)
            for i, text in zip(members, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
        max_gen_toks = kwargs.pop("max_gen_toks")
        do_sample = kwargs.pop("do_sample")
        temperature = float(kwargs.pop("temperature", 0.0))
        unknown = sorted(set(kwargs) - set(SAMPLING_KWARGS))
        if unknown:
            raise ValueError(f"{NAME}: generation_kwargs {unknown} are not supported (known: {SAMPLING_KWARGS})")
        if do_sample and temperature <= 0.0:
            raise ValueError(f"{NAME}: generation_kwargs do_sample=True needs temperature > 0, got {temperature}")
        if not do_sample:
            temperature = 0.0
        room = self.max_length - max_gen_toks
        if room < 1:
            raise ValueError(
                f"{NAME}: max_gen_toks={max_gen_toks} leaves no room for a context in max_length={self.max_length}"
            )
        prompts = [self.tok_encode(c)[-room:] for c in contexts]
        empty = [i for i, p in enumerate(prompts) if not p]
        if empty:
            raise ValueError(f"{NAME}: generate_until got an empty context (request {empty[0]} of its group)")
        completions = self.generator.generate(
            prompts,
            max_new_tokens=max_gen_toks,
            temperature=temperature,
            seed=[self.seed + i for i in range(len(prompts))],
            stop=until,
            **kwargs,
        )
        # The generator stops at the first stop string; the text is re-decoded as the hf backend
        # decodes it (special tokens dropped) and cut there.
        return [postprocess_generated_text(self.tok_decode(c.token_ids), until, None) for c in completions]

    @property
    def generator(self):
        if self._generator is None:
            from mpt_jax.generate import Generator

            self._generator = Generator(self.cfg, self.params, self.tokenizer, max_batch=self.batch_size)
        return self._generator


# ------------------------------------------------------------------------------------------------
# The CLI: python -m mpt_jax.eval harness --model=PATH --tasks=...


def run_harness(
    model: str,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str = DEFAULT_BATCH_SIZE,
    dtype: str | None = None,
    max_length: int | None = None,
    output_path: str | None = None,
    log_samples: bool = False,
    seed: int = DEFAULT_SEED,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:
    """Runs lm-eval's ``tasks`` (registry names, or tasks under ``include_path``) on ``model`` through
    the ``mpt_jax`` backend; prints lm-eval's results table and, with ``output_path``, writes the
    results as JSON there (a new file: an existing one is an error, checked before any work).
    ``bootstrap_iters`` (lm-eval's default) estimates the stderr of perplexity-like metrics; 0 skips
    it. Returns lm-eval's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mpt_jax.files import check_new_file, write_new_json

    tasks = [t for t in tasks if t]
    if not tasks:
        raise ValueError("harness: no tasks given (--tasks=name[,name...])")
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"harness: --include_path={include_path} is not a folder")
    if output_path is not None:
        check_new_file(output_path)
    manager = TaskManager(include_path=include_path)
    missing = [t for t in tasks if not manager.match_tasks([t]) and not os.path.isfile(t)]
    if missing:
        where = f" (nor under {include_path})" if include_path else ""
        raise ValueError(f"harness: unknown tasks {missing} in lm-eval's registry{where}")
    lm = MPTJaxLM(model, dtype=dtype, batch_size=batch_size, max_length=max_length, seed=seed)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    results["config"]["model"] = NAME
    results["config"]["model_args"] = {"pretrained": model, "dtype": dtype, "max_length": lm.max_length}
    print(lm_utils.make_table(results))
    if "groups" in results:
        print(lm_utils.make_table(results, "groups"))
    if output_path is not None:
        path = write_new_json(output_path, jsonable(results))
        logging.info("harness: results written to %s", path)
    return results


def jsonable(value: Any) -> Any:
    """lm-eval's results with what JSON cannot hold (numpy scalars, callables, sets) made plain."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return str(value)
