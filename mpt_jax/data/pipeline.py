"""The grain input pipeline: sources -> format/tokenize -> pack -> batch, per process.

    records (MapDataset, one per source) --shuffle(seed)--repeat--> mix(weights)
      -> stream slice s::S            # S streams; a process owns S / process_count of them
      -> format + tokenize            # one-to-one, so worker processes change nothing
      -> [mp_prefetch workers] -> drop None -> pack (concat-then-split | first-fit)
      -> batch(B / S rows) -> zip this process's streams -> local batch

Streams make the global batch independent of the process count: row block s of every global
batch comes from stream s, whichever process reads it, so 2 processes together produce exactly the
batches of 1 (given the same ``num_streams``). Packing is stateful, so it runs after the workers
(grain's advice): the worker count changes speed, never the batches. The iterator's state
(``get_state``/``set_state``) resumes exactly, workers included.

Two splits: ``train`` and ``validation`` (eval). Each mixture entry's validation data is its
``eval_source`` or its source's own held-out split, never what training reads (``open_source``);
``check_data`` checks all of it against the run before anything starts.

A batch is a dict of [rows, seq_len] arrays: ``tokens`` (int32), ``segment_ids`` (int32, 1.. per
packed document, 0 = padding), ``positions`` (int32, within each document) and ``loss_mask``
(int32; 1 where the token is a training target, see formats.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from mpt_jax.data import formats, sources
from mpt_jax.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from mpt_jax.files import read_json

MAX_DROPPED_IN_A_ROW = 2000  # records without an example before a source counts as unusable
FEATURES = ("tokens", "segment_ids", "positions", "loss_mask")
PACKINGS = ("concat", "first_fit")
FORMATS = ("pretrain", "instruction", "chat", "packed")
STDLIB_BPE = "stdlib-bpe"
STDLIB_BPE_VOCAB = 8192
# The share of a files: or tokenized: source held out as its validation split (by record hash,
# see sources.held_out) when the source has no eval_source.
HOLDOUT_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One entry of a data mixture.

    ``eval_source`` names this entry's held-out data (any ``make_source`` spec, read whole as the
    validation split); then ``source`` is trained on whole. Without it, eval reads the source's own
    validation split: the named one of ``stdlib``/``stdlib-chat``/``tfds:``, or the
    ``holdout_fraction`` of a ``files:``/``tokenized:`` source that training never sees. A bare
    path or glob is read as ``files:``, and a ``tokenized:`` source left at the default format
    ``pretrain`` is read as ``packed``.
    """

    source: str  # a sources.make_source spec: "stdlib", "stdlib-chat", "tfds:NAME", "files:GLOB", "tokenized:DIR"
    weight: float = 1.0
    format: str = "pretrain"  # "pretrain", "instruction", "chat", or "packed" for tokenized shards
    text_field: str | None = "text"  # pretrain only: finetuning formats read whole records
    template: str = "mpt-7b-instruct"
    system_prompt: str | None = None
    eval_source: str | None = None

    def __post_init__(self):
        source = sources.canonical_spec(self.source)
        object.__setattr__(self, "source", source)
        if self.eval_source:
            object.__setattr__(self, "eval_source", sources.canonical_spec(self.eval_source))
        if self.format == "pretrain" and source.startswith("tokenized:"):
            object.__setattr__(self, "format", "packed")  # shards are already formatted and packed


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` section of a run config, as plain data."""

    mixture: tuple[SourceConfig, ...] = (SourceConfig("stdlib"),)
    tokenizer: str = STDLIB_BPE
    data_dir: str | None = None  # default: sources.default_data_dir()
    holdout_fraction: float = HOLDOUT_FRACTION
    packing: str = "concat"  # "concat" (pretraining) or "first_fit" (finetuning)
    first_fit_bins: int = 16
    overlong: str = "truncate"  # finetuning examples longer than seq_len: "truncate" or "drop"
    skip_bad_records: bool = False
    num_streams: int = 0  # 0: one per process
    num_workers: int = 0  # tokenizing worker processes per stream
    shuffle: bool = True
    # Packed rows are shuffled in windows of this many (0: off): concat packing puts a long
    # document in consecutive rows, which would otherwise land in the same batch.
    shuffle_rows: int = 512
    txt_mode: str = "file"
    # Set by from_config when the config named one source (config.data.source): errors then name
    # config.data.<key>, the key the user set, instead of config.data.mixture[0].<key>.
    single: bool = dataclasses.field(default=False, compare=False, repr=False)

    @classmethod
    def from_config(cls, data: Any) -> DataConfig:
        """From a ConfigDict/dict: either `mixture` (a list of SourceConfig dicts) or a single
        `source` with its `format`, `weight`, `text_field`, `template`, `system_prompt`, `eval_source`."""
        data = dict(data.to_dict() if hasattr(data, "to_dict") else data)
        source_keys = {f.name for f in dataclasses.fields(SourceConfig)}
        own_keys = {f.name for f in dataclasses.fields(cls)} - {"single"}
        single = {k: data.pop(k) for k in list(data) if k in source_keys}
        unknown = sorted(set(data) - own_keys)
        if unknown:
            raise ValueError(f"config.data: unknown key(s) {unknown}; known: {sorted(own_keys | source_keys)}")
        mixture = data.pop("mixture", None)
        if mixture and single.get("source"):
            raise ValueError(
                f"config.data: both source={single['source']!r} and a mixture are set; set source='' to use the mixture"
            )
        if mixture and single.get("eval_source"):
            raise ValueError(
                "config.data.eval_source is for a single source; with a mixture set each entry's eval_source"
            )
        if mixture:
            entries = []
            for i, entry in enumerate(mixture):
                bad = sorted(set(entry) - source_keys)
                if bad:
                    raise ValueError(f"config.data.mixture[{i}]: unknown key(s) {bad}; known: {sorted(source_keys)}")
                entries.append(SourceConfig(**entry))
            data["mixture"] = tuple(entries)
        elif single.get("source"):
            data["mixture"] = (SourceConfig(**single),)
            data["single"] = True
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def key(self, i: int, name: str) -> str:
        """The config key of mixture entry ``i``'s field ``name``, as the user spelled it."""
        return f"config.data.{name}" if self.single else f"config.data.mixture[{i}].{name}"

    def validate(self) -> None:
        if not self.mixture:
            raise ValueError("config.data: the mixture is empty")
        for i, s in enumerate(self.mixture):
            if s.weight <= 0:
                raise ValueError(f"{self.key(i, 'weight')}={s.weight}: must be positive")
            if s.format not in FORMATS:
                raise ValueError(f"{self.key(i, 'format')}={s.format!r}: expected one of {FORMATS}")
            for name in ("source", "eval_source"):
                spec = getattr(s, name)
                if spec and (s.format == "packed") != spec.startswith("tokenized:"):
                    raise ValueError(
                        f"{self.key(i, name)}={spec!r} with {self.key(i, 'format')}={s.format!r}: tokenized: shards "
                        f"are already formatted (format 'packed'), and only they are"
                    )
        try:
            sources.holdout_per_mille(self.holdout_fraction)
        except ValueError as e:
            raise ValueError(f"config.data.{e}") from None
        if self.packing not in PACKINGS:
            raise ValueError(f"config.data.packing={self.packing!r}: expected one of {PACKINGS}")
        if self.num_streams < 0 or self.num_workers < 0 or self.shuffle_rows < 0:
            raise ValueError("config.data: num_streams, num_workers and shuffle_rows must be >= 0")


def default_config():
    """The `data` section as a ConfigDict (the embedded corpus, concat packing)."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.source = "stdlib"
    c.eval_source = ml_collections.config_dict.placeholder(str)  # None: the source's own validation split
    c.holdout_fraction = HOLDOUT_FRACTION
    c.format = "pretrain"
    c.text_field = "text"  # pretrain only; instruction/chat read whole records
    c.template = "mpt-7b-instruct"
    c.system_prompt = ml_collections.config_dict.placeholder(str)
    c.tokenizer = STDLIB_BPE
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.packing = "concat"
    c.overlong = "truncate"
    c.skip_bad_records = False
    c.num_streams = 0
    c.num_workers = 0
    c.shuffle_rows = 512
    return c


# ----------------------------------------------------------------------------------------------
# Tokenizer.


def get_tokenizer(cfg: DataConfig, *, train: bool = True) -> Tokenizer:
    """The configured tokenizer; ChatML tokens added when a chat source is in the mixture.

    "stdlib-bpe" is a byte-level BPE trained once on the embedded corpus's train split and cached
    in the data directory; with ``train=False`` (convert: the run's own tokenizer or none) a missing
    cache is a FileNotFoundError instead.
    """
    if cfg.tokenizer == STDLIB_BPE:
        data_dir = cfg.data_dir or sources.default_data_dir()
        path = os.path.join(data_dir, f"python_stdlib_bpe{STDLIB_BPE_VOCAB}.json")
        if os.path.isfile(path):
            tok = load_tokenizer(path)
            tok.name = STDLIB_BPE  # the same name whether just trained or read back
        elif not train:
            raise FileNotFoundError(f"tokenizer {STDLIB_BPE}: no {path} (a training run trains and caches it there)")
        else:
            corpus = sources.make_source("stdlib", split="train", data_dir=data_dir)
            logging.info("training a %d-token BPE on the embedded corpus (%d documents)", STDLIB_BPE_VOCAB, len(corpus))
            tok = train_bpe((corpus[i]["text"] for i in range(len(corpus))), STDLIB_BPE_VOCAB, name=STDLIB_BPE)
            os.makedirs(data_dir, exist_ok=True)
            tok.save(path)
    else:
        tok = load_tokenizer(cfg.tokenizer)
    if any(s.format == "chat" or _prepared_format(s) == "chat" for s in cfg.mixture):
        tok = tok.with_chatml()
    return tok


def _prepared_format(s: SourceConfig) -> str | None:
    """The example format a tokenized: source was prepared from (its manifest's), else None."""
    if s.format != "packed":
        return None
    path = os.path.join(os.path.expanduser(s.source.partition(":")[2]), "manifest.json")
    return read_json(path, what="tokenized manifest").get("example_format") if os.path.isfile(path) else None


# ----------------------------------------------------------------------------------------------
# Which data each split reads, and the checks made before a run starts.


def open_source(cfg: DataConfig, i: int, split: str) -> tuple[Any, str]:
    """(source, its spec) of mixture entry ``i`` for ``split`` ("train" or "validation").

    With an ``eval_source``, validation reads it whole and train reads ``source`` whole; without,
    both read ``source``'s own splits (``holdout_fraction`` for files and tokenized shards). A TFDS
    spec that pins its split has no held-out data of its own: asking it for validation is an error.
    """
    s = cfg.mixture[i]
    kw = dict(
        data_dir=cfg.data_dir,
        text_field=s.text_field if s.format == "pretrain" else None,
        skip_bad_records=cfg.skip_bad_records,
        txt_mode=cfg.txt_mode,
        record_check=formats.RECORD_CHECKS.get(s.format),
    )
    if split == "validation" and s.eval_source:
        return sources.make_source(s.eval_source, split=split, holdout_fraction=1.0, **kw), s.eval_source
    if split == "validation" and (pinned := sources.pinned_split(s.source)):
        raise ValueError(
            f"{cfg.key(i, 'source')}={s.source!r} pins the TFDS split {pinned!r}, so there is no held-out split to "
            f"evaluate on: set {cfg.key(i, 'eval_source')} (e.g. a validation split, or a slice such as "
            f"'...:train[99%:]' with the source '...:train[:99%]'), or config.train.eval_every=0"
        )
    holdout = 0.0 if s.eval_source else cfg.holdout_fraction
    return sources.make_source(s.source, split=split, holdout_fraction=holdout, **kw), s.source


def check_data(cfg: DataConfig, tok: Tokenizer, *, seq_len: int, vocab_size: int, need_eval: bool) -> None:
    """Checks the data against the run before anything is written or compiled; ValueError names both values.

    ``vocab_size`` is the model's embedding rows; ``need_eval`` says the run will report eval_loss,
    which then must come from held-out data. Opens every source (indexing local files, which reports
    bad records with file and line) and checks tokenized shards' manifests against the run.
    """
    if tok.vocab_size > vocab_size:
        raise ValueError(
            f"config.model.vocab_size={vocab_size} is smaller than the tokenizer's {tok.vocab_size} ids ({cfg.tokenizer})"
        )
    for i in range(len(cfg.mixture)):
        for split in ("train", "validation") if need_eval else ("train",):
            src, _ = open_source(cfg, i, split)
            if len(src) == 0:
                raise ValueError(_empty_message(cfg, i, split, src))
            if isinstance(src, sources.TokenizedSource):
                where = cfg.key(i, "eval_source" if split == "validation" and cfg.mixture[i].eval_source else "source")
                check_manifest(src, tok, seq_len=seq_len, vocab_size=vocab_size, where=where)


def _empty_message(cfg: DataConfig, i: int, split: str, src: Any) -> str:
    s = cfg.mixture[i]
    if split == "train":
        return f"{cfg.key(i, 'source')}={s.source!r} has no training records"
    if s.eval_source:
        return f"{cfg.key(i, 'eval_source')}={s.eval_source!r} has no records"
    total = getattr(src, "num_all", None)
    return (
        f"{cfg.key(i, 'source')}={s.source!r} has no held-out records to evaluate on (none of its "
        f"{total} records at config.data.holdout_fraction={cfg.holdout_fraction}): raise "
        f"config.data.holdout_fraction, set {cfg.key(i, 'eval_source')}, or set config.train.eval_every=0"
    )


def check_manifest(src: sources.TokenizedSource, tok: Tokenizer, *, seq_len: int, vocab_size: int, where: str) -> None:
    """A tokenized source's manifest against the run: its seq_len, its tokenizer and its largest id."""
    m, path = src.manifest, src.manifest_path
    if m.get("seq_len") != seq_len:
        raise ValueError(
            f"{where}: {path} has seq_len={m.get('seq_len')}, but the run's sequence length (config.train.seq_len, "
            f"or model.max_seq_len) is {seq_len}; prepare the shards again with --seq_len={seq_len}"
        )
    theirs = m.get("tokenizer_fingerprint")
    same = theirs == tok.fingerprint if theirs else m.get("tokenizer") == tok.name
    if not same:
        raise ValueError(
            f"{where}: {path} was tokenized with tokenizer={m.get('tokenizer')!r} "
            f"(fingerprint {theirs}), but the run's config.data.tokenizer is {tok.name!r} "
            f"(fingerprint {tok.fingerprint})"
        )
    largest = m.get("max_token_id", m["vocab_size"] - 1 if "vocab_size" in m else None)
    if largest is None:
        raise ValueError(f"{where}: {path} records neither max_token_id nor vocab_size; prepare the shards again")
    if largest >= vocab_size:
        raise ValueError(
            f"{where}: {path} holds token ids up to {largest}, but config.model.vocab_size={vocab_size} "
            f"embedding rows hold ids below {vocab_size}"
        )


# ----------------------------------------------------------------------------------------------
# The pipeline.


def _records(
    cfg: DataConfig, split: str, seed: int, shuffle: bool, repeat: bool
) -> list[tuple[grain.MapDataset, SourceConfig, str]]:
    out = []
    for i, s in enumerate(cfg.mixture):
        src, spec = open_source(cfg, i, split)
        if len(src) == 0:
            raise ValueError(_empty_message(cfg, i, split, src))
        ds = grain.MapDataset.source(src)
        if shuffle:
            ds = ds.shuffle(seed=seed + 1009 * i)  # a new permutation each epoch
        if repeat:
            ds = ds.repeat(None)
        out.append((ds, s, spec))
    return out


class _Format:
    """Picklable per-source map: record -> (example or None, the FormatStats of this record).

    Stats travel with each record because formatting may run in worker processes; the main
    process adds them up (``_Collect``). With ``vocab_size``, a token id outside the model's
    embedding rows is an error naming the source (gathering such a row yields NaN logits).
    """

    def __init__(
        self,
        source: SourceConfig,
        tok: Tokenizer,
        seq_len: int,
        overlong: str,
        packing: str,
        *,
        spec: str,
        vocab_size: int | None = None,
    ):
        self.packed = source.format == "packed"
        self.spec = spec
        self.vocab_size = vocab_size
        # Pretraining documents may be longer than a row: concat packing wraps them across rows,
        # first-fit packing cannot, so they are truncated or dropped like finetuning examples.
        self.limit = seq_len if packing == "first_fit" and source.format == "pretrain" else None
        self.overlong = overlong
        if not self.packed:
            self.fn = formats.make_formatter(
                source.format,
                tok,
                max_len=seq_len,
                template=source.template or "mpt-7b-instruct",
                overlong=overlong,
                system_prompt=source.system_prompt,
            )

    def __call__(self, record: dict) -> tuple[dict | None, formats.FormatStats]:
        if self.packed:
            example = {k: np.asarray(record[k], np.int32) for k in FEATURES}
            self._check_ids(example["tokens"])
            return example, formats.FormatStats(examples=1)
        stats = self.fn.stats = formats.FormatStats()
        example = self.fn(record)
        if example is not None and self.limit is not None and len(example["tokens"]) > self.limit:
            if self.overlong == "drop":
                stats.examples -= 1
                stats.dropped_overlong += 1
                return None, stats
            stats.truncated += 1
            example = {k: v[: self.limit] for k, v in example.items()}
        if example is not None:
            self._check_ids(example["tokens"])
        return example, stats

    def _check_ids(self, tokens: np.ndarray) -> None:
        if self.vocab_size is None or not len(tokens):
            return
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(
                f"data source {self.spec!r}: token id {high if high >= self.vocab_size else low} is outside "
                f"config.model.vocab_size={self.vocab_size} (ids 0..{self.vocab_size - 1}); was it tokenized with "
                f"another tokenizer?"
            )


class _Collect:
    """Main-process filter: adds each record's stats to the pipeline's, keeps real examples.

    A source whose records all come out empty (e.g. chat turns truncated to no target at a short
    seq_len) would make the packer wait forever: after ``MAX_DROPPED_IN_A_ROW`` records in a row
    without an example it is an error naming the source and what happened to its records."""

    def __init__(self, stats: formats.FormatStats, source: str):
        self.stats, self.source = stats, source
        self.dropped_in_a_row = 0
        self.seen = formats.FormatStats()

    def __call__(self, item: tuple[dict | None, formats.FormatStats]) -> bool:
        self.stats.update(item[1])
        self.seen.update(item[1])
        if item[0] is not None:
            self.dropped_in_a_row = 0
            return True
        self.dropped_in_a_row += 1
        if self.dropped_in_a_row >= MAX_DROPPED_IN_A_ROW:
            raise ValueError(
                f"data source {self.source!r}: {self.dropped_in_a_row} records in a row gave no training example "
                f"({self.seen.summary()}); check config.train.seq_len, data.overlong and the records' format"
            )
        return False


def _example(item: tuple[dict | None, formats.FormatStats]) -> dict:
    return item[0]


def _rename(packed: dict, *, first_fit: bool = False) -> dict:
    """grain's packers name their outputs tokens_segment_ids etc.; keep one of each.

    First-fit rows hold whole examples: an example's first token is no target (alone, nothing
    precedes it), so with segment ids each example's loss is exactly its loss alone.
    """
    segments, positions = packed["tokens_segment_ids"], packed["tokens_positions"]
    mask = packed["loss_mask"] * (segments > 0)
    if first_fit:
        mask = mask * (positions > 0)
    return {
        "tokens": packed["tokens"].astype(np.int32),
        "segment_ids": segments.astype(np.int32),
        "positions": positions.astype(np.int32),
        "loss_mask": mask.astype(np.int32),
    }


def _concat_rows(rows: Sequence[dict]) -> dict:
    return {k: np.concatenate([r[k] for r in rows], axis=0) for k in FEATURES}


def packed_rows(
    cfg: DataConfig,
    tok: Tokenizer,
    *,
    split: str,
    seq_len: int,
    seed: int,
    stream: int = 0,
    num_streams: int = 1,
    shuffle: bool | None = None,
    repeat: bool = True,
    stats: formats.FormatStats | None = None,
    vocab_size: int | None = None,
) -> grain.IterDataset:
    """One stream of packed [seq_len] rows (dicts of FEATURES); counts into ``stats``.

    Each source is formatted and packed on its own and the mixture picks whole rows by weight, as
    MPT's pretraining did ("each example was constructed from as many sequences from that dataset
    as were necessary to fill the sequence length"): a row never mixes sources. ``vocab_size``:
    see ``_Format``.
    """
    shuffle = cfg.shuffle if shuffle is None else shuffle
    stats = stats if stats is not None else formats.FormatStats()
    rows = []
    for ds, source, spec in _records(cfg, split, seed, shuffle, repeat):
        ds = ds.map(_Format(source, tok, seq_len, cfg.overlong, cfg.packing, spec=spec, vocab_size=vocab_size))
        if num_streams > 1:
            ds = ds[stream::num_streams]
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if cfg.num_workers:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
        it = it.filter(_Collect(stats, source.source)).map(_example)
        if source.format != "packed":
            it = _pack(it, cfg, seq_len, seed)
            if shuffle and cfg.shuffle_rows > 1:
                it = grain.experimental.WindowShuffleIterDataset(it, window_size=cfg.shuffle_rows, seed=seed + stream)
        rows.append(it)
    if len(rows) == 1:
        return rows[0]
    return grain.IterDataset.mix(rows, weights=[s.weight for s in cfg.mixture])


def _pack(examples: grain.IterDataset, cfg: DataConfig, seq_len: int, seed: int) -> grain.IterDataset:
    lengths = {"tokens": seq_len, "loss_mask": seq_len}
    if cfg.packing == "concat":
        packed = grain.experimental.ConcatThenSplitIterDataset(examples, length_struct=lengths)
    else:
        packed = grain.experimental.FirstFitPackIterDataset(
            examples, length_struct=lengths, num_packing_bins=cfg.first_fit_bins, seed=seed, shuffle_bins=False
        )
    return packed.map(functools.partial(_rename, first_fit=cfg.packing == "first_fit"))


def stream_layout(global_batch: int, num_streams: int, process_index: int, process_count: int) -> tuple[range, int]:
    """(streams of this process, rows each stream gives per batch), checked."""
    num_streams = num_streams or process_count
    if num_streams % process_count:
        raise ValueError(
            f"config.data.num_streams={num_streams} must be a multiple of the process count {process_count}"
        )
    if global_batch % num_streams:
        raise ValueError(f"global batch size {global_batch} must be divisible by config.data.num_streams={num_streams}")
    per_process = num_streams // process_count
    return range(process_index * per_process, (process_index + 1) * per_process), global_batch // num_streams


def make_dataset(
    cfg: DataConfig,
    tok: Tokenizer,
    *,
    split: str,
    seq_len: int,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    shuffle: bool | None = None,
    stats: formats.FormatStats | None = None,
    vocab_size: int | None = None,
) -> grain.IterDataset:
    """This process's batches: dicts of [global_batch / process_count, seq_len] int32 arrays,
    stream blocks in stream order.

    ``stats`` (if given) counts examples, truncations and drops as batches are drawn; with
    ``vocab_size`` (the model's embedding rows), a token id outside it is an error naming the source."""
    streams, rows = stream_layout(global_batch, cfg.num_streams, process_index, process_count)
    num_streams = cfg.num_streams or process_count
    return Batches(
        {
            s: packed_rows(
                cfg,
                tok,
                split=split,
                seq_len=seq_len,
                seed=seed,
                stream=s,
                num_streams=num_streams,
                shuffle=shuffle,
                repeat=repeat,
                stats=stats,
                vocab_size=vocab_size,
            ).batch(rows, drop_remainder=True)
            for s in streams
        }
    )


class Batches:
    """This process's streams of row blocks; iterating gives its batches (a ``DataIterator``)."""

    def __init__(self, streams: dict[int, grain.IterDataset]):
        self.streams = streams

    def __iter__(self) -> DataIterator:
        return DataIterator(self)


def to_global_arrays(batch: dict, sharding) -> dict:
    """Assembles per-process numpy batches into global jax Arrays laid out by ``sharding``."""
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


class DataIterator:
    """Batches of this process's streams, with a state keyed by global stream index.

    The state is JSON (what checkpoints store) and says where each stream is, so a checkpoint's
    state, gathered from every process (``global_state``), restores into any process count that
    splits the same streams. grain's packers keep (start, stop) tuples in their state, which JSON
    turns into lists that ``set_state`` then misreads; they are turned back into tuples here.
    """

    def __init__(self, batches: Batches):
        self._its = {s: iter(ds) for s, ds in sorted(batches.streams.items())}

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict:
        blocks = [next(it) for it in self._its.values()]
        return blocks[0] if len(blocks) == 1 else _concat_rows(blocks)

    def get_state(self) -> dict:
        return {"streams": {str(s): it.get_state() for s, it in self._its.items()}}

    def set_state(self, state: bytes | str | dict) -> None:
        if isinstance(state, bytes | str):
            state = json.loads(state)
        streams = state.get("streams", {})
        missing = [s for s in self._its if str(s) not in streams]
        if missing:
            raise ValueError(
                f"data state has no position for stream(s) {missing} (it holds streams {sorted(streams, key=int)}); "
                "was it saved with another config.data.num_streams?"
            )
        for s, it in self._its.items():
            it.set_state(_retuple(streams[str(s)]))

    def global_state(self) -> dict:
        """Every process's stream positions, merged (a collective: all processes must call it)."""
        local = self.get_state()
        import jax

        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        data = np.frombuffer(json.dumps(local).encode(), np.uint8)
        sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
        padded = np.zeros(int(sizes.max()), np.uint8)
        padded[: data.size] = data
        everyone = np.asarray(multihost_utils.process_allgather(padded))
        merged: dict = {}
        for p, n in enumerate(sizes):
            merged.update(json.loads(bytes(everyone[p, : int(n)]))["streams"])
        return {"streams": merged}

    def close(self) -> None:
        for it in self._its.values():
            if hasattr(it, "close"):
                it.close()


def _retuple(state):
    if isinstance(state, dict):
        return {
            k: {f: tuple(v) for f, v in val.items()}
            if k == "remainder_slices" and isinstance(val, dict)
            else _retuple(val)
            for k, val in state.items()
        }
    if isinstance(state, list):
        return [_retuple(v) for v in state]
    return state


def iterate(batches: Batches, state: bytes | dict | None = None) -> DataIterator:
    """An iterator over ``batches``, optionally resumed from a saved state."""
    it = DataIterator(batches)
    if state is not None:
        it.set_state(state)
    return it
