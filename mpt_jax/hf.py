"""HuggingFace MPT checkpoints <-> mpt-jax params.

``load_hf(path_or_hub_id)`` reads an HF MPT folder (safetensors or PyTorch ``.bin``, single or
sharded with an index; transformers-native or mosaicml remote-code config) and returns
``(cfg, params)``; ``save_hf(cfg, params, out_dir)`` writes safetensors shards, their index and a
config.json that ``transformers.MptForCausalLM.from_pretrained`` loads.

Both directions go tensor by tensor: the stacked per-layer arrays are allocated once and filled
layer by layer, so converting MPT-30B holds one copy of the weights, not two. Torch is needed only
to read ``.bin`` files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import ml_dtypes
import numpy as np
from absl import logging

from mpt_jax.config import MPTConfig
from mpt_jax.files import atomic_output_dir, read_json
from mpt_jax.model import flat_params, param_shapes

Params = dict[str, Any]
Path = tuple[str, ...]

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


# ----------------------------------------------------------------------------------------------
# The key map: one entry per HF tensor, with how it becomes one or more JAX params and back.


@dataclasses.dataclass(frozen=True)
class TensorMap:
    hf_key: str  # with "{i}" for the layer index in per-layer tensors
    jax_paths: tuple[Path, ...]  # paths into params; per-layer ones lie under "blocks" (leading layer axis)
    hf_shape: tuple[int, ...]
    to_jax: Callable[[np.ndarray], list[np.ndarray]]
    to_hf: Callable[[list[np.ndarray]], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_key


def _linear(hf_key: str, path: Path, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> TensorMap:
    """torch Linear weight (out, in) <-> Flax kernel (in..., out...)."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return TensorMap(
        hf_key,
        (path,),
        (n_out, n_in),
        lambda w: [w.T.reshape(in_shape + out_shape)],
        lambda ks: ks[0].reshape(n_in, n_out).T,
    )


def _vector(hf_key: str, path: Path, shape: tuple[int, ...]) -> TensorMap:
    n = math.prod(shape)
    return TensorMap(hf_key, (path,), (n,), lambda w: [w.reshape(shape)], lambda ks: ks[0].reshape(n))


def _table(hf_key: str, path: Path, shape: tuple[int, ...]) -> TensorMap:
    """Embedding tables have the same layout on both sides."""
    return TensorMap(hf_key, (path,), shape, lambda w: [w], lambda ks: ks[0])


def _split_qkv(hf_key: str, q_path: Path, kv_path: Path, cfg: MPTConfig, bias: bool) -> TensorMap:
    """GQA/MQA: HF keeps one fused Wqkv, rows [q | k | v]; we keep Wq [.., H, hd] and Wkv [.., 2, Hkv, hd]."""
    d, h, hkv, hd = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_dim
    nq, nkv = h * hd, 2 * hkv * hd
    if bias:
        return TensorMap(
            hf_key,
            (q_path, kv_path),
            (nq + nkv,),
            lambda b: [b[:nq].reshape(h, hd), b[nq:].reshape(2, hkv, hd)],
            lambda bs: np.concatenate([bs[0].reshape(-1), bs[1].reshape(-1)]),
        )
    return TensorMap(
        hf_key,
        (q_path, kv_path),
        (nq + nkv, d),
        lambda w: [w[:nq].T.reshape(d, h, hd), w[nq:].T.reshape(d, 2, hkv, hd)],
        lambda ks: np.concatenate([ks[0].reshape(d, nq), ks[1].reshape(d, nkv)], axis=1).T,
    )


def tensor_maps(cfg: MPTConfig) -> list[TensorMap]:
    """Every HF tensor of a model with this config, in HF order."""
    d, h, hkv, hd, f = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    bias = not cfg.no_bias
    maps = [_table("transformer.wte.weight", ("wte", "embedding"), (cfg.vocab_size, d))]
    if cfg.uses_learned_pos_emb:
        maps.append(_table("transformer.wpe.weight", ("wpe", "embedding"), (cfg.max_seq_len, d)))

    def norm(hf: str, path: Path, shape: tuple[int, ...], with_bias: bool = cfg.norm_bias) -> list[TensorMap]:
        out = [_vector(f"{hf}.weight", path + ("scale",), shape)]
        if with_bias:
            out.append(_vector(f"{hf}.bias", path + ("bias",), shape))
        return out

    def linear(hf: str, path: Path, in_shape, out_shape, with_bias: bool = bias) -> list[TensorMap]:
        out = [_linear(f"{hf}.weight", path + ("kernel",), in_shape, out_shape)]
        if with_bias:
            out.append(_vector(f"{hf}.bias", path + ("bias",), out_shape))
        return out

    blk, b = "transformer.blocks.{i}", ("blocks",)
    attn = b + ("attn",)
    maps += norm(f"{blk}.norm_1", b + ("norm_1",), (d,))
    if not cfg.fused_qkv:
        maps += linear(f"{blk}.attn.Wq", attn + ("Wq",), (d,), (h, hd), cfg.qkv_bias)
        maps += linear(f"{blk}.attn.Wk", attn + ("Wk",), (d,), (hkv, hd), cfg.qkv_bias)
        maps += linear(f"{blk}.attn.Wv", attn + ("Wv",), (d,), (hkv, hd), cfg.qkv_bias)
    elif cfg.attn_type == "multihead_attention":
        maps += linear(f"{blk}.attn.Wqkv", attn + ("Wqkv",), (d,), (3, h, hd), cfg.qkv_bias)
    else:
        q, kv = attn + ("Wq",), attn + ("Wkv",)
        maps.append(_split_qkv(f"{blk}.attn.Wqkv.weight", q + ("kernel",), kv + ("kernel",), cfg, bias=False))
        if cfg.qkv_bias:
            maps.append(_split_qkv(f"{blk}.attn.Wqkv.bias", q + ("bias",), kv + ("bias",), cfg, bias=True))
    if cfg.qk_ln or cfg.qk_gn:  # LayerNorms whatever norm_type is (see model.Norm)
        q_shape, k_shape = ((h, hd), (hkv, hd)) if cfg.qk_ln else ((hd,), (hd,))
        maps += norm(f"{blk}.attn.q_ln", attn + ("q_ln",), q_shape, with_bias=bias)
        maps += norm(f"{blk}.attn.k_ln", attn + ("k_ln",), k_shape, with_bias=bias)
    maps += linear(f"{blk}.attn.out_proj", attn + ("out_proj",), (h, hd), (d,))
    maps += norm(f"{blk}.norm_2", b + ("norm_2",), (d,))
    maps += linear(f"{blk}.ffn.up_proj", b + ("ffn", "up_proj"), (d,), (f,))
    if cfg.ffn_type == "mptglu":
        maps += linear(f"{blk}.ffn.gate_proj", b + ("ffn", "gate_proj"), (d,), (f,))
    maps += linear(f"{blk}.ffn.down_proj", b + ("ffn", "down_proj"), (f,), (d,))
    maps += norm("transformer.norm_f", ("norm_f",), (d,))
    if not cfg.tie_word_embeddings:
        maps.append(_linear("lm_head.weight", ("lm_head", "kernel"), (d,), (cfg.vocab_size,)))
    return maps


def hf_keys(cfg: MPTConfig) -> dict[str, tuple[int, ...]]:
    """HF key -> expected shape, every layer spelled out."""
    out = {}
    for m in tensor_maps(cfg):
        for i in range(cfg.n_layers) if m.per_layer else [None]:
            out[m.hf_key.format(i=i)] = m.hf_shape
    return out


# ----------------------------------------------------------------------------------------------
# Reading HF folders.


def _normalize_key(key: str) -> str:
    """Accept llm-foundry export variants: a composer ``model.`` prefix, fused norm_attn_norm."""
    if key.startswith("model.transformer.") or key.startswith("model.lm_head."):
        key = key[len("model.") :]
    return key.replace(".norm_attn_norm.", ".")


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class CheckpointReader:
    """Lazy access to the tensors of an HF folder, by (normalized) key, one tensor at a time."""

    def __init__(self, folder: str):
        self.folder = folder
        self.files = self._find_files(folder)
        self._where: dict[str, tuple[str, str]] = {}  # normalized key -> (file, original key)
        self._open: dict[str, Any] = {}
        for file in self.files:
            for key in self._keys(file):
                self._where[_normalize_key(key)] = (file, key)

    @staticmethod
    def _find_files(folder: str) -> list[str]:
        for index in (SAFE_INDEX, BIN_INDEX):
            path = os.path.join(folder, index)
            if os.path.isfile(path):
                weight_map = read_json(path, what="checkpoint index").get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{path}: no 'weight_map' object")
                files = sorted(set(weight_map.values()))
                missing = [x for x in files if not os.path.isfile(os.path.join(folder, x))]
                if missing:
                    raise FileNotFoundError(f"{path} names shard(s) that are not in {folder}: {missing}")
                return [os.path.join(folder, x) for x in files]
        for single in ("model.safetensors", "pytorch_model.bin"):
            path = os.path.join(folder, single)
            if os.path.isfile(path):
                return [path]
        raise FileNotFoundError(
            f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or a sharded index "
            f"({SAFE_INDEX} / {BIN_INDEX})"
        )

    def _handle(self, file: str):
        if file not in self._open:
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[file] = safe_open(file, framework="numpy")
            else:
                try:
                    import torch
                except ImportError as e:  # pragma: no cover - torch is in the hf extra
                    raise ImportError(f"reading {file} needs torch: pip install 'mpt-jax[hf]'") from e
                self._open[file] = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return self._open[file]

    def _keys(self, file: str) -> list[str]:
        handle = self._handle(file)
        return list(handle.keys())

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        file, orig = self._where[key]
        handle = self._handle(file)
        if file.endswith(".safetensors"):
            return tuple(handle.get_slice(orig).get_shape())
        return tuple(handle[orig].shape)

    def get(self, key: str) -> np.ndarray:
        file, orig = self._where[key]
        handle = self._handle(file)
        if file.endswith(".safetensors"):
            return handle.get_tensor(orig)
        return _torch_to_numpy(handle[orig])

    def close(self) -> None:
        self._open.clear()


_HUB_NAME = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?"


def is_hub_id(path: str) -> bool:
    """``owner/name`` that is not a local path: the only strings sent to the hub. ``workdirs/x``
    is local when ``workdirs/`` exists; ``./x``, ``/x``, ``~/x`` and ``x/y/`` always are."""
    owner, _, name = path.partition("/")
    return bool(
        re.fullmatch(_HUB_NAME, owner)
        and re.fullmatch(_HUB_NAME, name)
        and not os.path.exists(path)
        and not os.path.isdir(owner)
    )


def resolve_hf_path(path_or_hub_id: str | os.PathLike) -> str:
    """A local folder as is; otherwise a hub id, downloaded (config, weights, tokenizer files)."""
    path = os.fspath(path_or_hub_id)
    if os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    if not is_hub_id(path):
        raise FileNotFoundError(f"no such folder: {path} (not a folder, and not a hub id of the form 'owner/name')")
    from huggingface_hub import list_repo_files, snapshot_download

    unreachable = _hub_unreachable()
    if unreachable:  # the hub client would retry for half a minute: use its cache or stop at once
        try:
            return snapshot_download(
                path, allow_patterns=_hub_patterns(("*.safetensors", "*.bin")), local_files_only=True
            )
        except Exception:  # noqa: BLE001 - not cached, in whatever way the client says it
            raise FileNotFoundError(
                f"no such folder: {path}; as a hub id it is not in the local cache and the hub cannot be reached "
                f"({unreachable})"
            ) from None
    try:
        files = list_repo_files(path)
    except Exception as e:
        raise FileNotFoundError(f"{path}: not a local folder, and the hub could not list it ({e})") from e
    weights = ("*.safetensors",) if any(f.endswith(".safetensors") for f in files) else ("*.bin",)
    return snapshot_download(path, allow_patterns=_hub_patterns(weights))


def _hub_patterns(weights: tuple[str, ...]) -> list[str]:
    """The files of a hub repo we need: config, tokenizer and one weight format with its index."""
    index = {"*.safetensors": SAFE_INDEX, "*.bin": BIN_INDEX}
    return [
        "config.json",
        "generation_config.json",
        "tokenizer*",
        "special_tokens_map.json",
        *weights,
        *(index[w] for w in weights),
    ]


def _hub_unreachable() -> str | None:
    """Why the hub cannot be used now (offline mode, or no connection to its host), else None: one
    quick check instead of the hub client's retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:
        return f"{url.hostname} is unreachable: {e}"
    return None


def open_hf(path_or_hub_id: str | os.PathLike) -> tuple[MPTConfig, CheckpointReader]:
    """The config and a checked reader of an HF MPT folder (or hub id).

    Missing, unexpected and mis-shaped tensors are errors naming the key (and both shapes),
    raised before any tensor is read.
    """
    folder = resolve_hf_path(path_or_hub_id)
    cfg = MPTConfig.from_hf(folder)
    reader = CheckpointReader(folder)
    expected = hf_keys(cfg)
    present = set(reader.keys())
    if cfg.tie_word_embeddings and "lm_head.weight" in present:
        present.discard("lm_head.weight")  # a tied copy of wte written by some exporters
        logging.info("load_hf: ignoring lm_head.weight (tied to transformer.wte.weight)")
    missing = sorted(set(expected) - present, key=_natural)
    extra = sorted(present - set(expected), key=_natural)
    if missing or extra:
        raise ValueError(
            f"{folder}: checkpoint does not match its config.json:"
            + (f" missing tensor(s) {_abbrev(missing)};" if missing else "")
            + (f" unexpected tensor(s) {_abbrev(extra)};" if extra else "")
        )
    for key, shape in expected.items():
        got = reader.shape(key)
        if got != shape:
            raise ValueError(f"{folder}: tensor {key} has shape {got}, expected {shape} for config {_summary(cfg)}")
    return cfg, reader


def iter_params(
    cfg: MPTConfig, reader: CheckpointReader, dtype: str | None = None
) -> Iterator[tuple[Path, np.ndarray]]:
    """Yields (param path, array) one finished param at a time.

    A stacked per-layer param is allocated once and filled from the n_layers HF tensors, so at
    most one param (two for a split GQA Wqkv) is in memory beyond what the caller keeps.
    """
    for m in tensor_maps(cfg):
        stacked: list[np.ndarray | None] = [None] * len(m.jax_paths)
        for i in range(cfg.n_layers) if m.per_layer else [None]:
            pieces = m.to_jax(reader.get(m.hf_key.format(i=i)))
            for n, piece in enumerate(pieces):
                piece = piece.astype(dtype) if dtype else piece
                if i is None:
                    stacked[n] = np.ascontiguousarray(piece)
                else:
                    if stacked[n] is None:
                        stacked[n] = np.empty((cfg.n_layers,) + piece.shape, piece.dtype)
                    stacked[n][i] = piece
        yield from zip(m.jax_paths, stacked, strict=True)


def load_hf(path_or_hub_id: str | os.PathLike, *, dtype: str | None = None) -> tuple[MPTConfig, Params]:
    """Reads an HF MPT checkpoint into (cfg, params) with numpy leaves.

    ``dtype`` (e.g. "float32") casts every tensor; by default each keeps its stored dtype.
    Missing, unexpected and mis-shaped tensors are errors naming the key (and both shapes).
    """
    cfg, reader = open_hf(path_or_hub_id)
    try:
        params: Params = {}
        for path, value in iter_params(cfg, reader, dtype):
            _set(params, path, value)
        return cfg, params
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------------
# Writing HF folders.


def _hf_tensors(cfg: MPTConfig, params: Params, dtype: str | None) -> Iterator[tuple[str, np.ndarray]]:
    for m in tensor_maps(cfg):
        for i in range(cfg.n_layers) if m.per_layer else [None]:
            pieces = []
            for path in m.jax_paths:
                leaf = _get(params, path)
                if leaf is None:
                    raise ValueError(f"save_hf: params lack {'/'.join(path)} (needed for {m.hf_key.format(i=i)})")
                pieces.append(np.asarray(leaf if i is None else leaf[i]))
            tensor = m.to_hf(pieces)
            key = m.hf_key.format(i=i)
            if tensor.shape != m.hf_shape:
                raise ValueError(f"save_hf: {key} would have shape {tensor.shape}, expected {m.hf_shape}")
            if dtype:
                tensor = tensor.astype(dtype)
            yield key, np.ascontiguousarray(tensor)


def save_hf(
    cfg: MPTConfig,
    params: Params,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
) -> str:
    """Writes an HF MPT folder: safetensors shards (+ index when more than one) and config.json.

    The folder is written under a temporary name and renamed at the end, so a failure leaves no
    half-written output; an existing ``out_dir`` is an error unless ``overwrite``. ``tokenizer``
    may be anything with ``save_pretrained(dir)`` or a path to a tokenizer folder / tokenizer.json.
    """
    from safetensors.numpy import save_file

    from mpt_jax.quantize import is_quantized

    if is_quantized(params):  # HF MPT checkpoints hold float weights only
        raise ValueError(
            "save_hf: these params are int8-quantized (they hold *_scale leaves); save the float params, or "
            "mpt_jax.quantize.dequantize_params(cfg, params) knowing they are the rounded weights"
        )
    cfg.validate()
    unsupported = cfg.hf_native_unsupported()
    if unsupported:
        logging.warning(
            "save_hf: transformers' native MptForCausalLM ignores or rejects %s; this folder reads back "
            "exactly with mpt_jax.hf.load_hf, but transformers would compute a different model.",
            ", ".join(unsupported),
        )
    _check_params(cfg, params)
    out_dir = os.fspath(out_dir)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        shards: list[dict[str, str]] = []  # key -> temporary shard name, one dict per shard
        current: dict[str, np.ndarray] = {}
        size = total = 0
        stored_dtype = None

        def flush():
            nonlocal current, size
            if current:
                name = f"shard-{len(shards):05d}.tmp"
                save_file(current, os.path.join(tmp, name), metadata={"format": "pt"})
                shards.append(dict.fromkeys(current, name))
                current, size = {}, 0

        for key, tensor in _hf_tensors(cfg, params, dtype):
            stored_dtype = stored_dtype or tensor.dtype
            if size and size + tensor.nbytes > max_shard_bytes:
                flush()
            current[key] = tensor
            size += tensor.nbytes
            total += tensor.nbytes
        flush()

        weight_map = {}
        for n, shard in enumerate(shards, start=1):
            final = "model.safetensors" if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            os.rename(os.path.join(tmp, next(iter(shard.values()))), os.path.join(tmp, final))
            weight_map.update(dict.fromkeys(shard, final))
        if len(shards) > 1:
            _write_json(os.path.join(tmp, SAFE_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
        config = cfg.to_hf()
        config["torch_dtype"] = _torch_dtype_name(stored_dtype)
        _write_json(os.path.join(tmp, "config.json"), config)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)
    return out_dir


def _check_params(cfg: MPTConfig, params: Params) -> None:
    """Every param the config implies is there with the right shape, and nothing else."""
    expected = {"/".join(path): tuple(leaf.shape) for path, leaf in flat_params(nn.meta.unbox(param_shapes(cfg)))}
    got = {"/".join(path): tuple(np.shape(leaf)) for path, leaf in flat_params(params)}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(
            "params do not match the config:"
            + (f" missing {missing};" if missing else "")
            + (f" unexpected {extra};" if extra else "")
        )
    for key, shape in expected.items():
        if got[key] != shape:
            raise ValueError(f"params: {key} has shape {got[key]}, expected {shape} for config {_summary(cfg)}")


def _save_tokenizer(tokenizer: Any, folder: str) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
        return
    path = os.fspath(tokenizer)
    if os.path.isdir(path):  # every tokenizer file as it is (chat_template.jinja, vocab.json, ... too)
        from mpt_jax.data.tokenizer import TokenizerFiles

        TokenizerFiles(path).save_pretrained(folder)
    elif os.path.isfile(path):
        shutil.copy2(path, os.path.join(folder, "tokenizer.json"))
    else:
        raise FileNotFoundError(f"save_hf: tokenizer {path} is neither a folder nor a file")


# ----------------------------------------------------------------------------------------------
# Small helpers.


def _get(tree: Params, path: Path):
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _set(tree: Params, path: Path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _abbrev(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _summary(cfg: MPTConfig) -> str:
    return (
        f"(d_model={cfg.d_model}, n_heads={cfg.n_heads}, n_layers={cfg.n_layers}, "
        f"attn_type={cfg.attn_type}, vocab_size={cfg.vocab_size})"
    )


def _torch_dtype_name(dtype) -> str:
    if dtype is None:
        return "float32"
    return {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(np.dtype(dtype).name, "float32")


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
