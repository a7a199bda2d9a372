"""Tokenize and pack a corpus once, into ArrayRecord shards that training reads as `tokenized:DIR`.

    python -m mpt_jax.data.prepare --source=SPEC --tokenizer=NAME_OR_PATH --seq_len=N --out=DIR
        [--split=train] [--format=pretrain|instruction|chat] [--packing=concat|first_fit]
        [--text_field=text] [--template=mpt-7b-instruct] [--records_per_shard=10000] [--overwrite]

SPEC is any source of mpt_jax.data.sources ("stdlib", "tfds:NAME", "files:GLOB"); the tokenizer is
an HF hub name (e.g. EleutherAI/gpt-neox-20b), a tokenizer.json or a folder, or "stdlib-bpe".
Output: DIR/shard-00000.array_record ... and DIR/manifest.json (documents, tokens, sequences,
padding, settings). DIR is written under a temporary name and renamed at the end; an existing DIR
is refused unless --overwrite. The corpus is read once in order (no shuffle): shuffling happens
when training reads the shards.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging
from tqdm import tqdm

from mpt_jax.data import formats, sources
from mpt_jax.data.pipeline import DataConfig, SourceConfig, get_tokenizer, packed_rows
from mpt_jax.files import atomic_output_dir

_SOURCE = flags.DEFINE_string("source", None, "source spec: stdlib, tfds:NAME, files:GLOB", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", "stdlib-bpe", "HF hub name, tokenizer.json, folder, or stdlib-bpe")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "tokens per packed sequence", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder", required=True)
_SPLIT = flags.DEFINE_string("split", "train", "split of the source")
_FORMAT = flags.DEFINE_enum("format", "pretrain", ["pretrain", "instruction", "chat"], "example format")
_PACKING = flags.DEFINE_enum("packing", "concat", ["concat", "first_fit"], "packing")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "jsonl/parquet/TFDS text field (pretrain format)")
_TEMPLATE = flags.DEFINE_string("template", "mpt-7b-instruct", "instruction prompt template")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS / embedded corpus data directory")
_RECORDS_PER_SHARD = flags.DEFINE_integer("records_per_shard", 10_000, "packed sequences per shard")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace --out if it exists")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_records", False, "skip (and count) malformed jsonl lines")


def prepare(
    cfg: DataConfig,
    *,
    split: str,
    seq_len: int,
    out: str,
    records_per_shard: int = 10_000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Writes the shards and manifest; returns the manifest."""
    if seq_len < 2:
        raise ValueError(f"--seq_len={seq_len}: must be at least 2")
    tok = get_tokenizer(cfg)
    stats = formats.FormatStats()
    rows = packed_rows(cfg, tok, split=split, seq_len=seq_len, seed=0, shuffle=False, repeat=False, stats=stats)
    manifest = {
        "format": "mpt-jax-tokenized",
        "version": 1,
        "source": [s.source for s in cfg.mixture],
        "split": split,
        "example_format": cfg.mixture[0].format,
        "tokenizer": cfg.tokenizer,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "seq_len": seq_len,
        "packing": cfg.packing,
        "features": ["tokens", "segment_ids", "positions", "loss_mask"],
        "shards": [],
    }
    sequences = tokens = targets = 0
    start = time.time()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        bar = tqdm(desc="prepare", unit=" seq", disable=not progress)
        batch: list[bytes] = []

        def flush():
            name = f"shard-{len(manifest['shards']):05d}.array_record"
            sources.write_records(os.path.join(tmp, name), batch)
            manifest["shards"].append({"file": name, "sequences": len(batch)})
            batch.clear()

        for row in rows:
            batch.append(sources.encode_record(row))
            sequences += 1
            tokens += int((row["segment_ids"] > 0).sum())
            targets += int(row["loss_mask"].sum())
            bar.update(1)
            if len(batch) == records_per_shard:
                flush()
        if batch:
            flush()
        bar.close()
        if not sequences:
            raise ValueError(f"prepare: source {manifest['source']} (split {split}) produced no sequences")
        manifest.update(
            documents=stats.examples,
            tokens=tokens,
            loss_tokens=targets,
            sequences=sequences,
            padding_tokens=sequences * seq_len - tokens,
            format_stats=stats.summary(),
            seconds=round(time.time() - start, 1),
        )
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
    return manifest


def main(argv):
    del argv
    source = SourceConfig(
        _SOURCE.value,
        format=_FORMAT.value,
        text_field=None if _FORMAT.value != "pretrain" else _TEXT_FIELD.value,
        template=_TEMPLATE.value,
    )
    cfg = DataConfig(
        mixture=(source,),
        tokenizer=_TOKENIZER.value,
        data_dir=_DATA_DIR.value,
        packing=_PACKING.value,
        skip_bad_records=_SKIP_BAD.value,
        shuffle=False,
    )
    try:
        cfg.validate()
        m = prepare(
            cfg,
            split=_SPLIT.value,
            seq_len=_SEQ_LEN.value,
            out=_OUT.value,
            records_per_shard=_RECORDS_PER_SHARD.value,
            overwrite=_OVERWRITE.value,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 1
    logging.info("prepare: %s", m["format_stats"])
    print(
        f"prepare: {m['documents']:,} documents -> {m['sequences']:,} sequences of {m['seq_len']} "
        f"({m['tokens']:,} tokens, {m['padding_tokens']:,} padding) in {len(m['shards'])} shard(s) "
        f"at {os.path.abspath(_OUT.value)} ({m['seconds']} s)"
    )
    return 0


if __name__ == "__main__":
    app.run(main)
