"""Prompt formats: the one place that turns instructions and chats into model text.

Used by finetuning (``data/formats.py``), generation, chat and serving, so that a model is prompted at
inference exactly as it was trained. Three kinds:

- the released instruct templates (``TEMPLATES``): MPT-7B-Instruct (Dolly) and MPT-30B-Instruct, plus
  ``plain`` (the instruction as is); a template is a format string with one ``{instruction}`` field;
- ChatML (MPT-7B/30B-Chat, and every chat run here): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per
  message, ``<|im_start|>assistant\\n`` to ask for a reply;
- a tokenizer's own ``chat_template`` (Jinja, from its ``tokenizer_config.json``), rendered the way
  transformers' ``apply_chat_template`` renders it: a sandboxed environment with ``trim_blocks`` and
  ``lstrip_blocks``, the variables ``messages``, ``add_generation_prompt`` and the tokenizer's special
  tokens (``bos_token``, ``eos_token``, ...), and the helpers ``raise_exception``, ``tojson`` and
  ``strftime_now``.

``prompt_format(tokenizer, name)`` picks one for a model; ``render_chat`` and ``render_instruction`` render
with it; ``stop_token_ids`` says where a reply ends. Nothing here imports JAX or the data pipeline.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

    from mpt_jax.data.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------------------------------
# Instruct templates (model cards; /work/shared/mpt_spec.md 3.3)

_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

TEMPLATES: dict[str, str] = {
    # llm-foundry's databricks_dolly_15k preprocessor (the MPT-7B-Instruct finetuning data); the model card prints
    # the same text with single newlines, but the training code uses these "\n\n" separators.
    "mpt-7b-instruct": _PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    # Exactly as on the MPT-30B-Instruct card: no colons, no space in "###Instruction".
    "mpt-30b-instruct": _PREAMBLE + "\n\n###Instruction\n{instruction}\n\n### Response\n",
    "plain": "{instruction}",
}

# MPT-30B-Chat's default system prompt (model card / LF-2023 hf_chat.py).
MPT_30B_CHAT_SYSTEM_PROMPT = (
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
)


def resolve_template(template: str) -> str:
    """A template name from ``TEMPLATES``, or a literal format string with an ``{instruction}`` placeholder."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if not isinstance(template, str) or "{instruction}" not in template:
        raise ValueError(
            f"unknown prompt template {template!r}: use one of {sorted(TEMPLATES)} "
            "or a format string containing '{instruction}'"
        )
    try:
        template.format(instruction="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"prompt template {template!r} is not a valid format string with only {{instruction}} ({e})"
        ) from None
    return template


def render_instruction(instruction: str, template: str = "mpt-7b-instruct") -> str:
    """``instruction`` in an instruct template (a ``TEMPLATES`` name or a format string with ``{instruction}``):
    the prompt an instruct model answers, exactly as its finetuning data was written."""
    if not isinstance(instruction, str):
        raise ValueError(f"instruction must be a string, got {type(instruction).__name__}")
    return resolve_template(template).format(instruction=instruction)


# ---------------------------------------------------------------------------------------------------------------------
# ChatML

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TOKENS = (IM_START, IM_END)
CHAT_ROLES = ("system", "user", "assistant")

# transformers' chat template for exactly the layout of ``render_chatml`` (what a chat run's tokenizer carries).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render_chatml(messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> str:
    """The ChatML text: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message (llm-foundry's default chat
    template, MPT-7B/30B-Chat); with ``add_generation_prompt``, ``<|im_start|>assistant\\n`` is appended (inference).
    A system message, if any, is simply the first message (``render_chat(..., system=)`` adds one)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


# ---------------------------------------------------------------------------------------------------------------------
# A tokenizer's own chat_template (Jinja), as transformers renders it


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    # transformers' override: Jinja's own tojson escapes HTML characters, which chat templates do not want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """The compiled Jinja template (cached per template string). A syntax error is a ValueError with its line.

    Hub templates are untrusted code: they run in jinja2's immutable sandbox (no attribute starting with ``_``,
    no mutation of the inputs), as in transformers. ``{% generation %}`` blocks (transformers' assistant-mask
    marker) render their body.
    """
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: line {e.lineno}: {e.message}") from None


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str] | None = None,
    **variables: Any,
) -> str:
    """``messages`` rendered with a Jinja chat template, as ``tokenizer.apply_chat_template(messages,
    tokenize=False, add_generation_prompt=...)`` renders it: messages lose their keys whose value is None,
    ``special_tokens`` (``bos_token``, ``eos_token``, ... as strings) are variables, and ``variables`` override
    them. A template's ``raise_exception(msg)`` becomes a ValueError with its message."""
    import jinja2

    plain = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    context = {**dict(special_tokens or {}), **variables}
    try:
        return compile_chat_template(template).render(
            messages=plain, add_generation_prompt=add_generation_prompt, **context
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat_template: {e}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Choosing and using a format


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a model is prompted.

    ``name`` is ``"chatml"``, ``"chat_template"`` (the tokenizer's own Jinja ``template``), or an instruct
    template name from ``TEMPLATES`` (``template`` is then its format string; ``"plain"`` passes the text as is).
    """

    name: str
    template: str | None = None

    @property
    def is_chat(self) -> bool:
        """Whether the format renders multi-turn chats (ChatML or a chat template)."""
        return self.name in ("chatml", "chat_template")


FORMAT_NAMES = ("chatml", "chat_template", *TEMPLATES)

# The conversations that tell a ChatML template from another: with and without a system message, both ways.
_PROBES = (
    [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
)


def is_chatml_template(template: str) -> bool:
    """Whether ``template`` renders exactly as ``render_chatml`` (a template that adds a default system message,
    or anything else, does not); decided by rendering probe conversations, so any spelling of ChatML counts."""
    try:
        return all(
            render_chat_template(template, probe, add_generation_prompt=prompt)
            == render_chatml(probe, add_generation_prompt=prompt)
            for probe in _PROBES
            for prompt in (False, True)
        )
    except Exception:  # noqa: BLE001 - a template that fails on the probes is not ChatML, whatever it raised
        return False


def has_chatml_tokens(tokenizer: Tokenizer | None) -> bool:
    return tokenizer is not None and all(tokenizer.token_to_id(t) is not None for t in CHATML_TOKENS)


def prompt_format(tokenizer: Tokenizer | None, name: str | None = None) -> PromptFormat:
    """The prompt format for a model with ``tokenizer``: ``name`` when given (one of ``FORMAT_NAMES``, or a
    format string with ``{instruction}``), else chosen from the tokenizer.

    Chosen: the tokenizer's ``chat_template`` when it has one ("chatml" when that template is plain ChatML;
    a template with a default system message stays "chat_template", so the default is kept); "chatml" for a
    tokenizer with the ChatML tokens and no template; otherwise "plain" (a base model continues the text).
    Instruct models are named: nothing in their tokenizer says which template they were finetuned with.
    """
    template = getattr(tokenizer, "chat_template", None)
    if name is None:
        if template:
            return PromptFormat("chatml") if is_chatml_template(template) else PromptFormat("chat_template", template)
        return PromptFormat("chatml") if has_chatml_tokens(tokenizer) else PromptFormat("plain", TEMPLATES["plain"])
    if name == "chatml":
        return PromptFormat("chatml")
    if name == "chat_template":
        if not template:
            which = "no tokenizer" if tokenizer is None else f"tokenizer {tokenizer.name}"
            raise ValueError(f"prompt format 'chat_template': {which} has no chat_template (tokenizer_config.json)")
        return PromptFormat("chat_template", template)
    try:
        return PromptFormat(name, resolve_template(name))
    except ValueError:
        raise ValueError(
            f"unknown prompt format {name!r}: use one of {FORMAT_NAMES} or a format string containing '{{instruction}}'"
        ) from None


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{role, content}} dicts, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string, got {type(m['content']).__name__}")
        out.append(dict(m))
    return out


def special_tokens(tokenizer: Tokenizer | None) -> dict[str, str]:
    """The template variables transformers passes from a tokenizer: ``bos_token``, ``eos_token``, ... (set ones)."""
    return dict(getattr(tokenizer, "special_tokens", None) or {})


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    fmt: PromptFormat,
    tokenizer: Tokenizer | None = None,
    *,
    add_generation_prompt: bool = True,
    system: str | None = None,
) -> str:
    """The prompt text of a chat in ``fmt``; by default ready for the assistant's reply.

    ``system`` is prepended as a system message when the chat has none. ChatML renders roles ``system``,
    ``user`` and ``assistant``; a chat template decides itself what it accepts. An instruct format takes one
    user message (its instruction): it knows no turns.
    """
    messages = _check_messages(messages)
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    if fmt.name == "chatml":
        for i, m in enumerate(messages):
            if m["role"] not in CHAT_ROLES:
                raise ValueError(f"message {i}: role {m['role']!r} is not a ChatML role {CHAT_ROLES}")
        return render_chatml(messages, add_generation_prompt=add_generation_prompt)
    if fmt.name == "chat_template":
        return render_chat_template(
            fmt.template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=special_tokens(tokenizer),
        )
    if len(messages) != 1 or messages[0]["role"] != "user":
        roles = [m["role"] for m in messages]
        raise ValueError(
            f"prompt format {fmt.name!r} is an instruction template: it takes one user message, got roles {roles}"
        )
    return render_instruction(messages[0]["content"], fmt.template or fmt.name)


def stop_token_ids(fmt: PromptFormat, tokenizer: Tokenizer) -> list[int]:
    """The ids that end a reply: the tokenizer's EOS, and ``<|im_end|>`` for ChatML (or a chat template that
    writes it) when the tokenizer has it: FastChat's stop ids for MPT-Chat are exactly these two."""
    ids = [tokenizer.eos_id]
    end = tokenizer.token_to_id(IM_END)
    chatml = fmt.name == "chatml" or (fmt.name == "chat_template" and IM_END in (fmt.template or ""))
    if chatml and end is not None and end not in ids:
        ids.append(end)
    return ids
