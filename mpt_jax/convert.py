"""Convert MPT checkpoints between HuggingFace and mpt-jax.

    python -m mpt_jax.convert hf_to_jax SRC DST [--dtype=float32] [--overwrite]
    python -m mpt_jax.convert jax_to_hf SRC DST [--step=N] [--dtype=bfloat16] [--max_shard_size=5GB] [--overwrite]

hf_to_jax: SRC is an HF folder or hub id (safetensors or .bin, transformers-native or mosaicml
remote-code config); DST an mpt-jax model checkpoint (orbax params + config.json; the tokenizer
files, if any, under DST/tokenizer).

jax_to_hf: SRC is a training workdir (its newest checkpoint, or ``--step=N``) or an mpt-jax model
checkpoint; DST gets safetensors shards that ``transformers.MptForCausalLM.from_pretrained(DST)``
loads, and the tokenizer: a model checkpoint's or a workdir's ``tokenizer/`` files (a training run
writes its tokenizer there when it starts, ChatML tokens and chat template included when it trains
on chat data); for workdirs older than that, the run's ``config.data.tokenizer``.

DST is checked before anything is downloaded or loaded, is never overwritten unless
``--overwrite``, and is written whole (tokenizer included) under a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Any

from absl import flags, logging

from mpt_jax import cli


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1024' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "").upper().replace("I", "").rstrip("B")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(unit or " "))


def check_dst(src: str, dst: str, *, overwrite: bool) -> None:
    """Refuses an existing DST (unless ``overwrite``) and a DST that would replace SRC; cheap, so
    it runs before a 30B model is downloaded or loaded."""
    dst_abs = os.path.realpath(dst)
    if os.path.exists(dst_abs) and not overwrite:
        raise FileExistsError(f"{os.path.abspath(dst)} exists; pass --overwrite to replace it")
    if os.path.exists(src):
        src_abs = os.path.realpath(src)
        if os.path.commonpath([src_abs, dst_abs]) == dst_abs:
            raise ValueError(f"DST {dst} is SRC {src} or holds it: writing DST would replace SRC")


def hf_to_jax(src: str, dst: str, *, dtype: str | None, overwrite: bool) -> None:
    from mpt_jax.checkpoint import save_model
    from mpt_jax.data.tokenizer import TokenizerFiles, folder_files
    from mpt_jax.hf import iter_params, open_hf, resolve_hf_path

    check_dst(src, dst, overwrite=overwrite)
    folder = resolve_hf_path(src)
    tokenizer = TokenizerFiles(folder) if folder_files(folder) else None  # copied as they are
    if tokenizer is None:
        logging.warning("no tokenizer: %s has no tokenizer files", folder)
    cfg, reader = open_hf(folder)
    try:  # streamed param by param: host memory holds one converted param at a time
        save_model(dst, cfg, iter_params(cfg, reader, dtype), overwrite=overwrite, tokenizer=tokenizer)
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------------
# jax_to_hf: what SRC is, and the training run's tokenizer.


def source_kind(src: str) -> tuple[str, str]:
    """(``"workdir"`` or ``"model"``, its absolute folder) as ``checkpoint.resolve_source`` sees SRC;
    anything else is an error that says what SRC is instead."""
    from mpt_jax.checkpoint import FORMAT, resolve_source
    from mpt_jax.files import read_json

    kind, where = resolve_source(src)
    if kind != "hf":
        return kind, where
    config_file = os.path.join(where, "config.json")
    if os.path.isfile(config_file) and read_json(config_file, what="config").get("model_type") == "mpt":
        raise ValueError(f"SRC {src} is already an HF folder (config.json model_type 'mpt'); nothing to convert")
    raise ValueError(
        f"SRC {src} is neither a training workdir (no checkpoints/ folder) nor an mpt-jax model checkpoint "
        f"(no config.json with format {FORMAT!r})"
    )


def source_tokenizer(kind: str, where: str, run: dict[str, Any] | None, max_length: int) -> Any:
    """What save_hf writes as the tokenizer: a checkpoint's ``tokenizer/`` files (copied as they
    are), else a workdir's run tokenizer (``checkpoint.find_tokenizer``) told ``max_length``; None,
    with a warning naming why, when there is none."""
    from mpt_jax.checkpoint import TOKENIZER_DIR, find_tokenizer
    from mpt_jax.data.tokenizer import TokenizerFiles, folder_files

    folder = os.path.join(where, TOKENIZER_DIR)
    if folder_files(folder):
        return TokenizerFiles(folder)
    tok, origin = find_tokenizer(kind, where, run=run)
    if tok is None:
        logging.warning("no tokenizer written: %s", cli.one_line(origin))
        return None
    tok.model_max_length = max_length
    logging.info("tokenizer: %s (%d ids%s)", origin, tok.vocab_size, ", chat template" if tok.chat_template else "")
    return tok


def _load_source(src: str, step: int | None, dtype: str | None) -> tuple[Any, Any, Any]:
    """(cfg, params, tokenizer for save_hf) of a training workdir or a model checkpoint."""
    from mpt_jax import checkpoint

    kind, where = source_kind(src)
    if kind == "model":
        cfg, params = checkpoint.load_params_any(where, dtype=dtype, step=step)
        return cfg, params, source_tokenizer(kind, where, None, cfg.max_seq_len)
    step, run = checkpoint.workdir_run_config(where, step)  # the step first: a run may save a newer one meanwhile
    cfg, params = checkpoint.load_params_any(where, dtype=dtype, step=step)
    logging.info("%s: the checkpoint at step %d", src, step)
    return cfg, params, source_tokenizer(kind, where, run, cfg.max_seq_len)


def jax_to_hf(
    src: str,
    dst: str,
    *,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
) -> None:
    from mpt_jax.hf import save_hf

    check_dst(src, dst, overwrite=overwrite)
    cfg, params, tokenizer = _load_source(src, step, dtype)
    save_hf(cfg, params, dst, tokenizer=tokenizer, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# The CLI.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpt_jax.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    for name, what in (
        ("hf_to_jax", "HF folder or hub id -> mpt-jax model checkpoint"),
        ("jax_to_hf", "training workdir or mpt-jax model checkpoint -> HF folder"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="cast every tensor")
        p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        if name == "jax_to_hf":
            p.add_argument("--step", type=int, default=None, help="a training workdir's checkpoint (default: newest)")
            p.add_argument("--max_shard_size", type=parse_size, default=parse_size("5GB"))
    args = parser.parse_args(argv)
    flags.FLAGS.mark_as_parsed()  # argparse reads the command line; absl then logs without a warning about flags
    cli.quiet_other_libraries()
    logging.set_verbosity(logging.INFO)
    start = time.time()
    try:
        if args.direction == "hf_to_jax":
            hf_to_jax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
        else:
            jax_to_hf(
                args.src,
                args.dst,
                step=args.step,
                dtype=args.dtype,
                max_shard_bytes=args.max_shard_size,
                overwrite=args.overwrite,
            )
    except cli.USER_ERRORS as e:
        print(f"convert {args.direction}: error: {cli.one_line(e)}", file=sys.stderr)
        return 1
    print(f"convert {args.direction}: wrote {os.path.abspath(args.dst)} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
