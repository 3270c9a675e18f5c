"""Sharding by partition rules: specs per family, the same training on every (data, fsdp, tensor) mesh, and
parameters + optimizer state really split over 'fsdp'.

The 8-device checks run this file as a script in a subprocess with 8 host CPU devices
(`python tests/test_mesh.py WHAT ...`), so pytest's own process keeps its single device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, alpaca_rows, make_tiny_decoder, synthetic_rows, write_jsonl, write_tsv  # noqa: E402

pytestmark = pytest.mark.mesh

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))


def run_worker(*args, devices: int = 8, timeout: int = 900) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"worker {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- rules, no devices needed -----------------------------------------------------------------------------------

def _model_params(hf_config, task):
    import jax
    from flax import nnx

    from jaxsft.models import build_model, flatten_state

    model = build_model(hf_config, task, jax.numpy.float32, 0)
    return model, {k: tuple(v.shape) for k, v in flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def _configs():
    import transformers as tf

    common = dict(vocab_size=96, num_labels=2)
    return [
        (tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, **common),
         "classification"),
        (tf.RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          **common), "classification"),
        (tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, **common), "causal_lm"),
        (tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, **common), "classification"),
        (tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **common), "causal_lm"),
        (tf.GPT2Config(n_embd=64, n_layer=1, n_head=4, **common), "causal_lm"),
        (tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
                     tie_word_embeddings=False, **common), "seq2seq"),
        (tf.MarianConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, pad_token_id=0,
                         decoder_start_token_id=0, share_encoder_decoder_embeddings=False,
                         tie_word_embeddings=False, **common), "seq2seq"),
    ]


@pytest.mark.parametrize("index", range(8), ids=["bert", "roberta", "llama", "qwen2-cls", "qwen3", "gpt2", "t5",
                                                 "marian"])
def test_every_matrix_of_every_family_has_a_rule_that_shards_it(index):
    from jaxsft import parallel

    hf_config, task = _configs()[index]
    _, shapes = _model_params(hf_config, task)
    rules = parallel.rules_for(hf_config)
    sizes = {"data": 1, "fsdp": 2, "tensor": 2}
    for name, shape in shapes.items():
        spec = parallel.spec_for(name, shape, rules, sizes)
        if len(shape) >= 2 and max(shape) >= 32:  # every matrix bigger than a head's output is split somehow
            assert "fsdp" in tuple(spec) or "tensor" in tuple(spec), (name, shape, spec)
        if len(shape) == 1 and not name.endswith("bias"):  # norms stay replicated
            assert tuple(spec) == (), (name, spec)


def test_specs_follow_the_rules_and_fall_back_when_a_dimension_does_not_divide():
    from jax.sharding import PartitionSpec as P

    from jaxsft import parallel
    from jaxsft.models import decoder

    rules, sizes = decoder.PARTITION_RULES, {"data": 2, "fsdp": 4, "tensor": 2}
    spec = lambda name, shape: parallel.spec_for(name, shape, rules, sizes)
    assert spec("model.layers.0.self_attn.q_proj.kernel", (64, 64)) == P("fsdp", "tensor")
    assert spec("model.layers.0.self_attn.o_proj.kernel", (64, 64)) == P("tensor", "fsdp")
    assert spec("model.layers.0.mlp.down_proj.kernel", (128, 64)) == P("tensor", "fsdp")
    assert spec("model.layers.0.self_attn.q_proj.bias", (64,)) == P("tensor")
    assert spec("model.norm.scale", (64,)) == P()
    # 30522 rows do not divide by tensor=4: replicated over 'tensor', still split over 'fsdp'.
    assert parallel.spec_for("model.embed_tokens.embedding", (30522, 64), rules,
                             {"fsdp": 4, "tensor": 4}) == P(None, "fsdp")
    assert spec("model.layers.0.self_attn.k_proj.kernel", (6, 3)) == P()  # tiny: nothing divides
    # LoRA adapters follow the layer they adapt: x @ A @ B splits like x @ W.
    assert spec("model.layers.0.self_attn.q_proj.lora_A.kernel", (64, 8)) == P("fsdp")
    assert spec("model.layers.0.self_attn.q_proj.lora_B.kernel", (8, 64)) == P(None, "tensor")
    assert spec("model.layers.0.self_attn.o_proj.lora_A.kernel", (64, 8)) == P("tensor")
    assert spec("model.layers.0.self_attn.o_proj.lora_B.kernel", (8, 64)) == P(None, "fsdp")
    assert spec("score.kernel", (64, 2)) == P("fsdp")
    assert spec("lm_head.kernel", (64, 96)) == P("fsdp", "tensor")


def test_optimizer_state_takes_the_shardings_of_its_params():
    import jax
    from jax.sharding import Mesh
    from ml_collections import ConfigDict

    from jaxsft import optim, parallel
    from jaxsft.models import decoder

    params = {"model.layers.0.mlp.up_proj.kernel": np.zeros((64, 128), np.float32),
              "model.norm.scale": np.zeros((64,), np.float32)}
    config = ConfigDict(dict(learning_rate=1e-3, warmup_steps=0, warmup_ratio=0.0, max_grad_norm=1.0,
                             adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.01))
    tx, _ = optim.make_optimizer(config, 10)
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(parallel.AXES)), parallel.AXES)
    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
    sh = parallel.state_shardings(state, decoder.PARTITION_RULES, mesh)
    by_path = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(sh["opt_state"])}
    kernel = [s for p, s in by_path.items() if "up_proj" in p]
    assert len(kernel) == 2 and all(tuple(s) == ("fsdp", "tensor") for s in kernel)  # Adam mu and nu
    assert all(tuple(s) == () for p, s in by_path.items() if "up_proj" not in p)  # counts, norm moments


# ---- 8 host devices ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mesh_data")
    write_tsv(d / "train.tsv", synthetic_rows(96, 1))
    write_tsv(d / "eval.tsv", synthetic_rows(32, 2))
    write_jsonl(d / "train.jsonl", alpaca_rows(96, seed=0))
    write_jsonl(d / "eval.jsonl", alpaca_rows(16, seed=1))
    return d


@pytest.mark.slow  # ~60 s: four meshes, each compiles its own step
def test_bert_classification_ends_with_the_same_loss_on_every_mesh(tiny_bert, files, tmp_path):
    out = run_worker("train", "classification", tiny_bert, files, tmp_path)
    check_same_losses(out)


@pytest.mark.slow  # ~70 s
def test_llama_sft_ends_with_the_same_loss_on_every_mesh(files, tmp_path):
    model = make_tiny_decoder(tmp_path / "llama", num_hidden_layers=1)  # dims 64/128, 4×16 heads, 2 kv heads
    out = run_worker("train", "causal_lm", model, files, tmp_path)
    check_same_losses(out)


def check_same_losses(out: dict) -> None:
    base = out[str(MESHES[0])]
    assert len(base["losses"]) == 6 and np.isfinite(base["eval_loss"])
    for mesh in MESHES[1:]:
        got = out[str(mesh)]
        np.testing.assert_allclose(got["losses"], base["losses"], atol=1e-5, rtol=0, err_msg=str(mesh))
        assert abs(got["eval_loss"] - base["eval_loss"]) < 1e-5, mesh
        assert got["sharded"] == (mesh != (8, 1, 1)), mesh  # something really is split off the pure-DP mesh


def test_params_and_optimizer_state_shrink_per_device_as_fsdp_grows(tiny_bert):
    out = run_worker("bytes", tiny_bert)
    b1, b2, b4 = out["1"], out["2"], out["4"]
    assert b2 < 0.55 * b1 and b4 < 0.55 * b2, out  # halves but for the few replicated norms, biases, counts
    assert out["big_params_split"], out


@pytest.mark.slow  # ~40 s: two processes compile a Llama train step for two meshes each
def test_fsdp_and_tensor_steps_send_weights_not_the_batch_activations(tmp_path):
    """The residual stream stays split over (data, fsdp) (models.layers.split_batch). XLA's propagation alone
    followed the fsdp-sharded weights and gathered the whole batch's activations and logits onto every device: 8x
    more bytes per step here, and growing with the batch. The figures come from benchmarks/collectives.py."""
    p = subprocess.run([sys.executable, "benchmarks/collectives.py", "--families", "llama", "--meshes",
                        "1,8,1;1,4,2", "--json", str(tmp_path / "coll.json")], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads((tmp_path / "coll.json").read_text())
    for case in ("llama 1,8,1", "llama 1,4,2"):
        ours, xla = out["jaxsft"][case], out["xla"][case]
        assert ours["bytes"] < 0.3 * xla["bytes"], (case, ours["bytes"], xla["bytes"])
        assert ours["bytes"] < 1.2 * ours["param_bytes"], case  # about one gather of the weights and their grads
    assert "llama 1,8,1" in p.stdout and "ratio" in p.stdout  # the printed table


# ---- the worker (runs with 8 devices) --------------------------------------------------------------------------

def _train(task: str, model: str, data: str, tmp: str) -> dict:
    from jaxsft import config as config_lib
    from jaxsft import train as train_lib

    data, tmp, out = Path(data), Path(tmp), {}
    for mesh in MESHES:
        name = "classify" if task == "classification" else "sft"
        c = config_lib.load_config_file(str(ROOT / "configs" / f"{name}.py"))
        c.model.name_or_path = model
        ext = "tsv" if task == "classification" else "jsonl"
        c.data.train, c.data.eval = str(data / f"train.{ext}"), str(data / f"eval.{ext}")
        c.max_length, c.batch_size, c.learning_rate, c.log_every_steps = 64, 16, 1e-3, 1
        c.max_steps, c.warmup_steps, c.dtype = 6, 0, "float32"
        c.data.buckets = [c.max_length]  # one shape: one compilation of each step per mesh
        c.eval_every_steps = c.checkpoint_every_steps = 6
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
        w = tmp / "w_{}_{}_{}".format(*mesh)
        t0 = time.time()
        final = train_lib.train_and_evaluate(c, w)
        print(f"mesh {mesh}: {time.time() - t0:.1f} s", file=sys.stderr)
        losses = [json.loads(line)["loss"] for line in open(w / "metrics.jsonl") if '"loss"' in line]
        out[str(mesh)] = {"losses": losses, "eval_loss": final["eval_loss"], "sharded": _sharded(w, c)}
    return out


def _sharded(workdir: Path, config) -> bool:
    """Whether the checkpoint restores, on this mesh, into params at least one of which is split; it also
    restores, value for value, on every other mesh."""
    from jaxsft import parallel, pipeline

    functional, template, _, _ = pipeline.workdir_model(workdir, config)
    restored = {}
    for mesh in MESHES:
        restored[mesh], _ = pipeline.restore_params(workdir, config, template, parallel.make_mesh(
            dict(zip(parallel.AXES, mesh))), "latest", functional.trainable)
    own = restored[tuple(config.mesh[a] for a in ("data", "fsdp", "tensor"))]  # MESHES' axes (expert: 1)
    for params in restored.values():
        assert all(np.array_equal(np.asarray(params[k]), np.asarray(v)) for k, v in own.items())
    return any(not v.sharding.is_fully_replicated for v in own.values())


def _bytes(model: str) -> dict:
    import jax
    from ml_collections import ConfigDict

    from jaxsft import hf_io, optim, parallel, pipeline
    from jaxsft.models import build_model, load_weights

    hf_config = pipeline.load_hf_config(Path(model), "model")
    model_obj = build_model(hf_config, "classification", jax.numpy.float32, 0)
    params, _ = load_weights(model_obj, hf_io.read_weights(Path(model)), model)
    config = ConfigDict(dict(learning_rate=1e-3, warmup_steps=0, warmup_ratio=0.0, max_grad_norm=1.0,
                             adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.01))
    tx, _ = optim.make_optimizer(config, 10)
    out, big_split = {}, True
    for fsdp in (1, 2, 4):
        mesh = parallel.make_mesh({"data": 8 // fsdp, "fsdp": fsdp, "tensor": 1})
        abstract = pipeline.train_state(params, {}, jax.eval_shape(tx.init, params))
        sh = parallel.state_shardings(abstract, parallel.rules_for(hf_config), mesh)
        p = parallel.put(params, sh["params"])
        state = pipeline.train_state(p, {}, jax.jit(tx.init, out_shardings=sh["opt_state"])(p))
        out[str(fsdp)] = max(parallel.bytes_per_device(state).values())
        for v in p.values():  # every parameter of 1000+ values holds 1/fsdp of it per device
            if v.size >= 1000:
                big_split &= all(s.data.size * fsdp == v.size for s in v.addressable_shards)
    out["big_params_split"] = bool(big_split)
    out["total"] = int(sum(x.nbytes for x in jax.tree.leaves(state)))
    return out


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    what, *rest = sys.argv[1:]
    result = _train(*rest) if what == "train" else _bytes(*rest)
    print(json.dumps(result), flush=True)
