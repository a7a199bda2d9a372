"""The sections of a run config, with their defaults, and the checks made once at start-up.

A config file (``configs/<name>.py``) starts from ``base_config()`` and sets what differs:

    config.model      MPTConfig fields (model.py)
    config.data       the input pipeline (data/pipeline.py)
    config.optimizer  name, lr, b1, b2, eps, weight_decay, grad_clip_norm, mu_dtype (optim.py)
    config.schedule   name, t_warmup, alpha_f
    config.train      max_steps, global_batch_size, micro_batch_size, grad_dtype, seq_len, seed,
                      log_every, eval_every, eval_batches, peak_flops, progress
    config.checkpoint every_steps, keep
    config.mesh       data, fsdp, tensor (-1: all remaining devices); dcn_* (how many of each axis
                      span slices/hosts over the data-center network); rules (logical -> mesh axes)
    config.evals      icl_tasks (a task config, configs/eval/*.py or an LLM Foundry yaml; "" = none),
                      icl_batch_size, icl_limit: ICL tasks run at every eval (train.eval_every)
    config.init_from  an mpt-jax model checkpoint or HF folder to start from ("" = random init)
    config.wandb      W&B project (None = off)
"""

from __future__ import annotations

import ml_collections

from mpt_jax import optim
from mpt_jax.config import GRAD_DTYPES, MPTConfig
from mpt_jax.data import pipeline


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = MPTConfig().to_config_dict()
    c.data = pipeline.default_config()
    c.optimizer = optim.optimizer_config()
    c.schedule = optim.schedule_config()
    c.train = ml_collections.ConfigDict(
        dict(
            max_steps=1000,
            global_batch_size=8,
            micro_batch_size=0,  # 0: no accumulation (micro = global batch per process)
            grad_dtype="float32",  # bfloat16: gradients and their sum in bfloat16 (FSDP's PURE)
            seq_len=0,  # 0: model.max_seq_len
            seed=17,
            log_every=10,
            eval_every=100,  # 0: no eval
            eval_batches=4,
            peak_flops=0.0,  # per-device peak FLOP/s for MFU; 0: look up the device kind
            progress=True,
        )
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3))
    c.mesh = ml_collections.ConfigDict(
        dict(
            data=-1,
            fsdp=1,
            tensor=1,
            dcn_data=1,
            dcn_fsdp=1,
            dcn_tensor=1,
            rules=ml_collections.config_dict.placeholder(list),
        )
    )
    c.evals = ml_collections.ConfigDict(dict(icl_tasks="", icl_batch_size=8, icl_limit=0))
    c.init_from = ""
    c.wandb = ml_collections.ConfigDict(dict(project=ml_collections.config_dict.placeholder(str), name=""))
    return c


def model_config(config: ml_collections.ConfigDict) -> MPTConfig:
    """The MPTConfig of a run config's ``model`` section (unknown fields are errors)."""
    return MPTConfig.from_dict(config.model.to_dict(), source="config.model")


def seq_len(config: ml_collections.ConfigDict) -> int:
    return int(config.train.seq_len or config.model.max_seq_len)


def grad_dtype_of(config: ml_collections.ConfigDict) -> str:
    """``config.train.grad_dtype``; float32 for a config written before the key existed."""
    return str(config.train.get("grad_dtype", "float32"))


def mesh_shape(config: ml_collections.ConfigDict, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with a -1 filled from the device count; errors name the numbers."""
    sizes = [int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor)]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {sizes}")
    known = 1
    for s in sizes:
        if s != -1:
            if s < 1:
                raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {sizes}")
            known *= s
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"config.mesh {sizes}: {n_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    dcn = [int(config.mesh.get(f"dcn_{a}", 1)) for a in ("data", "fsdp", "tensor")]
    for axis, size, d in zip(("data", "fsdp", "tensor"), sizes, dcn, strict=True):
        if d < 1 or (size > 0 and size % d):
            raise ValueError(f"config.mesh.dcn_{axis}={d} must divide config.mesh.{axis}={size}")
    if sizes[0] * sizes[1] * sizes[2] != n_devices:
        raise ValueError(
            f"config.mesh (data, fsdp, tensor) = {tuple(sizes)} multiplies to {sizes[0] * sizes[1] * sizes[2]}, not the {n_devices} devices"
        )
    return tuple(sizes)


def problems(config: ml_collections.ConfigDict, n_devices: int, process_count: int = 1) -> list[str]:
    """Every reason ``config`` cannot run on ``n_devices`` devices in ``process_count`` processes
    (empty if it can). An invalid model section raises; a mesh that does not fit the devices is the
    only problem reported, since the other checks need its shape. The planner asks this of every mesh."""
    cfg = model_config(config)
    t = config.train
    try:
        data, fsdp, tensor = mesh_shape(config, n_devices)
    except ValueError as e:
        return [str(e)]
    out = []
    if t.max_steps < 1:
        out.append(f"config.train.max_steps={t.max_steps}: must be positive")
    out += _batch_problems(t, data, fsdp, process_count)
    if (grad_dtype := grad_dtype_of(config)) not in GRAD_DTYPES:
        out.append(f"config.train.grad_dtype={grad_dtype!r}: expected one of {', '.join(GRAD_DTYPES)}")
    if cfg.n_heads % tensor:
        out.append(f"config.model.n_heads={cfg.n_heads} is not divisible by config.mesh.tensor={tensor}")
    if cfg.ffn_dim % tensor:
        out.append(f"config.model ffn hidden size {cfg.ffn_dim} is not divisible by config.mesh.tensor={tensor}")
    length = seq_len(config)
    if length < 2:
        out.append(f"config.train.seq_len={length}: must be at least 2")
    if cfg.uses_learned_pos_emb and length > cfg.max_seq_len:
        out.append(f"config.train.seq_len={length} exceeds model.max_seq_len={cfg.max_seq_len} (learned positions)")
    for key in ("log_every", "eval_every", "eval_batches"):
        if t[key] < 0:
            out.append(f"config.train.{key}={t[key]}: must be >= 0")
    if t.eval_every > 0 and t.eval_batches == 0:
        out.append(
            f"config.train.eval_every={t.eval_every} with config.train.eval_batches=0: an eval of no batches; "
            "set eval_batches > 0, or eval_every=0 for no eval"
        )
    out += _evals_problems(config, process_count)
    if config.checkpoint.every_steps < 0:
        out.append(f"config.checkpoint.every_steps={config.checkpoint.every_steps}: must be >= 0")
    if t.max_steps >= 1:
        try:  # the optimizer and schedule sections, with errors naming their config keys
            optim.make_optimizer(config.optimizer, config.schedule, max_steps=t.max_steps)
        except ValueError as e:
            out.append(str(e))
    return out


def _evals_problems(config: ml_collections.ConfigDict, process_count: int) -> list[str]:
    """The ``evals`` section: its task file must read (every task file and prompt is checked again
    when the tasks are built, before step 1), evals need eval_every, one process for now."""
    e = config.get("evals")
    if e is None or not e.icl_tasks:
        return []
    out = []
    if config.train.eval_every <= 0:
        out.append(f"config.evals.icl_tasks={e.icl_tasks!r} runs at each eval, but config.train.eval_every=0")
    if process_count > 1:
        out.append("config.evals.icl_tasks: ICL tasks during training run in single-process runs only")
    if e.icl_batch_size < 1 or e.icl_limit < 0:
        out.append(f"config.evals: icl_batch_size={e.icl_batch_size} must be >= 1, icl_limit={e.icl_limit} >= 0")
    try:
        from mpt_jax.eval.icl import tasks_from_file

        tasks_from_file(e.icl_tasks)
    except (ValueError, OSError) as err:
        out.append(f"config.evals.icl_tasks: {err}")
    return out


def _batch_problems(t: ml_collections.ConfigDict, data: int, fsdp: int, process_count: int) -> list[str]:
    """The global and micro batch sizes against each other, the data x fsdp axes and the processes."""
    if t.global_batch_size <= 0:
        return [f"config.train.global_batch_size={t.global_batch_size}: must be positive"]
    if t.micro_batch_size < 0:
        return [f"config.train.micro_batch_size={t.micro_batch_size}: must be >= 0 (0: no accumulation)"]
    out = []
    if t.global_batch_size % (data * fsdp):
        out.append(
            f"config.train.global_batch_size={t.global_batch_size} is not divisible by the data x fsdp mesh axes ({data} x {fsdp})"
        )
    if t.global_batch_size % process_count:
        out.append(
            f"config.train.global_batch_size={t.global_batch_size} is not divisible by the {process_count} processes"
        )
    micro = t.micro_batch_size or t.global_batch_size
    if t.global_batch_size % micro:
        out.append(
            f"config.train.micro_batch_size={micro} does not divide config.train.global_batch_size={t.global_batch_size}"
        )
    elif (micro % (data * fsdp)) and micro != t.global_batch_size:
        out.append(
            f"config.train.micro_batch_size={micro} is not divisible by the data x fsdp mesh axes ({data} x {fsdp})"
        )
    return out


def check(config: ml_collections.ConfigDict, n_devices: int, process_count: int = 1) -> None:
    """Checks made before anything compiles: raises ValueError with the first of ``problems``."""
    found = problems(config, n_devices, process_count)
    if found:
        raise ValueError(found[0])


def pretraining_recipe(
    config: ml_collections.ConfigDict, *, lr: float, global_batch_size: int, max_steps: int, fsdp: bool
) -> ml_collections.ConfigDict:
    """llm-foundry's pretraining yamls, shared by every size (only lr, batch and steps differ):
    decoupled AdamW, betas (0.9, 0.95), no weight decay, cosine to 0.1x after 100 warmup steps,
    clipping 1.0, context 2048, C4 (unless a data mixture is set) tokenized with EleutherAI/gpt-neox-20b;
    FULL_SHARD FSDP
    (``fsdp=True``) puts every device on the fsdp axis."""
    if not config.data.get("mixture"):
        config.data.source = "tfds:c4/en"
    config.data.tokenizer = "EleutherAI/gpt-neox-20b"
    config.train.max_steps = max_steps
    config.train.global_batch_size = global_batch_size
    config.train.seq_len = 2048
    config.train.eval_every = 1000
    config.optimizer.lr = lr
    config.schedule.t_warmup = 100
    config.schedule.alpha_f = 0.1
    config.checkpoint.every_steps = 1000
    if fsdp:
        config.mesh.data = 1
        config.mesh.fsdp = -1
    return config


def one_node_pure_bf16(config: ml_collections.ConfigDict, micro_batch_size: int) -> ml_collections.ConfigDict:
    """llm-foundry's one-node setting (FSDP FULL_SHARD, PURE bfloat16, activation checkpointing)
    in our terms: ``micro_batch_size`` rows per accumulation step, the gradients and their sum in
    bfloat16 (float32 masters), AdamW's first moment stored in bfloat16 (docs/training.md)."""
    config.train.micro_batch_size = micro_batch_size
    config.train.grad_dtype = "bfloat16"
    config.optimizer.mu_dtype = "bfloat16"
    return config


def finetuning_recipe(
    config: ml_collections.ConfigDict,
    *,
    init_from: str,
    source: str,
    lr: float,
    global_batch_size: int,
    max_steps: int,
    seq_len: int,
    b2: float = 0.95,
) -> ml_collections.ConfigDict:
    """llm-foundry's finetuning yamls: from a converted checkpoint, examples packed first-fit, decoupled
    AdamW without weight decay, linear decay to 0 after 50 warmup steps, gpt-neox-20b tokens, FSDP.
    The example format (instruction or chat) is the config's own. Packed examples attend only
    within themselves (``attn_uses_sequence_id``, llm-foundry's switch for packed finetuning), so
    each example's loss is its loss alone. Eval is off; ``--config.train.eval_every=N`` evaluates on
    the source's held-out documents (``data.holdout_fraction``) or on ``data.eval_source``."""
    config.init_from = init_from
    config.model.attn_uses_sequence_id = True
    config.data.source = source
    config.data.tokenizer = "EleutherAI/gpt-neox-20b"
    config.data.packing = "first_fit"
    config.train.max_steps = max_steps
    config.train.global_batch_size = global_batch_size
    config.train.seq_len = seq_len
    config.train.eval_every = 0
    config.optimizer.lr = lr
    config.optimizer.b2 = b2
    config.schedule.name = "linear_decay_with_warmup"
    config.schedule.t_warmup = 50
    config.schedule.alpha_f = 0.0
    config.checkpoint.every_steps = 500
    config.mesh.data = 1
    config.mesh.fsdp = -1
    return config
