"""Tokenize and pack a corpus once, into ArrayRecord shards that training reads as `tokenized:DIR`.

    python -m mpt_jax.data.prepare --source=SPEC --tokenizer=NAME_OR_PATH --seq_len=N --out=DIR
        [--split=train|validation] [--holdout_fraction=0.01] [--format=pretrain|instruction|chat]
        [--packing=concat|first_fit] [--text_field=text] [--template=mpt-7b-instruct]
        [--records_per_shard=10000] [--overwrite]

SPEC is any source of mpt_jax.data.sources ("stdlib", "tfds:NAME", "files:GLOB"); the tokenizer is
an HF hub name (e.g. EleutherAI/gpt-neox-20b), a tokenizer.json or a folder, or "stdlib-bpe".
For held-out eval data prepare the source twice, ``--split=train`` and ``--split=validation`` into
two folders, and name the second as the config's ``eval_source`` (for files: sources the two
splits are the documents outside / inside ``--holdout_fraction``, by hash).
Output: DIR/shard-00000.array_record ... and DIR/manifest.json (documents, tokens, sequences,
padding, the largest token id, the tokenizer's name and fingerprint, seq_len, settings), which
training checks against the run before it starts. DIR is written under a temporary name and
renamed at the end; an existing DIR is refused unless --overwrite. The corpus is read once in
order (no shuffle): shuffling happens when training reads the shards.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags, logging
from tqdm import tqdm

from mpt_jax import cli
from mpt_jax.data import formats, sources
from mpt_jax.data.pipeline import HOLDOUT_FRACTION, DataConfig, SourceConfig, get_tokenizer, packed_rows
from mpt_jax.files import atomic_output_dir


def _define_flags() -> None:
    """Flags exist only when prepare runs as a program (importing it defines none)."""
    flags.DEFINE_string("source", None, "source spec: stdlib, tfds:NAME, files:GLOB", required=True)
    flags.DEFINE_string("tokenizer", "stdlib-bpe", "HF hub name, tokenizer.json, folder, or stdlib-bpe")
    flags.DEFINE_integer("seq_len", None, "tokens per packed sequence", required=True)
    flags.DEFINE_string("out", None, "output folder", required=True)
    flags.DEFINE_string("split", "train", "split of the source: train or validation (or a TFDS split name)")
    flags.DEFINE_enum("format", "pretrain", ["pretrain", "instruction", "chat"], "example format")
    flags.DEFINE_enum("packing", "concat", ["concat", "first_fit"], "packing")
    flags.DEFINE_string("text_field", "text", "jsonl/parquet/TFDS text field (pretrain format)")
    flags.DEFINE_string("template", "mpt-7b-instruct", "instruction prompt template")
    flags.DEFINE_string("data_dir", None, "TFDS / embedded corpus data directory")
    flags.DEFINE_integer("records_per_shard", 10_000, "packed sequences per shard")
    flags.DEFINE_bool("overwrite", False, "replace --out if it exists")
    flags.DEFINE_bool("skip_bad_records", False, "skip (and count) malformed jsonl lines")
    flags.DEFINE_float(
        "holdout_fraction", HOLDOUT_FRACTION, "files: sources: the share of documents in the validation split"
    )


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
        "holdout_fraction": cfg.holdout_fraction,
        "example_format": cfg.mixture[0].format,
        "tokenizer": cfg.tokenizer,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "seq_len": seq_len,
        "packing": cfg.packing,
        "features": ["tokens", "segment_ids", "positions", "loss_mask"],
        "shards": [],
    }
    sequences = tokens = targets = max_id = 0
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
            max_id = max(max_id, int(row["tokens"].max()))
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
            max_token_id=max_id,
            format_stats=stats.summary(),
            seconds=round(time.time() - start, 1),
        )
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
    return manifest


def main(argv):
    del argv
    f = flags.FLAGS
    source = SourceConfig(
        f.source,
        format=f.format,
        text_field=None if f.format != "pretrain" else f.text_field,
        template=f.template,
    )
    cfg = DataConfig(
        mixture=(source,),
        tokenizer=f.tokenizer,
        data_dir=f.data_dir,
        packing=f.packing,
        skip_bad_records=f.skip_bad_records,
        holdout_fraction=f.holdout_fraction,
        shuffle=False,
    )
    try:
        cfg.validate()
        m = prepare(
            cfg,
            split=f.split,
            seq_len=f.seq_len,
            out=f.out,
            records_per_shard=f.records_per_shard,
            overwrite=f.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 1
    logging.info("prepare: %s", m["format_stats"])
    print(
        f"prepare: {m['documents']:,} documents -> {m['sequences']:,} sequences of {m['seq_len']} "
        f"({m['tokens']:,} tokens, {m['padding_tokens']:,} padding) in {len(m['shards'])} shard(s) "
        f"at {os.path.abspath(f.out)} ({m['seconds']} s)"
    )
    return 0


if __name__ == "__main__":
    cli.run("prepare", _define_flags, main)
