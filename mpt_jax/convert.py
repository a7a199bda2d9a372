"""Convert MPT checkpoints between HuggingFace and mpt-jax.

    python -m mpt_jax.convert hf_to_jax SRC DST [--dtype=float32] [--overwrite]
    python -m mpt_jax.convert jax_to_hf SRC DST [--step=N] [--dtype=bfloat16] [--max_shard_size=5GB] [--overwrite]

hf_to_jax: SRC is an HF folder or hub id (safetensors or .bin, transformers-native or mosaicml
remote-code config); DST an mpt-jax model checkpoint (orbax params + config.json; the tokenizer
files, if any, under DST/tokenizer).

jax_to_hf: SRC is a training workdir (its newest checkpoint, or ``--step=N``) or an mpt-jax model
checkpoint; DST gets safetensors shards that ``transformers.MptForCausalLM.from_pretrained(DST)``
loads, and the tokenizer: a model checkpoint's tokenizer files, or the training run's own
(``config.data.tokenizer``, with the ChatML tokens and a chat template when it trained on chat data).

DST is checked before anything is downloaded or loaded, is never overwritten unless
``--overwrite``, and is written whole (tokenizer included) under a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from typing import Any

from absl import flags, logging

from mpt_jax import cli

TOKENIZER_DIR = "tokenizer"

# transformers' chat template for the ChatML layout of mpt_jax.data.formats.render_chatml (MPT-7B/30B-Chat).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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


def _tokenizer_files(folder: str) -> list[str]:
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def hf_to_jax(src: str, dst: str, *, dtype: str | None, overwrite: bool) -> None:
    from mpt_jax.checkpoint import save_model
    from mpt_jax.hf import iter_params, open_hf, resolve_hf_path

    check_dst(src, dst, overwrite=overwrite)
    folder = resolve_hf_path(src)
    tokenizer = _tokenizer_files(folder)

    def copy_tokenizer(tmp: str) -> None:  # inside save_model's temporary folder: renamed with the params
        if tokenizer:
            os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
            for file in tokenizer:
                shutil.copy2(file, os.path.join(tmp, TOKENIZER_DIR))

    cfg, reader = open_hf(folder)
    try:  # streamed param by param: host memory holds one converted param at a time
        save_model(dst, cfg, iter_params(cfg, reader, dtype), overwrite=overwrite, extra=copy_tokenizer)
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


class HFTokenizer:
    """An mpt_jax Tokenizer written as transformers reads one: ``tokenizer.json`` plus a
    ``tokenizer_config.json`` (``PreTrainedTokenizerFast``; MPT's BOS = EOS = UNK = the end-of-text
    token, as gpt-neox-20b's), and the ChatML chat template when the run trained on chat data."""

    def __init__(self, tokenizer: Any, *, chat: bool, max_length: int):
        self.tokenizer = tokenizer
        self.chat = chat
        self.max_length = max_length

    def save_pretrained(self, folder: str) -> None:
        self.tokenizer.tk.save(os.path.join(folder, "tokenizer.json"))
        eos = self.tokenizer.eos_token
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": eos,
            "eos_token": eos,
            "unk_token": eos,
            "model_max_length": self.max_length,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat:
            config["chat_template"] = CHATML_TEMPLATE
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")


def run_tokenizer(run: dict[str, Any], max_length: int) -> HFTokenizer | None:
    """The tokenizer a training run used (its config's ``data`` section), ChatML tokens included
    when it trained on chat data; None, with a warning naming why, when it cannot be found (an
    uncached stdlib-bpe, a hub tokenizer offline). Never trains one."""
    from mpt_jax.data.pipeline import DataConfig, get_tokenizer
    from mpt_jax.data.tokenizer import IM_START

    try:
        data = DataConfig.from_config(run.get("data") or {})
        tok = get_tokenizer(data, train=False)
    except (ValueError, OSError) as e:
        logging.warning("no tokenizer written: the run's tokenizer was not found (%s)", cli.one_line(e))
        return None
    chat = tok.token_to_id(IM_START) is not None  # get_tokenizer added ChatML for chat data
    logging.info("tokenizer: %s (%d ids%s)", data.tokenizer, tok.vocab_size, ", ChatML" if chat else "")
    return HFTokenizer(tok, chat=chat, max_length=max_length)


def _load_source(src: str, step: int | None, dtype: str | None) -> tuple[Any, Any, Any]:
    """(cfg, params, tokenizer for save_hf) of a training workdir or a model checkpoint."""
    from mpt_jax import checkpoint

    kind, where = source_kind(src)
    if kind == "model":
        cfg, params = checkpoint.load_params_any(where, dtype=dtype, step=step)
        tokenizer = os.path.join(where, TOKENIZER_DIR)
        return cfg, params, tokenizer if os.path.isdir(tokenizer) else None
    step, run = checkpoint.workdir_run_config(where, step)  # the step first: a run may save a newer one meanwhile
    cfg, params = checkpoint.load_params_any(where, dtype=dtype, step=step)
    logging.info("%s: the checkpoint at step %d", src, step)
    return cfg, params, run_tokenizer(run, cfg.max_seq_len)


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
