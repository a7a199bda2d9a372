"""An interactive chat with an MPT in the terminal.

    python -m mpt_jax.chat --model=workdirs/tiny_chat [--system="You are ..."] [--temperature=0.7
        --top_p=0.9 --max_new_tokens=256 --format=chatml --max_seq_len= --quantize=int8 --dtype=]

Each reply streams as it is generated. The whole conversation is the prompt of the next reply, in
the model's chat format (ChatML for MPT-Chat and the models ``configs/tiny_chat.py`` trains, or the
tokenizer's own chat template); when it no longer fits the context the oldest turns are dropped
(the system message stays). ``/reset`` starts over, ``/exit``, Ctrl-D or Ctrl-C leave.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from mpt_jax.generate import Generator, define_model_and_sampling_flags, sampling_from_flags
from mpt_jax.prompts import PromptFormat, render_chat, stop_token_ids

COMMANDS = {"/reset": "forget the conversation", "/exit": "leave"}


class Chat:
    """A conversation with one model: ``reply(text)`` streams the assistant's answer through ``write``."""

    def __init__(
        self,
        gen: Generator,
        fmt: PromptFormat,
        *,
        system: str | None = None,
        max_new_tokens: int = 256,
        **sampling,
    ):
        if gen.tokenizer is None:
            raise ValueError("chat needs the model's tokenizer (none was found with the checkpoint)")
        if not fmt.is_chat:
            raise ValueError(f"prompt format {fmt.name!r} is not a chat format: use --format=chatml or a chat model")
        if max_new_tokens >= gen.cfg.max_seq_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room in max_seq_len={gen.cfg.max_seq_len}")
        self.gen, self.fmt, self.system = gen, fmt, system
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.stop_ids = stop_token_ids(fmt, gen.tokenizer)
        self.turns: list[dict[str, str]] = []
        self.dropped = 0  # turns dropped to fit the context so far

    def reset(self) -> None:
        self.turns, self.dropped = [], 0

    def _prompt(self) -> list[int]:
        """The conversation's tokens, oldest turns dropped (in user/assistant pairs) until the reply fits."""
        room = self.gen.cfg.max_seq_len - self.max_new_tokens
        while True:
            text = render_chat(self.turns, self.fmt, self.gen.tokenizer, system=self.system)
            ids = self.gen.tokenizer.encode(text)
            if len(ids) <= room or len(self.turns) == 1:
                return ids[-room:]  # a single message longer than the context keeps its end
            self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[-1:]
            self.dropped += 1

    def reply(self, text: str, write: Callable[[str], object]) -> str:
        """Adds the user's ``text``, streams the answer through ``write`` and returns it."""
        self.turns.append({"role": "user", "content": text})
        answer = []
        for ev in self.gen.stream(
            [self._prompt()], max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop_ids, **self.sampling
        ):
            write(ev.text)
            answer.append(ev.text)
        reply = "".join(answer)
        self.turns.append({"role": "assistant", "content": reply})
        return reply


def run(chat: Chat, stdin: TextIO, stdout: TextIO, *, interactive: bool) -> None:
    """The read-reply loop; returns at /exit, end of input or Ctrl-C."""

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    if interactive:
        write("Chat: /reset forgets, /exit (or Ctrl-D) leaves.\n")
    while True:
        if interactive:
            write("\nyou> ")
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:  # end of input (Ctrl-D)
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            chat.reset()
            write("(conversation forgotten)\n")
            continue
        write("assistant> ")
        try:
            chat.reply(text, write)
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            write(" [interrupted]")
        write("\n")
        if chat.dropped:
            write(f"(the oldest {chat.dropped} turn pair(s) no longer fit the context and were dropped)\n")
    write("\n")


def _define_flags() -> None:
    from absl import flags

    define_model_and_sampling_flags(temperature=0.7, top_p=0.95, max_new_tokens=256)
    flags.DEFINE_string("system", None, "a system message")
    flags.DEFINE_string("format", None, "chatml or chat_template (default: from the tokenizer)")


def main(argv) -> None:
    from absl import flags

    from mpt_jax.load import load
    from mpt_jax.prompts import prompt_format

    del argv
    f = flags.FLAGS
    if not f.model:
        raise ValueError("--model=PATH_OR_HUB is required")
    cfg, params, tokenizer = load(
        f.model, dtype=f.dtype, quantize=f.quantize, max_seq_len=f.max_seq_len, scan_layers=False
    )
    chat = Chat(
        Generator(cfg, params, tokenizer, max_batch=1),
        prompt_format(tokenizer, f.format),
        system=f.system,
        max_new_tokens=f.max_new_tokens,
        **sampling_from_flags(),
    )
    run(chat, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())


if __name__ == "__main__":
    from mpt_jax import cli

    cli.run("chat", _define_flags, main)
