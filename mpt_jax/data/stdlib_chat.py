"""The embedded chat corpus (``stdlib-chat``): conversations about the Python standard library.

Chat finetuning needs conversations; like the pretraining default, these are built offline from
what every Python install ships: the docstrings of the standard library's public modules, classes,
functions and methods (read with ``ast`` from the same files as the ``stdlib`` corpus; nothing is
imported). Each conversation is a ``{"messages": [...]}`` record for the ``chat`` format:

- a module: "What is the `json` module for?" -> the first paragraph of its docstring;
- a class, function or method: a question from ``QUESTIONS`` (picked by a hash of the name), e.g.
  "What does `json.dumps` do?" -> the first paragraph; then, for functions, methods and classes with
  an ``__init__``, "Show me its signature." -> ```json.dumps(obj, *, skipkeys=False, ...)```.

A conversation is in the validation split when its module's file is in the ``stdlib`` corpus's
validation split (``sources.is_validation``), so a model pretrained on ``stdlib`` and finetuned on
``stdlib-chat`` is evaluated on modules it saw in neither. The corpus depends only on the
installed Python's standard library, is rebuilt identically from it, and is written once (atomically,
under a lock) to ``DATA_DIR/python_stdlib_chat/VERSION/{train,validation}.jsonl``.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Iterator

from absl import logging

from mpt_jax.data import sources
from mpt_jax.files import atomic_output_dir

NAME = "python_stdlib_chat"
VERSION = "1.0.0"
QUESTIONS = ("What does `{name}` do?", "What is `{name}` for?", "Explain `{name}` briefly.")
SIGNATURE_QUESTION = "Show me its signature."
# First paragraphs outside these lengths are mostly fragments or whole manuals.
MIN_ANSWER, MAX_ANSWER = 10, 600

Functions = ast.FunctionDef | ast.AsyncFunctionDef


def build_stdlib_chat(data_dir: str | None = None) -> dict[str, str]:
    """Builds the corpus into ``data_dir`` unless already built; returns ``{split: jsonl path}``."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir or sources.default_data_dir()))
    out = os.path.join(data_dir, NAME, VERSION)
    paths = {split: os.path.join(out, f"{split}.jsonl") for split in sources.SPLITS}
    if os.path.isdir(out):  # complete: the folder appears by rename once written
        return paths
    os.makedirs(data_dir, exist_ok=True)
    with sources.file_lock(os.path.join(data_dir, f".{NAME}.lock")):
        if not os.path.isdir(out):  # another process may have built it while we waited
            logging.info("building the %s corpus into %s", NAME, out)
            with atomic_output_dir(out) as tmp:
                _write_splits(tmp)
    return paths


def _write_splits(folder: str) -> None:
    files = {split: open(os.path.join(folder, f"{split}.jsonl"), "w", encoding="utf-8") for split in sources.SPLITS}
    try:
        for validation, messages in conversations():
            files["validation" if validation else "train"].write(json.dumps({"messages": messages}) + "\n")
    finally:
        for f in files.values():
            f.close()


def conversations() -> Iterator[tuple[bool, list[dict[str, str]]]]:
    """(in the validation split, messages) for every conversation, in a fixed order."""
    root = sources.stdlib_root()
    for path in sources.stdlib_files():
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        module = _module_name(rel)
        if module is None:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            try:
                tree = ast.parse(f.read())
            except SyntaxError:  # a file for another Python version; the corpus is what parses
                continue
        validation = sources.is_validation(rel)
        for messages in _module_conversations(module, tree):
            yield validation, messages


def _module_name(rel: str) -> str | None:
    """``json/decoder.py`` -> ``json.decoder``; None for private modules (a part starting with ``_``)."""
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or any(p.startswith("_") for p in parts):
        return None
    return ".".join(parts)


def _module_conversations(module: str, tree: ast.Module) -> Iterator[list[dict[str, str]]]:
    answer = first_paragraph(ast.get_docstring(tree))
    if answer:
        yield _chat(f"What is the `{module}` module for?", answer)
    for node in tree.body:
        if isinstance(node, Functions) and _public(node.name):
            yield from _named(f"{module}.{node.name}", node, _signature(f"{module}.{node.name}", node))
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            name = f"{module}.{node.name}"
            init = next((n for n in node.body if isinstance(n, Functions) and n.name == "__init__"), None)
            yield from _named(name, node, _signature(name, init, drop_first=True) if init else None)
            for child in node.body:
                if isinstance(child, Functions) and _public(child.name):
                    yield from _named(f"{name}.{child.name}", child, _signature(f"{name}.{child.name}", child))


def _public(name: str) -> bool:
    return not name.startswith("_")


def _named(name: str, node: ast.AST, signature: str | None) -> Iterator[list[dict[str, str]]]:
    answer = first_paragraph(ast.get_docstring(node))
    if not answer:
        return
    question = QUESTIONS[sources.hash64(name.encode("utf-8")) % len(QUESTIONS)].format(name=name)
    messages = _chat(question, answer)
    if signature:
        messages += [{"role": "user", "content": SIGNATURE_QUESTION}, {"role": "assistant", "content": signature}]
    yield messages


def _chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _signature(name: str, node: Functions, drop_first: bool = False) -> str:
    """``name(args)`` as written in the source (annotations and defaults included)."""
    args = node.args
    if drop_first:  # a class's signature is its __init__'s without self
        args = ast.arguments(
            posonlyargs=args.posonlyargs[1:],
            args=args.args[1:] if not args.posonlyargs else args.args,
            vararg=args.vararg,
            kwonlyargs=args.kwonlyargs,
            kw_defaults=args.kw_defaults,
            kwarg=args.kwarg,
            defaults=args.defaults,
        )
    return f"`{name}({ast.unparse(args)})`"


def first_paragraph(doc: str | None) -> str | None:
    """A docstring's first paragraph on one line, or None when missing or of an unhelpful length."""
    if not doc:
        return None
    paragraph = " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())
    return paragraph if MIN_ANSWER <= len(paragraph) <= MAX_ANSWER else None
