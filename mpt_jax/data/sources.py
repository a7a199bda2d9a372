"""Where documents come from: grain random-access sources over TFDS, local files and tokenized shards.

Every source here is what grain's ``MapDataset.source`` wants: ``len(src)`` and ``src[i]`` returning a
dict, deterministic and picklable (grain worker processes receive a copy). Text sources return
``{"text": str}``; a jsonl source read with ``text_field=None`` returns each parsed JSON object
(e.g. ``{"prompt", "response"}`` or ``{"messages": [...]}``) for the formats to interpret.

``make_source(spec)`` picks one by spec:

- ``"stdlib"``: the embedded default corpus, the Python standard library's own source code, built
  once on this machine as a TFDS dataset (``python_stdlib``, ArrayRecord) and read back through
  TFDS, so the TFDS path runs on real data with no network.
- ``"tfds:NAME[:SPLIT]"``: a prepared TFDS dataset read with ``tfds.data_source``. Without
  TensorFlow only the ArrayRecord (or Parquet) file formats can be read.
- ``"files:GLOB[,GLOB...]"``: local ``.txt`` / ``.jsonl`` / ``.parquet`` files. An index of record
  offsets is built at construction (one pass), so bad input fails early, naming file and line.
- ``"tokenized:DIR"``: ArrayRecord shards of already tokenized examples written by
  ``mpt_jax.data.prepare`` with ``write_records``/``encode_record``.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import struct
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter

TXT_MODES = ("file", "paragraph")
FILE_EXTENSIONS = (".txt", ".jsonl", ".parquet")
STDLIB_NAME = "python_stdlib"
# Test suites are excluded from the corpus: they are huge (19 MB), repetitive, and Lib/lib2to3/tests
# holds deliberately broken files. A path is excluded when any component (folder or file name) is
# one of these, or starts with "test_"; site-/dist-packages are third-party code, not stdlib.
_STDLIB_EXCLUDED = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
_VALIDATION_PER_MILLE = 25  # about 2.5% of files, chosen by a stable hash of their relative path


def default_data_dir() -> str:
    """Where built datasets live: ``$MPT_JAX_DATA_DIR`` or ``~/.cache/mpt_jax/data``."""
    return os.path.expanduser(os.environ.get("MPT_JAX_DATA_DIR") or "~/.cache/mpt_jax/data")


# ---------------------------------------------------------------------------------------------
# The embedded default corpus: the Python standard library, as a TFDS dataset.


def _stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_excluded(rel_path: str) -> bool:
    parts = rel_path.split("/")
    return any(p in _STDLIB_EXCLUDED or p.startswith("test_") for p in parts)


def stdlib_files() -> list[str]:
    """Absolute paths of the corpus' ``*.py`` files, sorted by path relative to the stdlib root."""
    root = _stdlib_root()
    rels = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_EXCLUDED]  # don't walk into site-packages
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if name.endswith(".py") and not _stdlib_excluded(rel):
                rels.append(rel)
    return [os.path.join(root, *rel.split("/")) for rel in sorted(rels)]


def _is_validation(rel_path: str) -> bool:
    digest = hashlib.sha1(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % 1000 < _VALIDATION_PER_MILLE


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
            description=f"Python {sys.version.split()[0]} standard library source ({_stdlib_root()}).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {
            "train": self._generate_examples(validation=False),
            "validation": self._generate_examples(validation=True),
        }

    def _generate_examples(self, validation: bool) -> Iterator[tuple[str, dict[str, str]]]:
        root = _stdlib_root()
        for path in stdlib_files():
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if _is_validation(rel) != validation:
                continue
            with open(path, encoding="utf-8", errors="replace") as f:  # 2 stdlib files are not UTF-8
                text = f.read()
            if text.strip():  # many __init__.py files are empty
                yield rel, {"text": text, "path": rel}


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
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
    with _file_lock(os.path.join(data_dir, f".{STDLIB_NAME}.lock")):
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

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self._ds[_check_index(i, len(self))]
        if self.text_field is not None:
            return {"text": _to_str(record[self.text_field])}
        return {k: _to_str(v) for k, v in record.items()}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name}, split={self.split!r}, {len(self)} records)"


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


class FilesSource:
    """Documents from local files, indexed at construction so ``src[i]`` reads one record.

    The index holds, per record, its file and two integers: a byte range for ``.txt`` documents and
    ``.jsonl`` lines (read back with a seek), a row group and row for ``.parquet``. Building it reads
    every file once, so malformed lines are reported (file and 1-based line) before training starts.
    """

    def __init__(
        self,
        paths: list[str],
        *,
        text_field: str | None = "text",
        skip_bad_records: bool = False,
        txt_mode: str = "file",
    ):
        if txt_mode not in TXT_MODES:
            raise ValueError(f"txt_mode={txt_mode!r}: expected one of {TXT_MODES}")
        self.paths = list(paths)
        self.text_field = text_field
        self.txt_mode = txt_mode
        self.num_skipped_empty = 0
        self.num_skipped_bad = 0
        files, starts, ends = [], [], []
        for k, path in enumerate(self.paths):
            a, b, empty, bad = self._index_file(path, skip_bad_records)
            files.append(np.full(len(a), k, np.int32))
            starts.append(np.asarray(a, np.int64))
            ends.append(np.asarray(b, np.int64))
            self.num_skipped_empty += empty
            self.num_skipped_bad += bad
            if empty:
                logging.info("%s: skipped %d empty documents", path, empty)
        self._file = np.concatenate(files) if files else np.zeros(0, np.int32)
        self._start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self._end = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        self._parquet_cache: tuple[int, int, list[Any]] | None = None

    # -- index building (construction time) --

    def _index_file(self, path: str, skip_bad: bool) -> tuple[list[int], list[int], int, int]:
        ext = _extension(path)
        if ext == ".txt":
            return self._index_txt(path) + (0,)
        if ext == ".jsonl":
            return self._index_jsonl(path, skip_bad)
        return self._index_parquet(path, skip_bad)

    def _index_txt(self, path: str) -> tuple[list[int], list[int], int]:
        with open(path, "rb") as f:
            data = f.read()
        if self.txt_mode == "file":
            spans = [(0, len(data))]
        else:
            cuts = [0] + [x for m in _PARAGRAPH_BREAK.finditer(data) for x in m.span()] + [len(data)]
            spans = list(zip(cuts[0::2], cuts[1::2], strict=True))
        good = [(a, b) for a, b in spans if data[a:b].decode("utf-8", "replace").strip()]
        return [a for a, _ in good], [b for _, b in good], len(spans) - len(good)

    def _index_jsonl(self, path: str, skip_bad: bool) -> tuple[list[int], list[int], int, int]:
        starts, ends, empty, bad, first_bad = [], [], 0, 0, ""
        offset = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    empty += 1
                    continue
                try:
                    text = self._parse_jsonl(line)
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
        if bad:
            logging.warning("%s: skipped %d bad records (skip_bad_records=True); first at %s", path, bad, first_bad)
        return starts, ends, empty, bad

    def _parse_jsonl(self, line: bytes) -> str | None:
        """Parses one line; returns its text (None when text_field is None); ValueError if unusable."""
        try:
            obj = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        if self.text_field is None:
            return None
        if self.text_field not in obj:
            raise ValueError(f"no field {self.text_field!r} (text_field); it has {sorted(obj)}")
        text = obj[self.text_field]
        if not isinstance(text, str):
            raise ValueError(f"field {self.text_field!r} is a {type(text).__name__}, not a string")
        return text

    def _index_parquet(self, path: str, skip_bad: bool) -> tuple[list[int], list[int], int, int]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if self.text_field is not None and self.text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {self.text_field!r} (text_field); it has {pf.schema_arrow.names}")
        groups, rows, empty, bad, first_bad, row0 = [], [], 0, 0, "", 0
        for g in range(pf.num_row_groups):
            if self.text_field is None:
                n = pf.metadata.row_group(g).num_rows
                groups += [g] * n
                rows += range(n)
            else:
                for r, text in enumerate(pf.read_row_group(g, columns=[self.text_field]).column(0).to_pylist()):
                    if not isinstance(text, str):
                        msg = f"row {row0 + r + 1}: column {self.text_field!r} is {text!r}, not a string"
                        if not skip_bad:
                            raise ValueError(f"{path}: {msg}")
                        bad += 1
                        first_bad = first_bad or msg
                    elif not text.strip():
                        empty += 1
                    else:
                        groups.append(g)
                        rows.append(r)
            row0 += pf.metadata.row_group(g).num_rows
        if bad:
            logging.warning("%s: skipped %d bad records (skip_bad_records=True); first at %s", path, bad, first_bad)
        return groups, rows, empty, bad

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
        return f"FilesSource({len(self.paths)} files, {len(self)} records)"


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
    """Shards ``DIR/*.array_record`` (sorted by name) of ``encode_record`` bytes, plus ``DIR/manifest.json``."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        manifest = os.path.join(self.directory, "manifest.json")
        if not os.path.isfile(manifest):
            raise FileNotFoundError(
                f"tokenized:{directory}: no manifest.json in {self.directory}; write the shards with "
                f"`python -m mpt_jax.data.prepare`"
            )
        with open(manifest, encoding="utf-8") as f:
            try:
                self.manifest: dict[str, Any] = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{manifest}: line {e.lineno}: not valid JSON ({e.msg})") from None
        self.paths = sorted(glob.glob(os.path.join(glob.escape(self.directory), "*.array_record")))
        if not self.paths:
            raise FileNotFoundError(f"tokenized:{directory}: no *.array_record shards in {self.directory}")
        self._ds = ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return decode_record(self._ds[_check_index(i, len(self))])

    def __repr__(self) -> str:
        return f"TokenizedSource({self.directory}, {len(self.paths)} shards, {len(self)} records)"


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


def make_source(
    spec: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    text_field: str | None = "text",
    skip_bad_records: bool = False,
    txt_mode: str = "file",
) -> TfdsSource | FilesSource | TokenizedSource:
    """The source named by ``spec``: ``stdlib``, ``tfds:NAME[:SPLIT]``, ``files:GLOB[,GLOB]`` or ``tokenized:DIR``.

    ``data_dir`` is where TFDS datasets live (for ``stdlib``: default ``default_data_dir()``; for
    ``tfds:``: TFDS's own default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    """
    kind, _, rest = spec.partition(":")
    if spec == "stdlib":
        data_dir = build_stdlib_corpus(data_dir)
        return TfdsSource(PythonStdlib(data_dir=data_dir, file_format="array_record"), split, "text")
    if kind == "tfds" and (m := _TFDS_SPEC.fullmatch(rest)):
        return _tfds_source(m.group(1), m.group(2) or split, data_dir, text_field)
    if kind == "files" and rest:
        return FilesSource(
            _glob_files(rest), text_field=text_field, skip_bad_records=skip_bad_records, txt_mode=txt_mode
        )
    if kind == "tokenized" and rest:
        return TokenizedSource(rest)
    raise ValueError(
        f"data source {spec!r}: expected 'stdlib', 'tfds:NAME[:SPLIT]', 'files:GLOB[,GLOB...]' or 'tokenized:DIR'"
    )
