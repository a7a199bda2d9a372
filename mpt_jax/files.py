"""Writing outputs safely: never half-written, never overwritten unless asked."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def atomic_output_dir(path: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary folder beside ``path``; on success it becomes ``path`` by rename.

    An existing ``path`` is an error unless ``overwrite``, in which case it is replaced only after
    the new folder is complete. On any error the temporary folder is removed and ``path`` is left
    as it was.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{tag}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = os.path.join(parent, f".{os.path.basename(path)}.old-{tag}")
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        if os.path.isdir(old):
            shutil.rmtree(old)
        else:
            os.remove(old)


def check_folder_path(path: str, *, what: str) -> None:
    """Raises ValueError when ``path`` cannot become a folder: it, or the nearest existing folder
    above it, is a file. Checked before work starts, so a run does not fail at its first write."""
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    if not os.path.isdir(probe):
        where = "is a file" if probe == path else f"is inside {probe}, which is a file"
        raise ValueError(f"{what}={path} {where}; give a folder")


def read_json(path: str, *, what: str = "JSON file") -> Any:
    """Parses a JSON file; a missing file or bad JSON is an error naming the file (and line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def write_new_json(path: str, data: Any) -> str:
    """Writes ``data`` as JSON to ``path``, which must not exist (results are never overwritten):
    to a temporary file beside it, then linked into place, so a reader sees all of it or nothing
    and a file that appeared meanwhile is not replaced. Returns the absolute path."""
    path = check_new_file(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.link(tmp, path)  # fails if path appeared meanwhile, unlike a rename
    finally:
        os.remove(tmp)
    return path


def check_new_file(path: str) -> str:
    """The absolute ``path`` of an output file to be written; an error when it exists or cannot be
    created (a file where a folder is needed). Checked before the work that produces it."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; give another output path (results are never overwritten)")
    check_folder_path(os.path.dirname(path), what="output folder")
    return path
