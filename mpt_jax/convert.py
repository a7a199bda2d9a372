"""Convert MPT checkpoints between HuggingFace and mpt-jax.

    python -m mpt_jax.convert hf_to_jax SRC DST [--dtype=float32] [--overwrite]
    python -m mpt_jax.convert jax_to_hf SRC DST [--dtype=bfloat16] [--max_shard_size=5GB] [--overwrite]

SRC of hf_to_jax is an HF folder or hub id (safetensors or .bin, transformers-native or mosaicml
remote-code config); DST is an mpt-jax model checkpoint (orbax params + config.json; tokenizer
files, if any, under DST/tokenizer). jax_to_hf writes safetensors shards that
``transformers.MptForCausalLM.from_pretrained(DST)`` loads. DST is never overwritten unless
``--overwrite``, and is written under a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time

from absl import logging

TOKENIZER_DIR = "tokenizer"


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1024' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "").upper().replace("I", "").rstrip("B")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(unit or " "))


def _tokenizer_files(folder: str) -> list[str]:
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def hf_to_jax(src: str, dst: str, *, dtype: str | None, overwrite: bool) -> None:
    from mpt_jax.checkpoint import save_model
    from mpt_jax.hf import iter_params, open_hf, resolve_hf_path

    folder = resolve_hf_path(src)
    cfg, reader = open_hf(folder)
    try:  # streamed param by param: host memory holds one converted param at a time
        save_model(dst, cfg, iter_params(cfg, reader, dtype), overwrite=overwrite)
    finally:
        reader.close()
    tokenizer = _tokenizer_files(folder)
    if tokenizer:
        os.makedirs(os.path.join(dst, TOKENIZER_DIR), exist_ok=True)
        for file in tokenizer:
            shutil.copy2(file, os.path.join(dst, TOKENIZER_DIR))


def jax_to_hf(src: str, dst: str, *, dtype: str | None, max_shard_bytes: int, overwrite: bool) -> None:
    from mpt_jax.checkpoint import load_model
    from mpt_jax.hf import save_hf

    cfg, params = load_model(src)
    tokenizer = os.path.join(src, TOKENIZER_DIR)
    save_hf(
        cfg,
        params,
        dst,
        tokenizer=tokenizer if os.path.isdir(tokenizer) else None,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpt_jax.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    for name, what in (("hf_to_jax", "HF folder or hub id -> mpt-jax checkpoint"), ("jax_to_hf", "mpt-jax -> HF")):
        p = sub.add_parser(name, help=what)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="cast every tensor")
        p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        if name == "jax_to_hf":
            p.add_argument("--max_shard_size", type=parse_size, default=parse_size("5GB"))
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    start = time.time()
    try:
        if args.direction == "hf_to_jax":
            hf_to_jax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
        else:
            jax_to_hf(
                args.src, args.dst, dtype=args.dtype, max_shard_bytes=args.max_shard_size, overwrite=args.overwrite
            )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"convert {args.direction}: error: {e}", file=sys.stderr)
        return 1
    print(f"convert {args.direction}: wrote {os.path.abspath(args.dst)} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
