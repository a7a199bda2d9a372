"""FLOPs formula, MFU, peak lookup, the metrics writer (jsonl, TensorBoard) and the console line."""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import sys
import types

import jax
import pytest

from mpt_jax import metrics
from mpt_jax.config import MPTConfig


def tiny(**changes) -> MPTConfig:
    base = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=32)
    return MPTConfig(**{**base, **changes}).validate()


# ------------------------------------------------------------------------------------------------
# FLOPs.


def test_flops_per_token_mpt_7b_by_hand():
    cfg = MPTConfig(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432).validate()
    d, L, V, T, F = 4096, 32, 50432, 2048, 4 * 4096
    wqkv = d * 3 * d  # 50_331_648
    out_proj = d * d  # 16_777_216
    ffn = 2 * d * F  # 134_217_728
    per_layer = wqkv + out_proj + ffn  # 201_326_592 = 12 d^2
    assert per_layer == 201_326_592
    head = d * V  # 206_569_472 (tied: the table counts once, as the head)
    n_matmul = L * per_layer + head
    assert n_matmul == 6_649_020_416  # MPT-7B's 6.65B parameters, less its norm scales
    attention = 12 * L * d * T  # 12 * n_layers * (n_heads * head_dim) * seq_len
    assert attention == 3_221_225_472
    expected = 6 * n_matmul + attention
    assert expected == 43_115_347_968
    assert metrics.matmul_params(cfg) == n_matmul
    assert metrics.flops_per_token(cfg, 2048) == pytest.approx(4.3115347968e10, rel=0, abs=0.5)
    # Untied: lm_head is the matmul, wte only a lookup; same count.
    assert metrics.flops_per_token(cfg.replace(tie_word_embeddings=False), 2048) == expected


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"attn_type": "multiquery_attention"},
        {"attn_type": "grouped_query_attention", "kv_n_heads": 2},
        {"ffn_type": "mptglu", "ffn_act_fn": "silu"},
        {"tie_word_embeddings": False, "no_bias": False, "alibi": False, "learned_pos_emb": True},
        {"ffn_hidden_size": 96, "qk_ln": True},
    ],
)
def test_matmul_params_match_the_model(changes):
    """N_matmul equals the model's kernels plus the head, read from its abstract params."""
    import flax.linen as nn

    from mpt_jax.model import param_shapes

    cfg = tiny(**changes)
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(param_shapes(cfg)))[0]:
        names = [str(getattr(p, "key", p)) for p in path]
        size = math.prod(leaf.shape)
        if names[-1] == "kernel" or (cfg.tie_word_embeddings and names[:2] == ["wte", "embedding"]):
            total += size
    assert metrics.matmul_params(cfg) == total


def test_mqa_gqa_reduce_only_the_kv_projection():
    cfg = MPTConfig(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432).validate()
    mha = metrics.flops_per_token(cfg, 2048)
    gqa = metrics.flops_per_token(cfg.replace(attn_type="grouped_query_attention", kv_n_heads=8), 2048)
    mqa = metrics.flops_per_token(cfg.replace(attn_type="multiquery_attention"), 2048)
    assert mqa < gqa < mha
    # K and V projections shrink from 32 heads to 8 (or 1); the attention term uses query heads.
    assert mha - gqa == 6 * 32 * 4096 * 2 * (32 - 8) * 128
    assert mha - mqa == 6 * 32 * 4096 * 2 * (32 - 1) * 128


def test_glu_adds_the_gate_and_attention_grows_with_length():
    cfg = tiny()
    glu = cfg.replace(ffn_type="mptglu")
    assert metrics.flops_per_token(glu, 32) - metrics.flops_per_token(cfg, 32) == 6 * 2 * 64 * 256
    # Full T x T square: 12 * L * d per extra token of context.
    assert metrics.flops_per_token(cfg, 64) - metrics.flops_per_token(cfg, 32) == 12 * 2 * 64 * 32
    with pytest.raises(ValueError, match="seq_len"):
        metrics.flops_per_token(cfg, 0)


# ------------------------------------------------------------------------------------------------
# Peak FLOPs and MFU.


def test_mfu_arithmetic():
    # 10,000 tok/s * 4e10 FLOPs/tok = 4e14 FLOP/s over 2 devices of 1e15 peak = 20%.
    assert metrics.mfu(10_000, 4e10, 2, 1e15) == pytest.approx(0.2)
    assert metrics.mfu(10_000, 4e10, 2, None) is None


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA Mystery 9000", None),
    ],
)
def test_peak_lookup_by_device_kind(kind, peak):
    fake = types.SimpleNamespace(device_kind=kind, platform="gpu")
    assert metrics.peak_flops_per_device(fake) == peak
    assert metrics.peak_flops_per_device(kind) == peak


def test_peak_override_and_cpu():
    fake = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
    assert metrics.peak_flops_per_device(fake, override=5e14) == 5e14
    assert metrics.peak_flops_per_device(override=1e12) == 1e12
    assert metrics.peak_flops_per_device() is None  # the tests run on CPU
    with pytest.raises(ValueError, match="peak_flops"):
        metrics.peak_flops_per_device(fake, override=0.0)


# ------------------------------------------------------------------------------------------------
# Writer.


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_tfrecords(path: str) -> list[bytes]:
    """TFRecord framing: u64 length, u32 masked crc(length), data, u32 masked crc(data)."""
    from tensorboardX.record_writer import masked_crc32c

    out = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            assert struct.unpack("<I", header[8:])[0] == masked_crc32c(header[:8])
            data = f.read(length)
            assert struct.unpack("<I", f.read(4))[0] == masked_crc32c(data)
            out.append(data)
    return out


def tensorboard_scalars(workdir: str) -> list[tuple[str, int, float]]:
    from tensorboardX.proto import event_pb2

    files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert len(files) == 1, files
    scalars = []
    for record in read_tfrecords(files[0]):
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
            scalars.append((value.tag, event.step, value.simple_value))
    return scalars


def test_writer_jsonl_flushed_per_write(tmp_path):
    workdir = str(tmp_path / "run")
    writer = metrics.MetricsWriter(workdir, tensorboard=False)
    writer.write(1, {"loss": 3.5, "lr": 1e-3})
    writer.write(2, {"loss": 3.25})
    writer.write(2, {"loss": 3.0}, prefix="eval/")
    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))  # before close
    assert lines == [
        {"step": 1, "loss": 3.5, "lr": 1e-3},
        {"step": 2, "loss": 3.25},
        {"step": 2, "eval/loss": 3.0},
    ]
    writer.close()
    writer.close()  # idempotent


def test_writer_truncate_after_keeps_steps_up_to_k(tmp_path):
    workdir = str(tmp_path)
    with metrics.MetricsWriter(workdir, tensorboard=False) as writer:
        for step in range(1, 11):
            writer.write(step, {"loss": 10.0 - step})
    # A run killed mid-line left a partial tail; reopening drops it, then the resume truncates.
    with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"step": 11, "lo')
    with metrics.MetricsWriter(workdir, tensorboard=False) as writer:
        writer.truncate_after(6)
        assert [r["step"] for r in read_jsonl(writer.path)] == [1, 2, 3, 4, 5, 6]
        writer.write(7, {"loss": 0.5})  # appends to the rewritten file
    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6, 7]
    assert lines[-1]["loss"] == 0.5
    assert not [n for n in os.listdir(workdir) if n.endswith(".tmp")]


def test_writer_tensorboard_holds_the_scalars(tmp_path):
    workdir = str(tmp_path)
    with metrics.MetricsWriter(workdir) as writer:
        writer.write(10, {"loss": 2.5, "mfu": 0.25})
        writer.write(20, {"loss": 2.0})
        writer.write(20, {"loss": 2.25}, prefix="eval/")
    scalars = tensorboard_scalars(workdir)
    assert scalars == [("loss", 10, 2.5), ("mfu", 10, 0.25), ("loss", 20, 2.0), ("eval/loss", 20, 2.25)]


def test_writer_disabled_and_console_only(tmp_path, monkeypatch):
    workdir = tmp_path / "rank1"
    writer = metrics.MetricsWriter(str(workdir), enabled=False, wandb={"project": "x"})
    writer.write(1, {"loss": 1.0})
    writer.truncate_after(0)
    writer.close()
    assert not workdir.exists()

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError: warn, skip
    writer = metrics.MetricsWriter(None, wandb={"project": "x"}, console=True)
    writer.write(1, {"loss": 1.0})
    writer.truncate_after(0)
    writer.close()


class _FakeWandbRun:
    def __init__(self, calls: list):
        self.calls = calls

    def log(self, values, step=None):
        self.calls.append(("log", dict(values), step))

    def finish(self):
        self.calls.append(("finish",))


def _fake_wandb(monkeypatch) -> list:
    """A stand-in ``wandb`` module that records init/log/finish (the real one needs an account)."""
    calls: list = []
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _FakeWandbRun(calls)

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_writer_sends_every_write_to_wandb(tmp_path, monkeypatch):
    calls = _fake_wandb(monkeypatch)
    workdir = str(tmp_path / "run")
    with metrics.MetricsWriter(workdir, tensorboard=False, wandb={"project": "mpt", "name": "tiny"}) as writer:
        assert calls == [("init", {"project": "mpt", "name": "tiny", "dir": workdir})]
        writer.write(10, {"loss": 2.5, "mfu": 0.25})
        writer.write(10, {"loss": 2.75}, prefix="eval_")
    assert calls[1:] == [
        ("log", {"loss": 2.5, "mfu": 0.25}, 10),
        ("log", {"eval_loss": 2.75}, 10),
        ("finish",),
    ]
    # An explicit dir wins; a writer that is not the main process's never starts a run.
    calls.clear()
    metrics.MetricsWriter(workdir, tensorboard=False, wandb={"project": "mpt", "dir": "/elsewhere"}).close()
    assert calls == [("init", {"project": "mpt", "dir": "/elsewhere"}), ("finish",)]
    calls.clear()
    writer = metrics.MetricsWriter(workdir, enabled=False, wandb={"project": "mpt"})
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert calls == []


def test_format_console_contains_the_numbers():
    line = metrics.format_console(
        120,
        {"loss": 3.2141, "ppl": 24.9, "lr": 1.2e-3, "tokens_per_second": 5432.1, "mfu": 0.312, "step_time": 0.38},
    )
    assert line == "step 120 | loss 3.214 | ppl 24.9 | lr 1.2e-03 | 5,432 tok/s | mfu 31.2% | 0.38 s/step"
    line = metrics.format_console(7, {"grad_norm": 0.75, "eval/loss": float("nan"), "tokens": 1024})
    assert line == "step 7 | eval/loss nan | grad_norm 0.75 | tokens 1024"
    # The trainer's names: tokens_per_s, and eval metrics written with prefix "eval_".
    line = metrics.format_console(9, {"loss_tokens": 4096.0, "tokens_per_s": 1234.0, "eval_loss": 2.5})
    assert line == "step 9 | eval_loss 2.500 | 1,234 tok/s | loss_tokens 4096"


def test_truncate_after_tells_tensorboard_to_purge_redone_steps(tmp_path):
    """TensorBoard hides older events at steps >= a SessionLog START's step; a resume at k writes k + 1."""
    from tensorboardX.proto import event_pb2

    with metrics.MetricsWriter(str(tmp_path)) as writer:
        writer.truncate_after(5)
        writer.write(6, {"loss": 1.0})
    (path,) = glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))
    events = [event_pb2.Event.FromString(r) for r in read_tfrecords(path)]
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [6]
    assert tensorboard_scalars(str(tmp_path)) == [("loss", 6, 1.0)]
