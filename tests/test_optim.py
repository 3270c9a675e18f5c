"""The optimizer choice: Adafactor steps equal transformers' Adafactor(scale_parameter=True, relative_step=False)."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxsft import optim
from jaxsft.defaults import base_config
from jaxsft.errors import UserError


def _config(**kw):
    c = base_config()
    c.learning_rate, c.warmup_steps, c.max_grad_norm = 1e-2, 0, 0.0
    for k, v in kw.items():
        c[k] = v
    return c


def test_adafactor_steps_equal_transformers_adafactor():
    torch = pytest.importorskip("torch")
    from transformers.optimization import Adafactor

    rng = np.random.default_rng(0)
    # a matrix of T5-embedding scale, a small one of T5-query scale, and a vector (not factored)
    params = {"emb.weight": rng.normal(0, 1.0, (24, 16)), "q.weight": rng.normal(0, 1 / 128, (16, 8)),
              "ln.weight": rng.normal(1, 0.1, (16,))}
    grads = [{k: rng.normal(0, 0.05, v.shape) for k, v in params.items()} for _ in range(4)]

    tparams = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in params.items()}
    groups = [{"params": [tparams["emb.weight"], tparams["q.weight"]]},
              {"params": [tparams["ln.weight"]], "weight_decay": 0.0}]  # jaxsft decays matrices only
    topt = Adafactor(groups, lr=1e-2, scale_parameter=True, relative_step=False, warmup_init=False, weight_decay=0.1)
    tx, _ = optim.make_optimizer(_config(optimizer="adafactor", learning_rate=1e-2, weight_decay=0.1),
                                 total_steps=10**6)
    jparams = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = tx.init(jparams)
    for g in grads:
        for k, p in tparams.items():
            p.grad = torch.tensor(g[k], dtype=torch.float64)
        topt.step()
        updates, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, jparams)
        jparams = {k: jparams[k] + updates[k] for k in jparams}
    for k in params:  # a constant learning rate here (the schedule's decay over 1e6 steps is ~1e-5 relative)
        np.testing.assert_allclose(np.asarray(jparams[k]), tparams[k].detach().numpy(), rtol=2e-4, atol=1e-6)
        assert not np.allclose(np.asarray(jparams[k]), params[k])  # it moved
    # updates scale with each weight's RMS: the query-scale matrix moved ~100x less than the embedding-scale one
    moved = {k: np.abs(np.asarray(jparams[k]) - params[k]).mean() for k in ("emb.weight", "q.weight")}
    assert moved["emb.weight"] > 30 * moved["q.weight"]


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError, match="config.optimizer"):
        optim.make_optimizer(_config(optimizer="sgdd"), total_steps=10)
    assert isinstance(base_config(), ml_collections.ConfigDict) and base_config().optimizer == "adamw"


def _tiny_hf(kind):
    """(torch model, its config, our task) of a tiny random HF model of each family jaxsft builds."""
    import transformers as tf

    att = dict(num_attention_heads=4, num_key_value_heads=2)
    dec = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, **att)
    cases = {
        "t5": (tf.T5ForConditionalGeneration, tf.T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                                          num_heads=4, feed_forward_proj="gated-gelu",
                                                          tie_word_embeddings=False), "seq2seq"),
        "marian": (tf.MarianMTModel, tf.MarianConfig(vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1,
                                                     encoder_attention_heads=2, decoder_attention_heads=2,
                                                     encoder_ffn_dim=32, decoder_ffn_dim=32,
                                                     max_position_embeddings=64, pad_token_id=0,
                                                     decoder_start_token_id=0), "seq2seq"),
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**dec), "causal_lm"),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**dec), "causal_lm"),
        "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**dec, head_dim=4), "causal_lm"),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=4, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0), "causal_lm"),
        "bert": (tf.BertForSequenceClassification, tf.BertConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                                                 num_hidden_layers=1, num_attention_heads=4,
                                                                 num_labels=2), "classification"),
    }
    cls, cfg, task = cases[kind]
    return cls(cfg), cfg, task


@pytest.fixture(scope="module")
def hf_trainer(tmp_path_factory):
    """A transformers Trainer (never trained) whose get_decay_parameter_names is the oracle."""
    pytest.importorskip("torch")
    import transformers as tf

    model, _, _ = _tiny_hf("llama")
    args = tf.TrainingArguments(output_dir=str(tmp_path_factory.mktemp("trainer")), report_to="none", use_cpu=True)
    return tf.Trainer(model=model, args=args)


@pytest.mark.parametrize("kind", ["t5", "marian", "llama", "qwen2", "qwen3", "gpt2", "bert"])
def test_decay_mask_equals_transformers_trainer_choice(kind, hf_trainer):
    from flax import nnx

    from jaxsft.models import build_model, flatten_state, hf_name

    hf_model, hf_config, task = _tiny_hf(kind)
    hf_names = {n for n, _ in hf_model.named_parameters(remove_duplicate=False)}
    hf_decayed = set(hf_trainer.get_decay_parameter_names(hf_model))
    params = flatten_state(nnx.to_pure_dict(nnx.state(build_model(hf_config, task, jnp.float32, 0), nnx.Param)))
    mask = optim.decay_mask(params)
    compared = 0
    for path, v in params.items():
        name, _ = hf_name(path)
        if name in hf_names:  # the same parameter in transformers: the same choice
            assert mask[path] == (name in hf_decayed), (path, v.shape, mask[path])
            compared += 1
        else:  # only Marian's final_logits_bias: a buffer in transformers (never trained, never decayed)
            assert path == "final_logits_bias" and not mask[path]
    assert compared >= len(params) - 1 and any(mask.values()) and not all(mask.values())
    # the named cases, spelled out
    biases = [p for p in params if "relative_attention_bias" in p or p.endswith("final_logits_bias")]
    assert bool(biases) == (kind in ("t5", "marian")) and not any(mask[p] for p in biases)
    assert all(mask[p] for p, v in params.items() if p.endswith((".kernel", ".embedding")) and p not in biases)
    norms = [p for p in params if p.endswith(".scale") or "norm" in p.lower()]
    assert norms and not any(mask[p] for p in norms)


def test_decay_mask_of_scanned_layers_equals_the_per_layer_one():
    pytest.importorskip("torch")
    from flax import nnx

    from jaxsft.models import build_model, flatten_state, stacked_parts, unstack_path

    _, hf_config, _ = _tiny_hf("qwen2")  # q/k/v biases, RMSNorm scales, kernels, embedding
    per_layer = optim.decay_mask(flatten_state(nnx.to_pure_dict(nnx.state(
        build_model(hf_config, "causal_lm", jnp.float32, 0), nnx.Param))))
    stacked = optim.decay_mask(flatten_state(nnx.to_pure_dict(nnx.state(
        build_model(hf_config, "causal_lm", jnp.float32, 0, {"scan_layers": True}), nnx.Param))))
    assert any(stacked_parts(p) for p in stacked)
    assert {(unstack_path(p, 0) if stacked_parts(p) else p): m for p, m in stacked.items()} == per_layer


SCHEDULE_CASES = [  # (lr_scheduler_type, our keys, transformers' scheduler_specific_kwargs)
    ("linear", {}, {}),
    ("cosine", {}, {}),
    ("cosine_with_min_lr", {"min_lr_ratio": 0.1}, {"min_lr_rate": 0.1}),
    ("constant", {}, {}),
    ("constant_with_warmup", {}, {}),
    ("inverse_sqrt", {}, {}),
    ("inverse_sqrt", {"inverse_sqrt_timescale": 20}, {"timescale": 20}),
    ("warmup_stable_decay", {"decay_steps": 12, "min_lr_ratio": 0.05}, {"num_decay_steps": 12, "min_lr_ratio": 0.05}),
    ("warmup_stable_decay", {"decay_ratio": 0.3, "decay_type": "linear"},
     {"num_decay_steps": 15, "decay_type": "linear"}),
    ("warmup_stable_decay", {"decay_steps": 9, "decay_type": "1-sqrt"}, {"num_decay_steps": 9, "decay_type": "1-sqrt"}),
]


@pytest.mark.parametrize("warmup", [0, 7])
@pytest.mark.parametrize("kind, ours, theirs", SCHEDULE_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_learning_rate_schedules_equal_transformers_at_every_step(kind, ours, theirs, warmup):
    """The rate of every optimizer step equals what transformers' get_scheduler gives HF Trainer's step."""
    torch = pytest.importorskip("torch")
    import transformers


    total, peak = 50, 3e-4
    config = base_config()
    config.learning_rate, config.warmup_steps, config.lr_scheduler_type = peak, warmup, kind
    config.update(ours)
    _, lr = optim.make_optimizer(config, total)

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = transformers.get_scheduler(kind, opt, num_warmup_steps=warmup, num_training_steps=total,
                                       scheduler_specific_kwargs=dict(theirs))
    want = []
    for _ in range(total):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [float(lr(step)) for step in range(total)]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=peak * 1e-7)  # float32 cosines
    if warmup and kind != "constant":  # the warmup itself, from 0 (HF's WSD: from min_lr_ratio)
        assert got[0] == pytest.approx(peak * ours.get("min_lr_ratio", 0.0) if kind == "warmup_stable_decay" else 0.0)


@pytest.mark.parametrize("key, value, words", [
    ("lr_scheduler_type", "cosine_restarts", "lr_scheduler_type must be one of"),
    ("decay_type", "exp", "decay_type must be one of"), ("min_lr_ratio", 1.5, "min_lr_ratio must be")])
def test_bad_schedule_settings_are_one_line_errors(key, value, words):
    from jaxsft.config import check_values

    config = base_config()
    config[key] = value
    with pytest.raises(UserError) as e:
        check_values(config)
    assert words in str(e.value) and "\n" not in str(e.value)
