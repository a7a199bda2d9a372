"""Tokenizers: any HF tokenizer by hub name or local path, and a byte-level BPE trained locally.

MPT uses EleutherAI/gpt-neox-20b (``<|endoftext|>`` = id 0 is BOS/EOS, no BOS added on encode).
The embedded default corpus gets its own byte-level BPE, trained once on its train split and
cached as ``tokenizer.json`` in the data directory. Both are wrapped in ``Tokenizer``, which the
pipeline, generation and every checkpoint use: ``encode`` adds no special tokens; documents are
ended with ``eos_id`` by the formats, as llm-foundry's ``concat_tokens`` does.

A tokenizer folder is what transformers reads: ``tokenizer.json`` plus ``tokenizer_config.json``
(special tokens, ``chat_template``); ``load_tokenizer`` reads one and ``Tokenizer.save_pretrained``
writes one. This module imports no JAX and no data pipeline, so loading a model's tokenizer is cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers

from mpt_jax.prompts import CHATML_TEMPLATE, CHATML_TOKENS, IM_END, IM_START

__all__ = ["CHATML_TOKENS", "EOS", "IM_END", "IM_START", "PAD", "Tokenizer", "load_tokenizer", "train_bpe"]

EOS = "<|endoftext|>"
PAD = "<|padding|>"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 saves a single chat template here
# What a tokenizer folder may hold (copied as they are when a checkpoint carries its source's tokenizer).
FOLDER_FILES = (
    "tokenizer.json",
    CONFIG_FILE,
    CHAT_TEMPLATE_FILE,
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


class Tokenizer:
    """A thin, picklable wrapper over ``tokenizers.Tokenizer`` (grain workers receive a copy).

    ``special_tokens`` maps ``bos_token``/``eos_token``/``unk_token``/``pad_token`` to token strings
    (those set; the variables a chat template sees). Without a ``tokenizer_config.json`` they are
    MPT's (gpt-neox-20b's): BOS = EOS = UNK = ``<|endoftext|>``, no pad token. ``chat_template`` is
    the tokenizer's Jinja chat template (see ``mpt_jax.prompts``) or None; ``model_max_length`` what
    transformers is told the context is (None: not said).
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        name: str,
        eos_token: str = EOS,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ):
        self.tk = tokenizer
        self.name = name
        specials = dict(bos_token=eos_token, unk_token=eos_token) if special_tokens is None else dict(special_tokens)
        specials["eos_token"] = eos_token
        unknown = sorted(set(specials) - set(SPECIAL_TOKEN_KEYS))
        if unknown:
            raise ValueError(f"tokenizer {name}: unknown special token keys {unknown} (known: {SPECIAL_TOKEN_KEYS})")
        for key, token in specials.items():
            if tokenizer.token_to_id(token) is None:
                what = "end-of-text" if key == "eos_token" else key
                raise ValueError(f"tokenizer {name}: no {what} token {token!r} in its vocabulary")
        self.special_tokens: dict[str, str] = {k: specials[k] for k in SPECIAL_TOKEN_KEYS if k in specials}
        self.eos_token = eos_token
        self.eos_id: int = tokenizer.token_to_id(eos_token)
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    # Pickling through the JSON form keeps workers independent of the tokenizers build.
    def __getstate__(self):
        return {
            "json": self.tk.to_str(),
            "name": self.name,
            "eos_token": self.eos_token,
            "special_tokens": self.special_tokens,
            "chat_template": self.chat_template,
            "model_max_length": self.model_max_length,
        }

    def __setstate__(self, state):
        self.__init__(
            tokenizers.Tokenizer.from_str(state["json"]),
            name=state["name"],
            eos_token=state["eos_token"],
            special_tokens=state.get("special_tokens"),
            chat_template=state.get("chat_template"),
            model_max_length=state.get("model_max_length"),
        )

    def __repr__(self) -> str:
        chat = ", chat_template" if self.chat_template else ""
        return f"Tokenizer({self.name!r}, {self.vocab_size} ids, eos={self.eos_token!r}{chat})"

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.tk.token_to_id(self.bos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.tk.token_to_id(self.pad_token)

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

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def with_chatml(self) -> Tokenizer:
        """A copy with ``<|im_start|>`` and ``<|im_end|>`` as special tokens (new ids if missing) and
        the ChatML ``chat_template``: what a run that trains on chat data (rendered as ChatML) uses."""
        tk = tokenizers.Tokenizer.from_str(self.tk.to_str())
        tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in CHATML_TOKENS])
        return Tokenizer(
            tk,
            name=self.name,
            eos_token=self.eos_token,
            special_tokens=self.special_tokens,
            chat_template=CHATML_TEMPLATE,
            model_max_length=self.model_max_length,
        )

    def save(self, path: str) -> None:
        """Writes ``tokenizer.json`` (atomically)."""
        tmp = f"{path}.tmp-{os.getpid()}"
        self.tk.save(tmp)
        os.replace(tmp, path)

    def config(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` transformers' ``AutoTokenizer`` reads (``PreTrainedTokenizerFast``)."""
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        if self.model_max_length is not None:
            config["model_max_length"] = int(self.model_max_length)
        config["clean_up_tokenization_spaces"] = False
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> list[str]:
        """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder`` (created if
        missing), each through a temporary file and a rename; returns their paths. Existing files
        are an error unless ``overwrite`` (then replaced, never left half-written)."""
        folder = os.fspath(folder)
        paths = [os.path.join(folder, "tokenizer.json"), os.path.join(folder, CONFIG_FILE)]
        present = [p for p in paths if os.path.exists(p)]
        if present and not overwrite:
            raise FileExistsError(f"{', '.join(present)} exists; pass overwrite=True to replace it")
        os.makedirs(folder, exist_ok=True)
        self.save(paths[0])
        _write_atomic(paths[1], json.dumps(self.config(), indent=2, ensure_ascii=False) + "\n")
        return paths


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def folder_files(folder: str | os.PathLike) -> list[str]:
    """The tokenizer files (``FOLDER_FILES``) present in ``folder``, as paths."""
    folder = os.fspath(folder)
    return [os.path.join(folder, n) for n in FOLDER_FILES if os.path.isfile(os.path.join(folder, n))]


def copy_folder_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies ``src``'s tokenizer files into ``dst`` (created if missing) as they are, so a
    checkpoint carries its source's tokenizer exactly; returns the names copied."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for path in folder_files(src):
        shutil.copy2(path, os.path.join(dst, os.path.basename(path)))
        copied.append(os.path.basename(path))
    return copied


class TokenizerFiles:
    """A folder's tokenizer files, written elsewhere as they are (``save_pretrained``): how a
    converted checkpoint keeps its source's tokenizer byte for byte, whatever transformers version
    or tokenizer type wrote it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        if not folder_files(self.folder):
            raise FileNotFoundError(f"no tokenizer files ({', '.join(FOLDER_FILES)}) in {self.folder}")

    def save_pretrained(self, folder: str | os.PathLike) -> list[str]:
        return copy_folder_files(self.folder, folder)

    def __repr__(self) -> str:
        return f"TokenizerFiles({self.folder!r})"


def _token_string(value: Any, key: str, file: str) -> str | None:
    """A special token as ``tokenizer_config.json`` spells it: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{file}: {key} must be a token string or {{'content': ...}}, got {value!r:.80}")


def _chat_template_of(config: Mapping[str, Any], folder: str, file: str) -> str | None:
    """The folder's chat template: ``chat_template.jinja`` first (as transformers reads it), else the config's
    ``chat_template`` (a string, or a list of {name, template} whose ``default`` is used)."""
    jinja = os.path.join(folder, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{file}: chat_template is a list without a 'default' template (names: {sorted(named)})")
    raise ValueError(f"{file}: chat_template must be a string or a list of templates, got {type(value).__name__}")


def _from_folder(folder: str, tk: tokenizers.Tokenizer, name: str) -> Tokenizer:
    """A tokenizer.json with what its folder's ``tokenizer_config.json`` / ``chat_template.jinja`` say."""
    file = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(file):
        return Tokenizer(tk, name=name, chat_template=_chat_template_of({}, folder, file))
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    specials = {k: _token_string(config.get(k), k, file) for k in SPECIAL_TOKEN_KEYS}
    eos = specials.pop("eos_token") or EOS
    max_length = config.get("model_max_length")
    # transformers writes a huge sentinel (1e30) for "no limit".
    max_length = int(max_length) if isinstance(max_length, int | float) and max_length < 1e12 else None
    try:
        return Tokenizer(
            tk,
            name=name,
            eos_token=eos,
            special_tokens={k: v for k, v in specials.items() if v is not None},
            chat_template=_chat_template_of(config, folder, file),
            model_max_length=max_length,
        )
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` file, a folder holding one, or an HF hub name.

    From a folder, its ``tokenizer_config.json`` (special tokens, ``chat_template``) and
    ``chat_template.jinja`` are read too; a bare ``tokenizer.json`` gets MPT's special tokens.
    """
    path = os.path.expanduser(name_or_path)
    folder = None
    if os.path.isdir(path):
        folder, path = path, os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer: no tokenizer.json in folder {name_or_path}")
    if os.path.isfile(path):
        try:
            tk = tokenizers.Tokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"tokenizer: {path} is not a valid tokenizer.json ({e})") from None
        return _from_folder(folder, tk, name_or_path) if folder else Tokenizer(tk, name=name_or_path)
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
