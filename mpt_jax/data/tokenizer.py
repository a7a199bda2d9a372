"""Tokenizers: any HF tokenizer by hub name or local path, and a byte-level BPE trained locally.

MPT uses EleutherAI/gpt-neox-20b (``<|endoftext|>`` = id 0 is BOS/EOS, no BOS added on encode).
The embedded default corpus gets its own byte-level BPE, trained once on its train split and
cached as ``tokenizer.json`` in the data directory. Both are wrapped in ``Tokenizer``, which the
pipeline uses: ``encode`` adds no special tokens; documents are ended with ``eos_id`` by the
formats, as llm-foundry's ``concat_tokens`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import tokenizers

EOS = "<|endoftext|>"
PAD = "<|padding|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TOKENS = (IM_START, IM_END)


class Tokenizer:
    """A thin, picklable wrapper over ``tokenizers.Tokenizer`` (grain workers receive a copy)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, name: str, eos_token: str = EOS):
        self.tk = tokenizer
        self.name = name
        eos = tokenizer.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"tokenizer {name}: no end-of-text token {eos_token!r} in its vocabulary")
        self.eos_id: int = eos
        self.eos_token = eos_token

    # Pickling through the JSON form keeps workers independent of the tokenizers build.
    def __getstate__(self):
        return {"json": self.tk.to_str(), "name": self.name, "eos_token": self.eos_token}

    def __setstate__(self, state):
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]), name=state["name"], eos_token=state["eos_token"])

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """A short hash of the base vocabulary (token -> id, added tokens such as ChatML left out):
        equal for the same tokenizer however it is named or found, so tokenized data can be
        matched to the run that reads it."""
        vocab = sorted(self.tk.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def with_chatml(self) -> Tokenizer:
        """A copy with ``<|im_start|>`` and ``<|im_end|>`` as special tokens (new ids if missing)."""
        tk = tokenizers.Tokenizer.from_str(self.tk.to_str())
        tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in CHATML_TOKENS])
        return Tokenizer(tk, name=self.name, eos_token=self.eos_token)

    def save(self, path: str) -> None:
        """Writes ``tokenizer.json`` (atomically)."""
        tmp = f"{path}.tmp-{os.getpid()}"
        self.tk.save(tmp)
        os.replace(tmp, path)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` file, a folder holding one, or an HF hub name."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer: no tokenizer.json in folder {name_or_path}")
    if os.path.isfile(path):
        try:
            tk = tokenizers.Tokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"tokenizer: {path} is not a valid tokenizer.json ({e})") from None
        return Tokenizer(tk, name=name_or_path)
    if path.startswith((".", "/")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"tokenizer: {name_or_path} is neither a file, a folder, nor a hub name 'owner/name'")
    try:
        tk = tokenizers.Tokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise FileNotFoundError(f"tokenizer: could not fetch {name_or_path} from the hub ({e})") from None
    return Tokenizer(tk, name=name_or_path)


def train_bpe(texts: Iterable[str], vocab_size: int, *, name: str = "bpe") -> Tokenizer:
    """Trains a byte-level BPE (GPT-2/NeoX style) with ``<|endoftext|>`` as id 0 and ``<|padding|>`` 1."""
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tk, name=name)
