"""Prompt formats (mpt_jax/prompts.py): instruct templates as on the model cards, ChatML and tokenizer chat
templates rendered exactly as transformers' ``apply_chat_template`` renders them, and the format chooser."""

from __future__ import annotations

import pytest

from mpt_jax import prompts
from mpt_jax.data import formats
from mpt_jax.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from mpt_jax.prompts import (
    CHATML_TEMPLATE,
    PromptFormat,
    prompt_format,
    render_chat,
    render_chat_template,
    render_chatml,
    render_instruction,
    stop_token_ids,
)

TEXTS = ["Hello there, how are you?\n", "def f(x):\n    return x\n", "The rain in Spain.\n"] * 30

CONVERSATIONS = {
    "system_user_assistant": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Write code:\n  def f(): pass"},
    ],
    "user_only": [{"role": "user", "content": "What is 2+2?"}],
    "ends_with_assistant": [
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": " spaced  reply\n"},
    ],
}

# Chat templates as hub tokenizers carry them: Jinja written for transformers (whitespace control, loop
# variables, namespaces, bos/eos variables, raise_exception, tojson, a default system message, generation blocks).
HUB_TEMPLATES = {
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # Multi-line with {%- -%} and block-level trim/lstrip, as zephyr's.
    "zephyr": """{% for message in messages %}
    {% if message['role'] == 'user' %}
        {{ '<|user|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
        {{ '<|system|>\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
        {{ '<|assistant|>\n'  + message['content'] + eos_token }}
    {% endif %}
    {%- if loop.last and add_generation_prompt %}
        {{ '<|assistant|>' }}
    {% endif %}
{% endfor %}""",
    # ChatML with MPT-30B-Chat's default system prompt, a namespace and tojson.
    "chatml_default_system": (
        "{% set ns = namespace(sys=false) %}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set ns.sys = true %}{% endif %}{% endfor %}{% if not ns.sys %}"
        "{{ '<|im_start|>system\\n' + 'A conversation between a user and an LLM-based AI assistant. The assistant "
        "gives helpful and honest answers.' + '<|im_end|>\\n' }}{% endif %}"
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}{{ '' if messages | length < 9 else (messages | length) | tojson }}"
    ),
    "generation_block": (
        "{% for message in messages %}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + eos_token }}{% endgeneration %}{% else %}{{ message['role'] + ': ' + "
        "message['content'] + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
    ),
}


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(TEXTS, 300, name="test-bpe")


def hf_tokenizer(tok: Tokenizer, folder):
    """transformers' own tokenizer for ``tok``, from the folder ``save_pretrained`` writes."""
    from transformers import AutoTokenizer

    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------------
# Instruct templates: the model cards' strings, written out here, not read from TEMPLATES.


def test_instruct_templates_are_the_model_cards():
    preamble = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    )
    assert render_instruction("Name a color.", "mpt-7b-instruct") == (
        preamble + "\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )
    assert render_instruction("Name a color.", "mpt-30b-instruct") == (
        preamble + "\n\n###Instruction\nName a color.\n\n### Response\n"
    )
    assert render_instruction("as is {x}", "plain") == "as is {x}"
    assert render_instruction("Q", "Question: {instruction}\nAnswer:") == "Question: Q\nAnswer:"
    assert (
        prompts.MPT_30B_CHAT_SYSTEM_PROMPT
        == "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
    )
    with pytest.raises(ValueError, match="unknown prompt template 'mpt-13b'"):
        render_instruction("x", "mpt-13b")


def test_data_formats_use_the_same_templates_and_chatml():
    """One source: the finetuning formats render with exactly these objects."""
    assert formats.TEMPLATES is prompts.TEMPLATES
    assert formats.render_chatml is prompts.render_chatml
    assert formats.resolve_template is prompts.resolve_template
    assert formats.MPT_30B_CHAT_SYSTEM_PROMPT is prompts.MPT_30B_CHAT_SYSTEM_PROMPT


# ---------------------------------------------------------------------------------------------------------------------
# ChatML and chat templates against transformers


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chatml_equals_transformers_apply_chat_template(bpe, tmp_path, name, generation_prompt):
    hf = hf_tokenizer(bpe.with_chatml(), tmp_path)
    messages = CONVERSATIONS[name]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert render_chatml(messages, add_generation_prompt=generation_prompt) == want
    assert render_chat_template(CHATML_TEMPLATE, messages, add_generation_prompt=generation_prompt) == want
    fmt = prompt_format(bpe.with_chatml())
    assert fmt == PromptFormat("chatml")
    assert render_chat(messages, fmt, add_generation_prompt=generation_prompt) == want


def test_chatml_system_message_is_prepended_only_when_missing(bpe, tmp_path):
    hf = hf_tokenizer(bpe.with_chatml(), tmp_path)
    user = [{"role": "user", "content": "Hi"}]
    fmt = PromptFormat("chatml")
    got = render_chat(user, fmt, system="Be brief.")
    assert got == hf.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *user], tokenize=False, add_generation_prompt=True
    )
    assert got.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert got.endswith("<|im_start|>assistant\n")
    with_system = CONVERSATIONS["system_user_assistant"]
    assert render_chat(with_system, fmt, system="ignored") == render_chatml(with_system, add_generation_prompt=True)


@pytest.mark.parametrize("name", sorted(HUB_TEMPLATES))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_tokenizer_config_chat_template_renders_as_transformers(bpe, tmp_path, name, generation_prompt):
    """The template travels in tokenizer_config.json; our loaded tokenizer renders it as transformers does."""
    tok = Tokenizer(bpe.tk, name="t", special_tokens={"bos_token": "<|padding|>"}, chat_template=HUB_TEMPLATES[name])
    hf = hf_tokenizer(tok, tmp_path)
    ours = load_tokenizer(str(tmp_path))
    assert ours.chat_template == HUB_TEMPLATES[name] == hf.chat_template
    fmt = prompt_format(ours)
    assert fmt == PromptFormat("chat_template", HUB_TEMPLATES[name])
    for messages in CONVERSATIONS.values():
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert render_chat(messages, fmt, ours, add_generation_prompt=generation_prompt) == want


def test_raise_exception_and_the_sandbox_are_value_errors(bpe, tmp_path):
    bad_roles = [{"role": "assistant", "content": "x"}]
    hf = hf_tokenizer(Tokenizer(bpe.tk, name="t", chat_template=HUB_TEMPLATES["llama2"]), tmp_path)
    with pytest.raises(Exception, match="Conversation roles must alternate"):  # transformers refuses it too
        hf.apply_chat_template(bad_roles, tokenize=False)
    with pytest.raises(ValueError, match="chat_template: Conversation roles must alternate"):
        render_chat_template(
            HUB_TEMPLATES["llama2"], bad_roles, special_tokens={"bos_token": "<s>", "eos_token": "</s>"}
        )
    with pytest.raises(ValueError, match="chat_template: "):  # sandbox: no dunder attributes
        render_chat_template("{{ messages.__class__.__mro__ }}", bad_roles)
    with pytest.raises(ValueError, match="chat_template: "):  # immutable sandbox: inputs cannot be changed
        render_chat_template("{{ messages.append(1) }}", bad_roles)
    with pytest.raises(ValueError, match="chat_template: line 1"):
        render_chat_template("{% for m in messages %}", bad_roles)


def test_chat_template_jinja_file_wins_as_in_transformers(bpe, tmp_path):
    """transformers 5 saves a chat template to chat_template.jinja; that file takes priority over the config."""
    from transformers import AutoTokenizer

    tok = Tokenizer(bpe.tk, name="t", chat_template=HUB_TEMPLATES["zephyr"])
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == CHATML_TEMPLATE
    assert load_tokenizer(str(tmp_path)).chat_template == CHATML_TEMPLATE


# ---------------------------------------------------------------------------------------------------------------------
# The chooser


def test_prompt_format_chooses_from_the_tokenizer(bpe):
    assert prompt_format(bpe) == PromptFormat("plain", "{instruction}")
    assert prompt_format(None) == PromptFormat("plain", "{instruction}")
    chat = bpe.with_chatml()
    assert chat.chat_template == CHATML_TEMPLATE and prompt_format(chat).name == "chatml"
    # ChatML tokens without a template; a ChatML template spelled differently.
    assert prompt_format(Tokenizer(chat.tk, name="t")).name == "chatml"
    spelled = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    spelled += "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    assert prompt_format(Tokenizer(bpe.tk, name="t", chat_template=spelled)).name == "chatml"
    # A ChatML template with a default system message keeps it: the template is used.
    default_sys = Tokenizer(chat.tk, name="t", chat_template=HUB_TEMPLATES["chatml_default_system"])
    fmt = prompt_format(default_sys)
    assert fmt.name == "chat_template" and fmt.is_chat
    assert render_chat([{"role": "user", "content": "Hi"}], fmt, default_sys).startswith(
        "<|im_start|>system\nA conversation between a user"
    )
    # By name.
    assert prompt_format(bpe, "mpt-30b-instruct") == PromptFormat(
        "mpt-30b-instruct", prompts.TEMPLATES["mpt-30b-instruct"]
    )
    assert prompt_format(bpe, "chatml") == PromptFormat("chatml")
    assert prompt_format(default_sys, "chat_template").template == HUB_TEMPLATES["chatml_default_system"]
    with pytest.raises(ValueError, match="tokenizer test-bpe has no chat_template"):
        prompt_format(bpe, "chat_template")
    with pytest.raises(ValueError, match="unknown prompt format 'llama'"):
        prompt_format(bpe, "llama")


def test_render_chat_with_an_instruct_format_takes_one_user_message(bpe):
    fmt = prompt_format(bpe, "mpt-7b-instruct")
    assert not fmt.is_chat
    assert render_chat([{"role": "user", "content": "Sum 2+2."}], fmt) == render_instruction(
        "Sum 2+2.", "mpt-7b-instruct"
    )
    with pytest.raises(
        ValueError, match=r"instruction template: it takes one user message, got roles \['system', 'user'\]"
    ):
        render_chat([{"role": "user", "content": "x"}], fmt, system="s")
    with pytest.raises(ValueError, match="message 0 must be a dict with 'role' and 'content'"):
        render_chat([{"content": "x"}], fmt)
    with pytest.raises(ValueError, match="not a ChatML role"):
        render_chat([{"role": "tool", "content": "x"}], PromptFormat("chatml"))


def test_stop_token_ids(bpe):
    chat = bpe.with_chatml()
    assert stop_token_ids(prompt_format(chat), chat) == [chat.eos_id, chat.token_to_id("<|im_end|>")]
    assert stop_token_ids(prompt_format(bpe), bpe) == [bpe.eos_id]
    zephyr = Tokenizer(chat.tk, name="t", chat_template=HUB_TEMPLATES["zephyr"])
    assert stop_token_ids(prompt_format(zephyr), zephyr) == [zephyr.eos_id]
