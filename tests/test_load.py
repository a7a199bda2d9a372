"""mpt_jax.load and tokenizers that travel with checkpoints: every source kind loads the same params and a tokenizer
that encodes the same; dtype, max_seq_len and int8 at load time; a chat run's workdir carries ChatML; mesh placement
on 8 simulated devices; the tokenizer folder transformers reads."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from workdir_utils import make_workdir

import mpt_jax
from mpt_jax import MPT, MPTConfig, checkpoint
from mpt_jax import convert as convert_cli
from mpt_jax.data.tokenizer import IM_END, IM_START, Tokenizer, load_tokenizer, train_bpe
from mpt_jax.hf import save_hf
from mpt_jax.model import flat_params
from mpt_jax.prompts import CHATML_TEMPLATE, prompt_format, render_chat
from mpt_jax.run_config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=320)
TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n"] * 20
SAMPLE = "def add(a, b):\n    return os.getcwd()\n"


def init_params(cfg: MPTConfig, seed: int) -> dict:
    boxed = MPT(cfg).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    return jax.tree.map(np.asarray, nn.meta.unbox(boxed))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(TEXTS, 300, name="test-bpe")


@pytest.fixture(scope="module")
def params() -> dict:
    return init_params(CFG, 3)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tok, params) -> str:
    folder = str(tmp_path_factory.mktemp("hf") / "model")
    save_hf(CFG, params, folder, tokenizer=tok)
    return folder


def assert_params_equal(got, want) -> None:
    got, want = dict(flat_params(got)), dict(flat_params(want))
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        assert isinstance(got[path], jax.Array), path  # on a device, ready to run
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=".".join(path))


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer folder


def test_save_pretrained_is_what_transformers_reads(tmp_path, tok):
    from transformers import AutoTokenizer

    chat = Tokenizer(
        tok.with_chatml().tk,
        name="t",
        special_tokens={"bos_token": "<|endoftext|>", "pad_token": "<|padding|>"},
        chat_template=CHATML_TEMPLATE,
        model_max_length=16,
    )
    paths = chat.save_pretrained(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == ["tokenizer.json", "tokenizer_config.json"]
    assert [os.path.basename(p) for p in paths] == ["tokenizer.json", "tokenizer_config.json"]
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert type(hf).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (chat.eos_id, chat.bos_id, chat.pad_id) == (0, 0, 1)
    assert hf.model_max_length == 16 and hf.chat_template == CHATML_TEMPLATE
    text = render_chat([{"role": "user", "content": SAMPLE}], prompt_format(chat), chat)
    assert hf(text)["input_ids"] == chat.encode(text)
    assert chat.token_to_id(IM_START) in chat.encode(text)
    # Read back: the same tokenizer, and pickles (grain workers) keep all of it.
    back = load_tokenizer(str(tmp_path / "tok"))
    for t in (back, pickle.loads(pickle.dumps(chat))):
        assert t.special_tokens == chat.special_tokens and t.chat_template == CHATML_TEMPLATE
        assert t.model_max_length == 16 and t.encode(text) == chat.encode(text)
    # Never over a user's files unless asked.
    with pytest.raises(FileExistsError, match="tokenizer.json"):
        chat.save_pretrained(tmp_path / "tok")
    tok.save_pretrained(tmp_path / "tok", overwrite=True)
    assert load_tokenizer(str(tmp_path / "tok")).chat_template is None
    assert not [n for n in os.listdir(tmp_path / "tok") if ".tmp-" in n]


def test_a_bare_tokenizer_json_gets_mpts_special_tokens(tmp_path, tok):
    tok.save(str(tmp_path / "tokenizer.json"))
    bare = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert bare.special_tokens == {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    assert (bare.eos_id, bare.bos_id, bare.pad_id, bare.chat_template) == (0, 0, None, None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|nope|>"}}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: tokenizer .*: no end-of-text token '<\|nope\|>'"):
        load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------------
# Every source kind


def test_hf_folder_loads_params_and_tokenizer(hf_folder, tok, params):
    cfg, got, tokenizer = mpt_jax.load(hf_folder)
    assert cfg == CFG
    assert_params_equal(got, params)
    assert tokenizer.encode(SAMPLE) == tok.encode(SAMPLE) and tokenizer.eos_id == tok.eos_id


def test_model_checkpoint_from_convert_loads_params_and_tokenizer(tmp_path, hf_folder, tok, params):
    dst = str(tmp_path / "jax")
    assert convert_cli.main(["hf_to_jax", hf_folder, dst]) == 0
    assert sorted(os.listdir(os.path.join(dst, "tokenizer"))) == ["tokenizer.json", "tokenizer_config.json"]
    cfg, got, tokenizer = mpt_jax.load(dst)
    assert cfg == CFG
    assert_params_equal(got, params)
    assert tokenizer.encode(SAMPLE) == tok.encode(SAMPLE)


def test_scan_layers_false_loads_the_per_layer_layout(tmp_path, hf_folder, params):
    """``scan_layers=False`` gives ``unstack_layers`` of the stacked params, from an HF folder and
    from a model checkpoint, int8 included (its scales go with their layer)."""
    from mpt_jax.model import unstack_layers

    dst = str(tmp_path / "jax")
    assert convert_cli.main(["hf_to_jax", hf_folder, dst]) == 0
    for path in (hf_folder, dst):
        _, got, _ = mpt_jax.load(path, scan_layers=False)
        assert "blocks" not in got and f"blocks_{CFG.n_layers - 1}" in got
        assert_params_equal(got, unstack_layers(params, CFG.n_layers))
    _, q, _ = mpt_jax.load(dst, quantize="int8", scan_layers=False)
    _, q_stacked, _ = mpt_jax.load(dst, quantize="int8")
    assert_params_equal(q, unstack_layers(q_stacked, CFG.n_layers))


def test_save_model_writes_the_tokenizer_inside_the_checkpoint(tmp_path, tok, params):
    checkpoint.save_model(tmp_path / "m", CFG, params, tokenizer=tok.with_chatml())
    _, _, tokenizer = mpt_jax.load(str(tmp_path / "m"))
    assert tokenizer.chat_template == CHATML_TEMPLATE and tokenizer.token_to_id(IM_END) is not None
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        checkpoint.save_model(tmp_path / "m2", CFG, params, tokenizer=str(tmp_path))
    assert not os.path.exists(tmp_path / "m2")


def test_workdir_loads_newest_or_step_with_its_tokenizer(tmp_path, tok):
    tokenizer_file = str(tmp_path / "tokenizer.json")
    tok.save(tokenizer_file)
    saved = make_workdir(tmp_path / "run", CFG, tokenizer_file, with_tokenizer=tok.with_chatml())
    cfg, got, tokenizer = mpt_jax.load(str(tmp_path / "run"))
    assert cfg == CFG
    assert_params_equal(got, saved[2])
    assert tokenizer.encode(SAMPLE) == tok.encode(SAMPLE) and tokenizer.chat_template == CHATML_TEMPLATE
    _, got, _ = mpt_jax.load(str(tmp_path / "run"), step=1)
    assert_params_equal(got, saved[1])
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 3; its steps are \[1, 2\]"):
        mpt_jax.load(str(tmp_path / "run"), step=3)


def test_an_older_workdir_falls_back_to_its_data_config_or_none(tmp_path, tok, caplog):
    tokenizer_file = str(tmp_path / "tokenizer.json")
    tok.save(tokenizer_file)
    make_workdir(tmp_path / "run", CFG, tokenizer_file, at=(1,))
    _, _, tokenizer = mpt_jax.load(str(tmp_path / "run"))
    assert tokenizer.encode(SAMPLE) == tok.encode(SAMPLE) and tokenizer.chat_template is None
    os.remove(tokenizer_file)
    _, got, tokenizer = mpt_jax.load(str(tmp_path / "run"))
    assert tokenizer is None and got
    assert any("no tokenizer" in r.getMessage() and tokenizer_file in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------------------
# Options


def test_dtype_casts_params_and_sets_the_compute_dtype(tmp_path, hf_folder, params):
    cfg, got, _ = mpt_jax.load(hf_folder, dtype="bfloat16")
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(got["wte"]["embedding"]), params["wte"]["embedding"].astype(jnp.bfloat16))
    # Default: as stored, and the compute follows the stored weights.
    save_hf(CFG, params, tmp_path / "bf16", dtype="bfloat16")
    cfg, got, tokenizer = mpt_jax.load(str(tmp_path / "bf16"))
    assert cfg.dtype == "bfloat16" and {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(jnp.bfloat16)}
    assert tokenizer is None  # saved without one: not an error
    cfg, got, _ = mpt_jax.load(str(tmp_path / "bf16"), dtype="float32")
    assert cfg.dtype == "float32" and {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(jnp.float32)}


def test_max_seq_len_override_runs_alibi_past_its_training_length(hf_folder):
    cfg, got, _ = mpt_jax.load(hf_folder, max_seq_len=48)
    assert cfg.max_seq_len == 48 and cfg.alibi
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (1, 40)), jnp.int32)
    long = MPT(cfg).apply({"params": got}, tokens)
    short = MPT(CFG).apply({"params": got}, tokens[:, :16])
    np.testing.assert_allclose(np.asarray(long[:, :16]), np.asarray(short), atol=1e-5, rtol=0)  # causal prefix
    assert np.isfinite(np.asarray(long)).all()


@pytest.mark.parametrize(
    ("position", "error"),
    [
        (dict(learned_pos_emb=True), r"learned position embeddings cannot run past max_seq_len=16"),
        (dict(rope=True, rope_impl="hf", rope_hf_type="dynamic", rope_hf_factor=2.0), "dynamic-NTK RoPE"),
        (dict(rope=True), None),
        (dict(rope=True, rope_impl="hf", rope_hf_type="linear", rope_hf_factor=2.0), None),
    ],
)
def test_max_seq_len_override_by_position_kind(tmp_path, monkeypatch, position, error):
    cfg = MPTConfig(**{**CFG.to_dict(), "alibi": False, **position})
    checkpoint.save_model(tmp_path / "m", cfg, init_params(cfg, 0))
    if error is None:
        assert mpt_jax.load(str(tmp_path / "m"), max_seq_len=64)[0].max_seq_len == 64
        return

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights read before the max_seq_len check")

    monkeypatch.setattr(checkpoint, "load_model", must_not_load)
    with pytest.raises(ValueError, match=error):
        mpt_jax.load(str(tmp_path / "m"), max_seq_len=64)
    assert mpt_jax.load  # the same length is no override: allowed
    monkeypatch.undo()
    assert mpt_jax.load(str(tmp_path / "m"), max_seq_len=16)[0] == cfg


def test_int8_is_quantize_params_of_the_loaded_weights(hf_folder):
    from mpt_jax.quantize import quantize_params

    cfg, float_params, _ = mpt_jax.load(hf_folder)
    qcfg, got, _ = mpt_jax.load(hf_folder, quantize="int8")
    want = quantize_params(cfg, float_params)
    assert qcfg == cfg
    assert sorted(p for p, _ in flat_params(got)) == sorted(p for p, _ in flat_params(want))
    for (path, x), (_, y) in zip(sorted(flat_params(got)), sorted(flat_params(want)), strict=True):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(x.dtype == jnp.int8 for x in jax.tree.leaves(got))


def test_bad_arguments_and_missing_paths_are_named(tmp_path, hf_folder):
    with pytest.raises(FileNotFoundError, match="no such folder: .*nothing"):
        mpt_jax.load(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="no such folder: ./not/here"):
        mpt_jax.load("./not/here")
    with pytest.raises(ValueError, match="step=2 is for a training workdir; .* is an HF checkpoint"):
        mpt_jax.load(hf_folder, step=2)
    with pytest.raises(ValueError, match=r"dtype='int8'; expected one of \('float32', 'bfloat16', 'float16'\)"):
        mpt_jax.load(hf_folder, dtype="int8")
    with pytest.raises(ValueError, match="quantize='int4'"):
        mpt_jax.load(hf_folder, quantize="int4")
    with pytest.raises(ValueError, match="max_seq_len=0; expected a positive integer"):
        mpt_jax.load(hf_folder, max_seq_len=0)


# ---------------------------------------------------------------------------------------------------------------------
# A chat run's workdir (the trainer itself, one step)


def test_a_chat_run_writes_its_chatml_tokenizer_into_the_workdir(tmp_path, tok):
    from transformers import AutoTokenizer

    from mpt_jax import train

    tokenizer_file = str(tmp_path / "tokenizer.json")
    tok.save(tokenizer_file)
    with open(tmp_path / "chat.jsonl", "w") as f:
        for i in range(40):
            messages = [{"role": "user", "content": f"add {i}"}, {"role": "assistant", "content": TEXTS[i % 3]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    config = base_config()
    config.model = dataclasses.replace(CFG, max_seq_len=64).to_config_dict()  # whole conversations fit
    config.data.source = str(tmp_path / "chat.jsonl")
    config.data.format = "chat"
    config.data.text_field = None
    config.data.tokenizer = tokenizer_file
    config.data.shuffle_rows = 0
    config.train.update(max_steps=1, global_batch_size=2, seq_len=64, eval_every=0, progress=False, log_every=1)
    config.checkpoint.keep = 0
    config.schedule.t_warmup = 1
    workdir = str(tmp_path / "run")
    train.Trainer(config, workdir).run()
    assert sorted(os.listdir(os.path.join(workdir, "tokenizer"))) == ["tokenizer.json", "tokenizer_config.json"]
    assert not [n for n in os.listdir(workdir) if ".tmp-" in n]

    cfg, _, tokenizer = mpt_jax.load(workdir)
    chat = tok.with_chatml()
    assert tokenizer.token_to_id(IM_START) == chat.token_to_id(IM_START) == tok.vocab_size
    assert tokenizer.chat_template == CHATML_TEMPLATE and prompt_format(tokenizer).name == "chatml"
    assert tokenizer.model_max_length == cfg.max_seq_len == 64
    # The same folder is what transformers (and convert jax_to_hf) read.
    hf = AutoTokenizer.from_pretrained(os.path.join(workdir, "tokenizer"))
    messages = [{"role": "user", "content": "add 1"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(messages, prompt_format(tokenizer), tokenizer)
    assert hf(text)["input_ids"] == tokenizer.encode(text)
    # It survives a conversion to HF.
    assert convert_cli.main(["jax_to_hf", workdir, str(tmp_path / "hf")]) == 0
    assert mpt_jax.load(str(tmp_path / "hf"))[2].chat_template == CHATML_TEMPLATE


# ---------------------------------------------------------------------------------------------------------------------
# Mesh placement (8 simulated CPU devices, in a subprocess)

MESH_SCRIPT = """
import sys
import jax
import numpy as np
import mpt_jax
from mpt_jax.model import flat_params
from mpt_jax.sharding import make_mesh, param_shardings

assert jax.device_count() == 8
mesh = make_mesh((1, 2, 4))
for path in sys.argv[1:]:
    cfg, params, tok = mpt_jax.load(path, mesh=mesh, dtype="bfloat16")
    want = dict(flat_params(param_shardings(cfg, mesh)))
    _, ref, _ = mpt_jax.load(path, dtype="bfloat16")
    ref = dict(flat_params(ref))
    split = 0
    for name, leaf in flat_params(params):
        assert leaf.sharding.is_equivalent_to(want[name], leaf.ndim), (name, leaf.sharding, want[name])
        split += len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
        assert leaf.dtype == ref[name].dtype
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref[name]))
    assert split >= 4, split
    assert tok is not None
    from mpt_jax.model import unstack_layers
    from mpt_jax.sharding import unstack_shardings
    _, layered, _ = mpt_jax.load(path, mesh=mesh, dtype="bfloat16", scan_layers=False)
    lwant = dict(flat_params(unstack_shardings(param_shardings(cfg, mesh), cfg.n_layers)))
    lref = dict(flat_params(unstack_layers(mpt_jax.load(path, dtype="bfloat16")[1], cfg.n_layers)))
    assert sorted(lwant) == sorted(lref) == sorted(p for p, _ in flat_params(layered))
    for name, leaf in flat_params(layered):
        assert leaf.sharding.is_equivalent_to(lwant[name], leaf.ndim), (name, leaf.sharding, lwant[name])
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(lref[name]))
    from mpt_jax.sharding import quantized_param_shardings
    qcfg, q, _ = mpt_jax.load(path, mesh=mesh, quantize="int8")
    qwant = dict(flat_params(quantized_param_shardings(qcfg, mesh)))
    _, qref, _ = mpt_jax.load(path, quantize="int8")
    qref = dict(flat_params(qref))
    for name, leaf in flat_params(q):
        assert leaf.sharding.is_equivalent_to(qwant[name], leaf.ndim), (name, leaf.sharding, qwant[name])
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(qref[name]))
    print("ok", path, split)
"""


def test_mesh_places_params_as_param_shardings(tmp_path, hf_folder):
    dst = str(tmp_path / "jax")
    assert convert_cli.main(["hf_to_jax", hf_folder, dst]) == 0
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MESH_SCRIPT), hf_folder, dst],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("ok ") == 2
