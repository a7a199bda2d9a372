"""Where documents come from: grain random-access sources over TFDS, local files and tokenized shards.

Every source here is what grain's ``MapDataset.source`` wants: ``len(src)`` and ``src[i]`` returning a
dict, deterministic and picklable (grain worker processes receive a copy). Text sources return
``{"text": str}``; a jsonl source read with ``text_field=None`` returns each parsed JSON object
(e.g. ``{"prompt", "response"}`` or ``{"messages": [...]}``) for the formats to interpret.

``make_source(spec, split=...)`` picks one by spec:

- ``"stdlib"``: the embedded default corpus, the Python standard library's own source code, built
  once on this machine as a TFDS dataset (``python_stdlib``, ArrayRecord) and read back through
  TFDS, so the TFDS path runs on real data with no network. Named splits train / validation.
- ``"stdlib-chat"``: the embedded chat corpus, conversations about the standard library built from
  its docstrings (``stdlib_chat.py``); the same train / validation modules as ``stdlib``.
- ``"tfds:NAME[:SPLIT]"``: a prepared TFDS dataset read with ``tfds.data_source``; its own named
  splits (a SPLIT in the spec wins over ``split``). Without TensorFlow only the ArrayRecord (or
  Parquet) file formats can be read.
- ``"files:GLOB[,GLOB...]"``: local ``.txt`` / ``.jsonl`` / ``.parquet`` files. An index of record
  offsets is built at construction (one pass), so bad input fails early, naming file and line.
- ``"tokenized:DIR"``: ArrayRecord shards of already tokenized examples written by
  ``mpt_jax.data.prepare`` with ``write_records``/``encode_record``.
- a bare path or glob (``data/*.jsonl``, ``chat.jsonl``) is ``files:`` that glob; a bare folder
  holding a ``manifest.json`` is ``tokenized:`` that folder.

Files and tokenized shards have no named splits: ``holdout_fraction`` of their records (chosen by a
stable hash of each record's identity, see ``held_out``) is the ``validation`` split and the rest
is ``train``, so the two are disjoint and together exactly the source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import re
import struct
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

TXT_MODES = ("file", "paragraph")
FILE_EXTENSIONS = (".txt", ".jsonl", ".parquet")
SPLITS = ("train", "validation")  # the pipeline's two splits
STDLIB_NAME = "python_stdlib"
STDLIB_CHAT = "stdlib-chat"
SPEC_FORMS = "'stdlib', 'stdlib-chat', 'tfds:NAME[:SPLIT]', 'files:GLOB[,GLOB...]', 'tokenized:DIR' or a bare path/glob"
# Test suites are excluded from the corpus: they are huge (19 MB), repetitive, and Lib/lib2to3/tests
# holds deliberately broken files. A path is excluded when any component (folder or file name) is
# one of these, or starts with "test_"; site-/dist-packages are third-party code, not stdlib.
_STDLIB_EXCLUDED = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
_VALIDATION_PER_MILLE = 25  # about 2.5% of files, chosen by a stable hash of their relative path
HOLDOUT_SCALE = 1000  # held-out fractions are whole per mille (0.001 steps)


# ---------------------------------------------------------------------------------------------
# The held-out rule, one for every source without named splits: a record is held out when its
# 64-bit identity hash modulo 1000 is below the fraction in per mille. The hash depends only on the
# record (its content, or its shard and row), so the split is the same on every machine and run.


def holdout_per_mille(fraction: float) -> int:
    """``fraction`` as whole per mille; ValueError unless a multiple of 0.001 in [0, 1]."""
    scaled = float(fraction) * HOLDOUT_SCALE
    per_mille = round(scaled)
    if not 0 <= per_mille <= HOLDOUT_SCALE or abs(per_mille - scaled) > 1e-6:
        raise ValueError(f"holdout_fraction={fraction!r}: must be a multiple of 0.001 between 0 and 1")
    return per_mille


def hash64(data: bytes) -> int:
    """A stable 64-bit hash (the first 8 bytes of SHA-1, little-endian)."""
    return int.from_bytes(hashlib.sha1(data).digest()[:8], "little")


def held_out(hashes: np.ndarray, per_mille: int) -> np.ndarray:
    """Which of these identity hashes (uint64) are held out at ``per_mille``."""
    return (np.asarray(hashes, np.uint64) % np.uint64(HOLDOUT_SCALE)) < per_mille


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a stable, well-spread uint64 hash of uint64 keys, vectorized."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _check_split(spec: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{spec}: split={split!r}; this source has the splits {SPLITS}")


def default_data_dir() -> str:
    """Where built datasets live: ``$MPT_JAX_DATA_DIR`` or ``~/.cache/mpt_jax/data``."""
    return os.path.expanduser(os.environ.get("MPT_JAX_DATA_DIR") or "~/.cache/mpt_jax/data")


# ---------------------------------------------------------------------------------------------
# The embedded default corpus: the Python standard library, as a TFDS dataset.


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_excluded(rel_path: str) -> bool:
    parts = rel_path.split("/")
    return any(p in _STDLIB_EXCLUDED or p.startswith("test_") for p in parts)


def stdlib_files() -> list[str]:
    """Absolute paths of the corpus' ``*.py`` files, sorted by path relative to the stdlib root."""
    root = stdlib_root()
    rels = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_EXCLUDED]  # don't walk into site-packages
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if name.endswith(".py") and not _stdlib_excluded(rel):
                rels.append(rel)
    return [os.path.join(root, *rel.split("/")) for rel in sorted(rels)]


def is_validation(rel_path: str) -> bool:
    """Whether a stdlib file (path relative to the stdlib root) is in the validation split."""
    return bool(held_out(np.array([hash64(rel_path.encode("utf-8"))], np.uint64), _VALIDATION_PER_MILLE)[0])


class PythonStdlib(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The Python standard library's source code on this machine, one document per ``.py`` file.

    Not registered with TFDS (so importing this module twice is harmless); a prepared copy is still
    readable by name: ``tfds.data_source("python_stdlib", data_dir=DIR, split="train")``.
    """

    name = STDLIB_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Python stdlib *.py files without tests or site-packages."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # No checksums file to look for beside this module. TFDS's own lookup also imports the
        # `importlib_resources` backport, which TFDS 4.9 declares only for Python < 3.9.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        # builder=self (not self.dataset_info_from_configs): this builder lives outside a TFDS package.
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Python {sys.version.split()[0]} standard library source ({stdlib_root()}).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {
            "train": self._generate_examples(validation=False),
            "validation": self._generate_examples(validation=True),
        }

    def _generate_examples(self, validation: bool) -> Iterator[tuple[str, dict[str, str]]]:
        root = stdlib_root()
        for path in stdlib_files():
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if is_validation(rel) != validation:
                continue
            with open(path, encoding="utf-8", errors="replace") as f:  # 2 stdlib files are not UTF-8
                text = f.read()
            if text.strip():  # many __init__.py files are empty
                yield rel, {"text": text, "path": rel}


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive lock between processes of this machine (e.g. several trainers building at once)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_stdlib_corpus(data_dir: str | None = None) -> str:
    """Builds the ``python_stdlib`` TFDS dataset into ``data_dir`` unless already built; returns ``data_dir``."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))
    if os.path.isfile(os.path.join(data_dir, STDLIB_NAME, str(PythonStdlib.VERSION), "dataset_info.json")):
        return data_dir  # built (TFDS writes dataset_info.json last, by renaming the finished folder)
    os.makedirs(data_dir, exist_ok=True)
    with file_lock(os.path.join(data_dir, f".{STDLIB_NAME}.lock")):
        builder = PythonStdlib(data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():  # another process may have built it while we waited
            logging.info("building the %s corpus into %s", STDLIB_NAME, data_dir)
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
    return data_dir


# ---------------------------------------------------------------------------------------------
# TFDS datasets (ArrayRecord path: no TensorFlow needed).


def _prepare_hint(name: str, data_dir: str) -> str:
    if name.split(":")[0] == STDLIB_NAME:
        return f"The stdlib corpus is built by `build_stdlib_corpus({data_dir!r})` or `make_source('stdlib')`."
    return (
        f"Prepare it once in the ArrayRecord format (without TensorFlow, TFDS can read only ArrayRecord or "
        f"Parquet): `tfds build {name} --data_dir={data_dir} --file_format=array_record`, or in Python "
        f"`tfds.builder({name!r}, data_dir={data_dir!r}, file_format='array_record').download_and_prepare()` "
        f"(building some datasets needs TensorFlow or Beam; reading them does not). A dataset already prepared "
        f"as TFRecord can be converted with `tfds convert_format --out_file_format=array_record`."
    )


class TfdsSource:
    """A prepared TFDS dataset's split; the text feature comes back as ``{"text": str}``.

    TFDS datasets are not scanned at construction (they may hold billions of documents), so unlike
    the local sources, empty documents are passed on; the stdlib corpus has none.
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, text_field: str | None = "text"):
        self.name = builder.info.full_name
        self.split = split
        self.text_field = text_field
        features = list(builder.info.features.keys())
        if text_field is not None and text_field not in features:
            raise ValueError(f"tfds:{self.name}: no feature {text_field!r} (text_field); it has {features}")
        try:
            self._ds = builder.as_data_source(split=split)
        except NotImplementedError as e:  # e.g. prepared as TFRecord, which needs TensorFlow
            raise ValueError(f"tfds:{self.name}: {e}\n{_prepare_hint(builder.name, str(builder.data_dir))}") from None
        except ValueError as e:
            if "split" not in str(e).lower():
                raise
            raise ValueError(_split_hint(builder.name, split, list(builder.info.splits))) from None

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self._ds[_check_index(i, len(self))]
        if self.text_field is not None:
            return {"text": _to_str(record[self.text_field])}
        return {k: _to_str(v) for k, v in record.items()}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name}, split={self.split!r}, {len(self)} records)"


def _split_hint(name: str, split: str, splits: list[str]) -> str:
    msg = f"tfds:{name}: no split {split!r}; it has {splits}"
    if split == "validation":
        msg += (
            f". Name the held-out data with eval_source, e.g. source='tfds:{name}:train[:99%]' and "
            f"eval_source='tfds:{name}:train[99%:]' (a TFDS slice), or eval_source='files:...'"
        )
    return msg


def _to_str(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _tfds_source(name: str, split: str, data_dir: str | None, text_field: str | None) -> TfdsSource:
    where = data_dir or tfds.core.constants.DATA_DIR
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise FileNotFoundError(
            f"tfds:{name}: no such dataset, neither a TFDS builder nor prepared in {where}. {_prepare_hint(name, where)}"
        ) from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds:{name}: not prepared in {where} (looked in {builder.data_dir}). {_prepare_hint(name, where)}"
        )
    return TfdsSource(builder, split, text_field)


# ---------------------------------------------------------------------------------------------
# Local files: .txt, .jsonl, .parquet.

_PARAGRAPH_BREAK = re.compile(rb"\r?\n(?:[ \t\r\f\v]*\n)+")  # one or more blank (or blank-looking) lines


RecordCheck = Callable[[dict], None]  # raises ValueError naming what a record lacks


@dataclasses.dataclass(frozen=True)
class _FileIndex:
    """One file's usable records: two integers each (see FilesSource) and an identity hash."""

    a: np.ndarray  # int64: byte start (.txt/.jsonl) or row group (.parquet)
    b: np.ndarray  # int64: byte end (.txt/.jsonl) or row in the group (.parquet)
    hashes: np.ndarray  # uint64: hash of the record's bytes, the held-out rule's identity
    empty: int
    bad: int


# One pass per file and process: train and validation sources of the same files (and every stream)
# share it. Keyed by the file's size and mtime, so a changed file is indexed again.
_INDEX_CACHE: dict[tuple, _FileIndex] = {}


class FilesSource:
    """Documents from local files, indexed at construction so ``src[i]`` reads one record.

    The index holds, per record, its file and two integers: a byte range for ``.txt`` documents and
    ``.jsonl`` lines (read back with a seek), a row group and row for ``.parquet``. Building it reads
    every file once, so malformed lines are reported (file and 1-based line) before training starts;
    ``record_check`` (e.g. ``formats.check_record``'s for chat data) is applied to every whole record
    read with ``text_field=None``, and ``skip_bad_records`` skips (counts and logs) what fails.

    ``split``: a record is in ``validation`` when ``held_out`` picks the hash of its bytes at
    ``holdout_fraction``, else in ``train``; identical records therefore share a split.
    """

    def __init__(
        self,
        paths: list[str],
        *,
        text_field: str | None = "text",
        skip_bad_records: bool = False,
        txt_mode: str = "file",
        split: str = "train",
        holdout_fraction: float = 0.0,
        record_check: RecordCheck | None = None,
    ):
        if txt_mode not in TXT_MODES:
            raise ValueError(f"txt_mode={txt_mode!r}: expected one of {TXT_MODES}")
        _check_split(f"files: {paths[0] if len(paths) == 1 else f'{len(paths)} files'}", split)
        per_mille = holdout_per_mille(holdout_fraction)
        self.paths = list(paths)
        self.text_field = text_field
        self.txt_mode = txt_mode
        self.split = split
        self.num_skipped_empty = 0
        self.num_skipped_bad = 0
        self.num_all = 0  # records of both splits
        files, starts, ends = [], [], []
        for k, path in enumerate(self.paths):
            index = _index_file(path, text_field, txt_mode, skip_bad_records, record_check)
            keep = held_out(index.hashes, per_mille)
            if split == "train":
                keep = ~keep
            files.append(np.full(int(keep.sum()), k, np.int32))
            starts.append(index.a[keep])
            ends.append(index.b[keep])
            self.num_skipped_empty += index.empty
            self.num_skipped_bad += index.bad
            self.num_all += len(index.hashes)
        self._file = np.concatenate(files) if files else np.zeros(0, np.int32)
        self._start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self._end = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        self._parquet_cache: tuple[int, int, list[Any]] | None = None

    # -- reading (grain workers) --

    def __len__(self) -> int:
        return len(self._file)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = _check_index(i, len(self))
        k, a, b = int(self._file[i]), int(self._start[i]), int(self._end[i])
        path = self.paths[k]
        ext = _extension(path)
        if ext == ".parquet":
            return self._parquet_record(k, a, b)
        with open(path, "rb") as f:
            f.seek(a)
            data = f.read(b - a)
        if ext == ".txt":
            return {"text": data.decode("utf-8", "replace")}
        obj = json.loads(data)
        return obj if self.text_field is None else {"text": obj[self.text_field]}

    def _parquet_record(self, k: int, group: int, row: int) -> dict[str, Any]:
        cache = self._parquet_cache  # one row group per process: neighbouring rows are often read together
        if cache is None or cache[:2] != (k, group):
            import pyarrow.parquet as pq

            columns = None if self.text_field is None else [self.text_field]
            table = pq.ParquetFile(self.paths[k]).read_row_group(group, columns=columns)
            cache = (k, group, table.to_pylist())
            self._parquet_cache = cache
        record = cache[2][row]
        return record if self.text_field is None else {"text": record[self.text_field]}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_parquet_cache": None}

    def __repr__(self) -> str:
        return f"FilesSource({len(self.paths)} files, split {self.split!r}: {len(self)} of {self.num_all} records)"


# -- index building (construction time) --


def _index_file(
    path: str, text_field: str | None, txt_mode: str, skip_bad: bool, record_check: RecordCheck | None
) -> _FileIndex:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns, text_field, txt_mode, skip_bad, record_check)
    if key not in _INDEX_CACHE:
        ext = _extension(path)
        if ext == ".txt":
            index = _index_txt(path, txt_mode)
        elif ext == ".jsonl":
            index = _index_jsonl(path, text_field, skip_bad, record_check)
        else:
            index = _index_parquet(path, text_field, skip_bad, record_check)
        if index.empty:
            logging.info("%s: skipped %d empty documents", path, index.empty)
        _INDEX_CACHE[key] = index
    return _INDEX_CACHE[key]


def _make_index(a: list[int], b: list[int], hashes: list[int], empty: int, bad: int) -> _FileIndex:
    return _FileIndex(np.asarray(a, np.int64), np.asarray(b, np.int64), np.asarray(hashes, np.uint64), empty, bad)


def _index_txt(path: str, txt_mode: str) -> _FileIndex:
    with open(path, "rb") as f:
        data = f.read()
    if txt_mode == "file":
        spans = [(0, len(data))]
    else:
        cuts = [0] + [x for m in _PARAGRAPH_BREAK.finditer(data) for x in m.span()] + [len(data)]
        spans = list(zip(cuts[0::2], cuts[1::2], strict=True))
    good = [(a, b) for a, b in spans if data[a:b].decode("utf-8", "replace").strip()]
    hashes = [hash64(data[a:b]) for a, b in good]
    return _make_index([a for a, _ in good], [b for _, b in good], hashes, len(spans) - len(good), 0)


def _index_jsonl(path: str, text_field: str | None, skip_bad: bool, record_check: RecordCheck | None) -> _FileIndex:
    starts, ends, hashes, empty, bad, first_bad = [], [], [], 0, 0, ""
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                empty += 1
                continue
            try:
                text = _parse_jsonl(line, text_field, record_check)
            except ValueError as e:
                if not skip_bad:
                    raise ValueError(f"{path}: line {lineno}: {e}") from None
                bad += 1
                first_bad = first_bad or f"line {lineno}: {e}"
                continue
            if text is not None and not text.strip():
                empty += 1
                continue
            starts.append(start)
            ends.append(offset)
            hashes.append(hash64(line.strip()))
    _log_bad(path, bad, first_bad)
    return _make_index(starts, ends, hashes, empty, bad)


def _log_bad(path: str, bad: int, first_bad: str) -> None:
    if bad:
        logging.warning("%s: skipped %d bad records (skip_bad_records=True); first at %s", path, bad, first_bad)


def _parse_jsonl(line: bytes, text_field: str | None, record_check: RecordCheck | None) -> str | None:
    """Parses one line; returns its text (None when text_field is None); ValueError if unusable."""
    try:
        obj = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if text_field is None:
        if record_check is not None:
            record_check(obj)
        return None
    if text_field not in obj:
        raise ValueError(f"no field {text_field!r} (text_field); it has {sorted(obj)}")
    text = obj[text_field]
    if not isinstance(text, str):
        raise ValueError(f"field {text_field!r} is a {type(text).__name__}, not a string")
    return text


def _index_parquet(path: str, text_field: str | None, skip_bad: bool, record_check: RecordCheck | None) -> _FileIndex:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field is not None and text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (text_field); it has {pf.schema_arrow.names}")
    groups, rows, hashes, empty, bad, first_bad, row0 = [], [], [], 0, 0, "", 0
    for g in range(pf.num_row_groups):
        columns = None if text_field is None else [text_field]
        table = pf.read_row_group(g, columns=columns)
        records = table.to_pylist() if text_field is None else table.column(0).to_pylist()
        for r, record in enumerate(records):
            try:
                content = _parquet_content(record, text_field, record_check)
            except ValueError as e:
                msg = f"row {row0 + r + 1}: {e}"
                if not skip_bad:
                    raise ValueError(f"{path}: {msg}") from None
                bad += 1
                first_bad = first_bad or msg
                continue
            if text_field is not None and not record.strip():
                empty += 1
                continue
            groups.append(g)
            rows.append(r)
            hashes.append(hash64(content))
        row0 += pf.metadata.row_group(g).num_rows
    _log_bad(path, bad, first_bad)
    return _make_index(groups, rows, hashes, empty, bad)


def _parquet_content(record: Any, text_field: str | None, record_check: RecordCheck | None) -> bytes:
    """The bytes that identify a parquet record; ValueError if it is unusable."""
    if text_field is None:
        if record_check is not None:
            record_check(record)
        return json.dumps(record, sort_keys=True, default=str).encode("utf-8")
    if not isinstance(record, str):
        raise ValueError(f"column {text_field!r} is {record!r}, not a string")
    return record.encode("utf-8")


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _glob_files(patterns: str) -> list[str]:
    """Sorted, de-duplicated files matched by comma-separated globs; every glob must match a file."""
    paths = set()
    for pattern in (p.strip() for p in patterns.split(",")):
        matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
        if not matched:
            raise FileNotFoundError(f"files:{pattern}: no files match this glob")
        for p in matched:
            if _extension(p) not in FILE_EXTENSIONS:
                raise ValueError(
                    f"files:{pattern}: {p} has an unsupported extension; expected one of {FILE_EXTENSIONS}"
                )
        paths.update(os.path.abspath(p) for p in matched)
    return sorted(paths)


# ---------------------------------------------------------------------------------------------
# Tokenized shards: a record is a dict of 1-D numeric arrays (tokens, segment_ids, loss_mask, ...).
#
# Layout of an encoded record: uint32 little-endian header length, a JSON header
# [[name, dtype, length], ...], then each array's little-endian bytes in header order.

_HEADER_LEN = struct.Struct("<I")


def encode_record(features: dict[str, np.ndarray]) -> bytes:
    """Serializes a dict of 1-D numeric arrays exactly (dtype and values); inverse of ``decode_record``."""
    header, chunks = [], []
    for name, value in features.items():
        array = np.asarray(value)
        if array.ndim != 1 or array.dtype.kind not in "biuf":
            raise ValueError(f"encode_record: feature {name!r} is {array.dtype}{list(array.shape)}; need 1-D numbers")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header.append([name, array.dtype.str, len(array)])
        chunks.append(array.tobytes())
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return _HEADER_LEN.pack(len(head)) + head + b"".join(chunks)


def decode_record(data: bytes) -> dict[str, np.ndarray]:
    """Parses ``encode_record``'s bytes back into a dict of (writable) arrays."""
    try:
        (n,) = _HEADER_LEN.unpack_from(data)
        header = json.loads(data[_HEADER_LEN.size : _HEADER_LEN.size + n])
        offset = _HEADER_LEN.size + n
        out = {}
        for name, dtype, length in header:
            array = np.frombuffer(data, dtype=np.dtype(dtype), count=length, offset=offset)
            out[name] = array.astype(array.dtype.newbyteorder("="))  # a native-order copy
            offset += array.nbytes
    except (ValueError, TypeError, struct.error) as e:
        raise ValueError(f"decode_record: not a record written by encode_record ({e})") from None
    if offset != len(data):
        raise ValueError(f"decode_record: {len(data) - offset} trailing bytes; not a record written by encode_record")
    return out


def write_records(path: str, records: Iterable[bytes]) -> int:
    """Writes an ArrayRecord file (one record per group, so random access reads one record); returns the count.

    The file appears under ``path`` only once complete.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    count = 0
    try:
        for record in records:
            writer.write(record)
            count += 1
    except BaseException:
        writer.close()
        os.remove(tmp)
        raise
    writer.close()
    os.replace(tmp, path)
    return count


class TokenizedSource:
    """Shards ``DIR/*.array_record`` (sorted by name) of ``encode_record`` bytes, plus ``DIR/manifest.json``.

    ``split``: a record (a packed row) is in ``validation`` when ``held_out`` picks the hash of its
    identity, its shard's file name and its row in the shard, at ``holdout_fraction``; else in
    ``train``. Nothing is stored per record: a block of rows' hashes is recomputed on access.
    """

    def __init__(self, directory: str, *, split: str = "train", holdout_fraction: float = 0.0):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        _check_split(f"tokenized:{directory}", split)
        self.split = split
        self.manifest_path = os.path.join(self.directory, "manifest.json")
        if not os.path.isfile(self.manifest_path):
            raise FileNotFoundError(
                f"tokenized:{directory}: no manifest.json in {self.directory}; write the shards with "
                f"`python -m mpt_jax.data.prepare`"
            )
        with open(self.manifest_path, encoding="utf-8") as f:
            try:
                self.manifest: dict[str, Any] = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.manifest_path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        self.paths = sorted(glob.glob(os.path.join(glob.escape(self.directory), "*.array_record")))
        if not self.paths:
            raise FileNotFoundError(f"tokenized:{directory}: no *.array_record shards in {self.directory}")
        self._ds = ArrayRecordDataSource(self.paths)
        self.num_all = len(self._ds)
        self._rows = _HeldOutRows(self.paths, holdout_per_mille(holdout_fraction), split == "validation")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return decode_record(self._ds[self._rows[_check_index(i, len(self))]])

    def __repr__(self) -> str:
        return (
            f"TokenizedSource({self.directory}, {len(self.paths)} shards, split {self.split!r}: "
            f"{len(self)} of {self.num_all} records)"
        )


class _HeldOutRows:
    """The rows of sorted shards in one split, as a map from the split's index to the shards' index.

    Rows are grouped in blocks of ``BLOCK`` within a shard; only each block's count of kept rows is
    stored (a 65M-row corpus: 16k numbers), and ``[i]`` recomputes one block's hashes.
    """

    BLOCK = 4096

    def __init__(self, paths: list[str], per_mille: int, validation: bool):
        self.per_mille, self.validation = per_mille, validation
        self.everything = per_mille == (HOLDOUT_SCALE if validation else 0)
        blocks, kept, offset = [], [], 0  # per block: (seed, first row in shard, row offset in the shards)
        for path in paths:
            size = _num_records(path)
            seed = hash64(os.path.basename(path).encode("utf-8"))
            for start in range(0, size, self.BLOCK):
                length = min(self.BLOCK, size - start)
                blocks.append((seed, start, length, offset + start))
                kept.append(length if self.everything else int(self._keep(seed, start, length).sum()))
            offset += size
        self._blocks = np.asarray(blocks, np.uint64).reshape(-1, 4)
        self._ends = np.cumsum(np.asarray(kept, np.int64))

    def _keep(self, seed: int, start: int, length: int) -> np.ndarray:
        rows = np.arange(start, start + length, dtype=np.uint64)
        return held_out(_mix64(rows ^ np.uint64(seed)), self.per_mille) == self.validation

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i: int) -> int:
        b = int(np.searchsorted(self._ends, i, side="right"))
        seed, start, length, offset = (int(v) for v in self._blocks[b])
        r = i - (int(self._ends[b - 1]) if b else 0)
        if self.everything:
            return offset + r
        return offset + int(np.flatnonzero(self._keep(seed, start, length))[r])


def _num_records(path: str) -> int:
    reader = ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------


def _check_index(i: int, n: int) -> int:
    """A Python int in [0, n); negative indices count from the end; IndexError ends plain iteration."""
    i = int(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"record index {i} out of range for {n} records")
    return i


_TFDS_SPEC = re.compile(r"([\w/.\-]+(?::[\d.*]+)?)(?::(.+))?")  # NAME[/CONFIG][:VERSION][:SPLIT]
_KINDS = ("tfds", "files", "tokenized")


def canonical_spec(spec: str) -> str:
    """``spec`` with a bare path or glob spelled out: ``files:GLOB``, or ``tokenized:DIR`` for a
    folder holding a ``manifest.json``. Other specs come back unchanged."""
    spec = spec.strip()
    if not spec or spec in ("stdlib", STDLIB_CHAT) or spec.partition(":")[0] in _KINDS:
        return spec
    parts = [p.strip() for p in spec.split(",")]
    if spec and all(_extension(p) in FILE_EXTENSIONS for p in parts):
        return f"files:{spec}"
    if os.path.isfile(os.path.join(os.path.expanduser(spec), "manifest.json")):
        return f"tokenized:{spec}"
    return spec


def pinned_split(spec: str) -> str | None:
    """The split a ``tfds:NAME:SPLIT`` spec names (it wins over ``make_source``'s ``split``), else None."""
    kind, _, rest = canonical_spec(spec).partition(":")
    m = _TFDS_SPEC.fullmatch(rest) if kind == "tfds" else None
    return m.group(2) if m else None


def make_source(
    spec: str,
    *,
    split: str = "train",
    holdout_fraction: float = 0.0,
    data_dir: str | None = None,
    text_field: str | None = "text",
    skip_bad_records: bool = False,
    txt_mode: str = "file",
    record_check: RecordCheck | None = None,
) -> TfdsSource | FilesSource | TokenizedSource:
    """The source named by ``spec`` (see the module docstring), reading ``split``.

    ``holdout_fraction`` is the share of a ``files:`` or ``tokenized:`` source's records held out as
    its ``validation`` split (0: every record is ``train``; 1: every record is ``validation``);
    ``stdlib``, ``stdlib-chat`` and ``tfds:`` have named splits. ``data_dir`` is where TFDS
    datasets live (for ``stdlib``/``stdlib-chat``: default ``default_data_dir()``; for ``tfds:``:
    TFDS's own default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). ``record_check`` raises
    ValueError for an unusable whole record of a ``files:`` source read with ``text_field=None``.
    """
    spec = canonical_spec(spec)
    kind, _, rest = spec.partition(":")
    if spec == "stdlib":
        data_dir = build_stdlib_corpus(data_dir)
        return TfdsSource(PythonStdlib(data_dir=data_dir, file_format="array_record"), split, "text")
    if spec == STDLIB_CHAT:
        from mpt_jax.data import stdlib_chat  # it builds on this module

        _check_split(spec, split)
        path = stdlib_chat.build_stdlib_chat(data_dir)[split]
        whole = 1.0 if split == "validation" else 0.0  # the file is the split
        return FilesSource([path], text_field=None, split=split, holdout_fraction=whole, record_check=record_check)
    if kind == "tfds" and (m := _TFDS_SPEC.fullmatch(rest)):
        return _tfds_source(m.group(1), m.group(2) or split, data_dir, text_field)
    if kind == "files" and rest:
        return FilesSource(
            _glob_files(rest),
            text_field=text_field,
            skip_bad_records=skip_bad_records,
            txt_mode=txt_mode,
            split=split,
            holdout_fraction=holdout_fraction,
            record_check=record_check,
        )
    if kind == "tokenized" and rest:
        return TokenizedSource(rest, split=split, holdout_fraction=holdout_fraction)
    raise ValueError(f"data source {spec!r}: expected {SPEC_FORMS}")
