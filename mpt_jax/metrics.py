"""Training metrics: FLOPs per token, MFU, and writers (JSON lines, TensorBoard, optional W&B).

FLOPs are computed from the config by formula (not by counting jax arrays) so the trainer can
report MFU before anything is compiled, and so the number matches what papers report: PaLM's
``6 N + 12 L H Q T`` convention (also llm-foundry's ``flops_per_batch``), with N the parameters
that take part in matmuls.

``MetricsWriter`` keeps ``workdir/metrics.jsonl`` as the durable record: one line per ``write``,
written with a single ``os.write`` on an ``O_APPEND`` descriptor, so a run killed with SIGKILL
leaves whole lines only, and a resumed run drops the lines it will redo with ``truncate_after``.
TensorBoard event files come from ``tensorboardX`` (no TensorFlow needed).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

from absl import logging

from mpt_jax.config import MPTConfig

# ------------------------------------------------------------------------------------------------
# FLOPs.


def matmul_params(cfg: MPTConfig) -> int:
    """Parameters that take part in matmuls: every kernel, plus the output head once.

    Per layer: Wqkv (``d * (H + 2 * KV) * Q``; MHA has KV = H, MQA KV = 1, GQA KV = kv_n_heads),
    out_proj (``H * Q * d``), up_proj and down_proj (``2 * d * F``) and, for mptglu, gate_proj
    (``d * F``). Plus the head ``d * V``: with tied embeddings the table is used once as a matmul
    (the input side is a lookup, no FLOPs); untied, ``lm_head`` is the matmul and ``wte`` is
    again only a lookup. Norms, biases and the learned position table are not matmuls.
    """
    d, q, h, kv, f = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.num_kv_heads, cfg.ffn_dim
    n_ffn_in = 2 if cfg.ffn_type == "mptglu" else 1
    per_layer = d * (h + 2 * kv) * q + h * q * d + n_ffn_in * d * f + f * d
    return cfg.n_layers * per_layer + d * cfg.vocab_size


def flops_per_token(cfg: MPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), matmuls only, PaLM-style.

        flops_per_token = 6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len

    ``6 * N_matmul``: each matmul weight costs 2 FLOPs (multiply + add) per token forward and 4
    backward (gradients for activations and for the weight); ``N_matmul`` is ``matmul_params``.
    ``12 * L * H * Q * T``: per layer and token, the scores ``q @ k^T`` and ``probs @ v`` each take
    ``2 * H * Q * T`` forward, times 3 for training. The causal mask is ignored: the full T x T
    square is counted, as in PaLM (appendix B) and llm-foundry, so MFU numbers compare with
    theirs (a causal kernel that skips the masked half does about half this attention work).
    The attention term uses the query heads, so MQA/GQA shrink only the Wqkv part of N_matmul.
    Softmax, norms, activations and the loss are not counted.
    """
    if seq_len < 1:
        raise ValueError(f"flops_per_token: seq_len={seq_len!r} must be a positive integer")
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return float(6 * matmul_params(cfg) + attention)


# ------------------------------------------------------------------------------------------------
# Peak FLOPs and MFU.

# Dense (no sparsity) bf16 peak per JAX device, from the vendors' datasheets. Keys are matched
# against ``device.device_kind`` as whole words, case-insensitively, longest key first, so
# "H100 PCIe" wins over "H100" and "TPU v5 lite" (v5e) over "TPU v5" (v5p's device_kind); "L4"
# does not match "L40S". TPU v2/v3 expose each TensorCore as a device, hence half a chip's peak.
PEAK_FLOPS: dict[str, float] = {
    # NVIDIA (device_kind looks like "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB").
    "H100": 989e12,  # SXM; 1979e12 is the sparse number
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,  # SXM and PCIe alike
    "L4": 121e12,
    "L40S": 362e12,
    # Google TPU (device_kind looks like "TPU v4", "TPU v5 lite", "TPU v6 lite").
    "TPU v2": 22.5e12,  # 45e12 per chip, two devices (cores) per chip
    "TPU v3": 61.5e12,  # 123e12 per chip, two devices (cores) per chip
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p reports device_kind "TPU v5"
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "Trillium": 918e12,
}


def _device_kind(device: Any) -> str:
    return device if isinstance(device, str) else str(getattr(device, "device_kind", ""))


def lookup_peak_flops(device_kind: str) -> float | None:
    """The PEAK_FLOPS entry whose key appears in ``device_kind`` as whole words (longest key wins)."""
    best: str | None = None
    for key in PEAK_FLOPS:
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", device_kind, flags=re.IGNORECASE):
            if best is None or len(key) > len(best):
                best = key
    return None if best is None else PEAK_FLOPS[best]


def peak_flops_per_device(device: Any = None, override: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (CPU, unlisted accelerators).

    ``override`` (``--config.train.peak_flops``) wins so users on unlisted hardware can still get
    MFU. ``device`` is a jax Device or a device_kind string; default ``jax.devices()[0]``.
    """
    if override is not None:
        if not override > 0:
            raise ValueError(f"peak_flops override={override!r} must be positive")
        return float(override)
    if device is None:
        import jax

        device = jax.devices()[0]
    if getattr(device, "platform", None) == "cpu":
        return None
    kind = _device_kind(device)
    peak = lookup_peak_flops(kind)
    if peak is None and kind and kind.lower() != "cpu":
        logging.warning("No peak FLOP/s known for device_kind %r; MFU needs --config.train.peak_flops.", kind)
    return peak


def mfu(tokens_per_second: float, flops_per_tok: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction: achieved FLOP/s over ``n_devices * peak``.

    ``tokens_per_second`` is the global throughput (all devices). None when the peak is unknown,
    so callers print nothing rather than a made-up number.
    """
    if peak is None or peak <= 0 or n_devices < 1:
        return None
    return tokens_per_second * flops_per_tok / (n_devices * peak)


# ------------------------------------------------------------------------------------------------
# Console line.

# (aliases, format) in display order; the format gets the metric's prefix ("", "eval/", "eval_"),
# its full key and its value.
_KNOWN: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("loss",), lambda p, k, v: f"{k} {v:.3f}"),
    (("ppl", "perplexity"), lambda p, k, v: f"{k} {v:.4g}"),
    (("lr", "learning_rate"), lambda p, k, v: f"{k} {v:.1e}"),
    (("grad_norm",), lambda p, k, v: f"{k} {v:.3g}"),
    (
        ("tokens_per_second", "tokens_per_sec", "tokens_per_s", "tok_per_s", "tok/s"),
        lambda p, k, v: f"{v:,.0f} {p}tok/s",
    ),
    (("mfu",), lambda p, k, v: f"{k} {100 * v:.1f}%"),
    (("step_time", "seconds_per_step", "sec_per_step", "s/step"), lambda p, k, v: f"{v:.3g} {p}s/step"),
)


def format_console(step: int, metrics: Mapping[str, float]) -> str:
    """One compact human line: "step 120 | loss 3.214 | ppl 24.9 | lr 1.2e-03 | 5,432 tok/s | ...".

    Known names (after any "prefix/" or "prefix_") get units and a fixed order, so lines line up across steps;
    ``mfu`` is a fraction shown as a percentage; other metrics follow in the given order as
    ``name value`` with 4 significant digits.
    """
    known: list[tuple[int, str]] = []
    rest: list[str] = []
    for key, value in metrics.items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            rest.append(f"{key} {value}")
            continue
        for rank, (aliases, fmt) in enumerate(_KNOWN):
            alias = next((a for a in aliases if key == a or key.endswith(("/" + a, "_" + a))), None)
            if alias is not None:
                prefix = key[: len(key) - len(alias)]
                known.append((rank, fmt(prefix, key, v) if math.isfinite(v) else f"{key} {v}"))
                break
        else:
            rest.append(f"{key} {v:.4g}")
    known.sort(key=lambda t: t[0])
    return " | ".join([f"step {step}"] + [text for _, text in known] + rest)


# ------------------------------------------------------------------------------------------------
# Writer.


class MetricsWriter:
    """Writes scalars to ``workdir/metrics.jsonl``, TensorBoard and (optionally) Weights & Biases.

    ``enabled=False`` (every process but 0 in a multi-host run) makes each method a no-op, so the
    trainer calls it unconditionally. ``workdir=None`` writes no files. ``console=True`` also logs
    ``format_console`` through absl for each write (off by default: the trainer prints its own
    line). ``wandb`` is a dict of ``wandb.init`` kwargs; if wandb is not installed, one warning and
    it is skipped. Also a context manager.
    """

    def __init__(
        self,
        workdir: str | None,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb: dict | None = None,
        console: bool = False,
    ) -> None:
        self.enabled = enabled
        self.workdir = os.fspath(workdir) if workdir is not None else None
        self.console = console
        self._fd: int | None = None
        self._tb: Any = None
        self._tb_wanted = bool(tensorboard) and self.workdir is not None
        self._tb_purge_step: int | None = None
        self._wandb_run: Any = None
        if not enabled:
            return
        if self.workdir is not None:
            os.makedirs(self.workdir, exist_ok=True)
            self.path: str | None = os.path.join(self.workdir, "metrics.jsonl")
            self._drop_partial_last_line()
            self._open()
        else:
            self.path = None
        if wandb is not None:
            self._init_wandb(dict(wandb))

    # -- files ---------------------------------------------------------------------------------

    def _open(self) -> None:
        assert self.path is not None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _drop_partial_last_line(self) -> None:
        """A line cut short (power loss, full disk) would glue onto the next one; cut it off."""
        assert self.path is not None
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                logging.warning("%s: dropping a partial last line (%d bytes)", self.path, len(data) - keep)
                f.truncate(keep)

    def _tensorboard(self) -> Any:
        """The tensorboardX writer, created on first use so a resume's purge step can go to it."""
        if self._tb is None and self._tb_wanted:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                logging.warning("tensorboardX is not installed; no TensorBoard event files (pip install tensorboardX)")
                self._tb_wanted = False
                return None
            assert self.workdir is not None
            self._tb = SummaryWriter(
                logdir=os.path.join(self.workdir, "tensorboard"), purge_step=self._tb_purge_step, flush_secs=30
            )
        return self._tb

    def _init_wandb(self, kwargs: dict) -> None:
        try:
            import wandb
        except ImportError:
            logging.warning("wandb is not installed; skipping Weights & Biases logging (pip install wandb)")
            return
        if self.workdir is not None:
            kwargs.setdefault("dir", self.workdir)
        self._wandb_run = wandb.init(**kwargs)

    # -- API -----------------------------------------------------------------------------------

    def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = "") -> None:
        """Records ``{prefix + key: float(value)}`` at ``step`` everywhere, one jsonl line per call.

        The jsonl line is on disk (in the OS) when this returns; non-finite values are written as
        Python's json writes them (NaN, Infinity), so a diverged loss stays visible.
        """
        if not self.enabled:
            return
        values = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
        step = int(step)
        if self._fd is not None:
            data = (json.dumps({"step": step, **values}) + "\n").encode("utf-8")
            while data:  # one write for any sane line length; loop only on a short write
                data = data[os.write(self._fd, data) :]
        tb = self._tensorboard()
        if tb is not None:
            for key, value in values.items():
                tb.add_scalar(key, value, global_step=step)
            tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)
        if self.console:
            logging.info("%s", format_console(step, values))

    def truncate_after(self, step: int) -> int:
        """Keeps only jsonl lines with ``"step" <= step`` (atomically), for a resume from ``step``;
        returns how many lines were dropped.

        Every record counts, eval ones (``eval_*`` keys) too; lines that do not parse are dropped.
        TensorBoard is told to hide the old events of steps > ``step`` (tensorboardX's purge_step);
        W&B cannot rewind and drops the repeats.
        """
        if not self.enabled:
            return 0
        step = int(step)
        if self._tb is not None:  # a new event file, starting with the purge marker
            self._tb.close()
            self._tb = None
        self._tb_purge_step = step + 1
        if self.path is None:
            return 0
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        kept = []
        total = 0
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    total += 1
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        fd, tmp = tempfile.mkstemp(prefix=".metrics.jsonl.", suffix=".tmp", dir=os.path.dirname(self.path))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        self._open()
        return total - len(kept)

    def close(self) -> None:
        """Flushes and closes everything; safe to call twice."""
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._tb_wanted = False
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
