"""Mixtral, Qwen3-MoE and OLMoE against transformers' PyTorch classes: logits with left / right padding, KV-cache
decoding, greedy generation, the router load-balancing loss (padded batch) in the training loss, export round trip,
stacked experts and their sharding rules, LoRA targets, refused settings, training with the experts split over an
8-device CPU mesh (a subprocess, as tests/test_mesh.py), and the SFT CLI end to end.

Weights travel as transformers saves them (save_pretrained: one tensor per expert), not as its in-memory
state_dict (fused `experts.gate_up_proj`), which jaxsft does not read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, alpaca_rows, llm_tokenizer, write_jsonl  # noqa: E402

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers as tf  # noqa: E402
from decoder_checks import check_export_and_generate_cli_equal_transformers as check_generate_cli  # noqa: E402
from test_generation import PROMPTS, hf_greedy, load_jax, until_eos  # noqa: E402
from test_models_decoder import SMALL, VOCAB, hf_logits, hf_model, padded_batch, positions_of  # noqa: E402
from test_sft import cli, last_json  # noqa: E402

from jaxsft import decoding, hf_io  # noqa: E402
from jaxsft.errors import UserError  # noqa: E402
from jaxsft.models import build_model, to_hf_weights  # noqa: E402

VARIANTS = {
    "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **SMALL),
    "mixtral-window": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                               **SMALL),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
                                           head_dim=16, **SMALL),  # norm_topk_prob=False: weights not renormalised
    "qwen3_moe-norm-bias": lambda: tf.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                                     head_dim=16, norm_topk_prob=True, attention_bias=True, **SMALL),
    "olmoe": lambda: tf.OlmoeConfig(num_experts=8, num_experts_per_tok=2, **SMALL),
    "olmoe-norm": lambda: tf.OlmoeConfig(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, **SMALL),
}
KINDS = ("mixtral", "qwen3_moe", "olmoe")


def saved(torch_model, folder: Path):
    """(Functional, params) of our model loaded from what transformers' save_pretrained writes."""
    torch_model.save_pretrained(folder)
    return load_jax(folder)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal_lm_logits_match_transformers_with_right_and_left_padding(variant, tmp_path):
    model = hf_model(VARIANTS[variant]())
    f, params = saved(model, tmp_path)
    apply = jax.jit(f.apply)
    for side in ("right", "left"):
        ids, mask = padded_batch(side)
        ref = hf_logits(model, ids, mask, positions_of(mask))
        ours = np.asarray(apply(params, ids, mask))
        real = mask == 1
        np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0, err_msg=side)
        assert np.abs(ref[real]).max() > 0.5 and ref[real].std(axis=0).mean() > 0.05  # not trivial


@pytest.mark.parametrize("variant", KINDS)
def test_kv_cache_decoding_matches_full_forward(variant, tmp_path):
    cfg = VARIANTS[variant]()
    f, params = saved(hf_model(cfg), tmp_path)
    prompt, prompt_mask = padded_batch("left", lengths=(5, 3, 7), seed=2)
    steps, batch, p = 4, prompt.shape[0], prompt.shape[1]
    cont = np.random.RandomState(3).randint(3, VOCAB, (batch, steps)).astype(np.int32)
    full = np.asarray(f.apply(params, np.concatenate([prompt, cont], 1),
                              np.concatenate([prompt_mask, np.ones_like(cont)], 1)))
    max_length = p + steps + 2
    slots = np.zeros((batch, max_length), np.int32)
    slots[:, :p] = prompt_mask
    cache = f.method(params, "init_cache", batch, max_length, jnp.float32)
    step = jax.jit(lambda params, cache, ids, pos, slots, i: f.apply(params, ids, slots, positions=pos, cache=cache,
                                                                      cache_index=i))
    logits, cache = step(params, cache, prompt, positions_of(prompt_mask), slots, jnp.int32(0))
    real = prompt_mask == 1
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :p][real], atol=1e-4, rtol=0)
    pos = prompt_mask.sum(1, keepdims=True)
    for j in range(steps):
        slots[:, p + j] = 1
        logits, cache = step(params, cache, cont[:, j:j + 1], (pos + j).astype(np.int32), slots, jnp.int32(p + j))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, p + j], atol=1e-4, rtol=0)
    assert step._cache_size() == 2  # one prefill shape + one decode step shape


@pytest.mark.parametrize("variant", KINDS)
def test_expert_and_router_gradients_match_transformers(variant, tmp_path):
    cfg = VARIANTS[variant]()
    model = hf_model(cfg)
    f, params = saved(model, tmp_path)
    ids, mask = padded_batch("right", seed=6)
    probe = np.random.RandomState(0).randn(*ids.shape, cfg.vocab_size).astype(np.float32) * mask[..., None]
    model.zero_grad()
    (model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
     * torch.tensor(probe)).sum().backward()
    grads = jax.grad(lambda p: (f.apply(p, ids, mask) * probe).sum())(params)
    moe, (gate, up, down) = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}.get(
        variant, ("mlp", ("gate_proj", "up_proj", "down_proj")))
    torch_moe = model.model.layers[1].mlp
    gate_up = torch_moe.experts.gate_up_proj.grad.numpy()  # (experts, 2 x inner, hidden): [gate | up]
    inner = gate_up.shape[1] // 2
    ours = {name: np.asarray(grads[f"model.layers.1.{moe}.experts.{name}.kernel"]) for name in (gate, up, down)}
    np.testing.assert_allclose(ours[gate], gate_up[:, :inner].transpose(0, 2, 1), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours[up], gate_up[:, inner:].transpose(0, 2, 1), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours[down], torch_moe.experts.down_proj.grad.numpy().transpose(0, 2, 1), atol=1e-4,
                               rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads[f"model.layers.1.{moe}.gate.kernel"]),
                               torch_moe.gate.weight.grad.numpy().T, atol=1e-4, rtol=1e-4)
    assert np.abs(ours[down]).max() > 1e-3


def make_tiny_moe(out: Path, kind: str, std: float = 0.02, **overrides) -> Path:
    """A tiny random Mixtral / Qwen3-MoE / OLMoE *ForCausalLM checkpoint with conftest's llm_tokenizer."""
    tok = llm_tokenizer()
    torch.manual_seed(0)
    common = dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id, initializer_range=std, hidden_size=64, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  num_experts_per_tok=2)
    if kind == "mixtral":
        cfg = tf.MixtralConfig(**{**common, "num_local_experts": 8, **overrides})
    elif kind == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**{**common, "num_experts": 8, "moe_intermediate_size": 32, "head_dim": 16,
                                   **overrides})
    else:
        cfg = tf.OlmoeConfig(**{**common, "num_experts": 8, **overrides})
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_equals_transformers(kind, tmp_path):
    folder = make_tiny_moe(tmp_path / kind, kind, std=0.1)
    tok = tf.AutoTokenizer.from_pretrained(folder)
    functional, params = load_jax(folder)
    fn = decoding.make_generate_fn(functional, decoding.Sampling(max_new_tokens=16), (tok.eos_token_id,),
                                   tok.pad_token_id, jnp.float32)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ours = decoding.generate(fn, params, ids, batch_size=4, pad_id=tok.pad_token_id, max_prompt=64)
    theirs = hf_greedy(folder, PROMPTS, 16)
    for o, t in zip(ours, theirs):
        assert until_eos(o, tok.eos_token_id) == until_eos(t, tok.eos_token_id)
    assert len({t for row in ours for t in row}) >= 5, f"degenerate generations: {ours}"


@pytest.mark.parametrize("kind", KINDS)
def test_training_loss_adds_the_router_load_balancing_loss_as_transformers_does(kind, tmp_path):
    """output_router_logits=True: transformers' loss = mean token CE + router_aux_loss_coef x
    load_balancing_loss_func(router logits, attention_mask); ours, through the task's train_sums, on padded rows."""
    from ml_collections import ConfigDict

    from jaxsft.tasks import causal_lm

    variant = {"mixtral": "mixtral", "qwen3_moe": "qwen3_moe", "olmoe": "olmoe"}[kind]
    cfg = VARIANTS[variant]()
    cfg.output_router_logits, cfg.router_aux_loss_coef = True, 0.5
    model = hf_model(cfg)
    f, params = saved(model, tmp_path)
    assert f.router_aux_loss_coef == 0.5
    for side in ("right", "left"):
        ids, mask = padded_batch(side, seed=4)
        pos = positions_of(mask)
        with torch.no_grad():
            out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(pos, dtype=torch.long),
                        labels=torch.tensor(np.where(mask == 1, ids, -100), dtype=torch.long))
        _, aux = f.apply(params, ids, mask, positions=pos, router_aux_loss=True)
        np.testing.assert_allclose(float(aux), float(out.aux_loss), atol=1e-5, rtol=0, err_msg=side)
        if side == "left":
            continue  # transformers' labels shift over the row: its CE equals ours on right-padded rows
        targets = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], 1)
        loss_mask = np.concatenate([mask[:, 1:], np.zeros_like(mask[:, :1])], 1).astype(np.float32)
        batch = {"input_ids": ids, "attention_mask": mask, "positions": pos, "segment_ids": mask,
                 "targets": targets, "loss_mask": loss_mask}
        for chunk in (0, 8):  # the plain and the chunked cross-entropy
            settings = ConfigDict({"label_smoothing": 0.0, "chunked_loss_size": chunk})
            total, count = causal_lm.train_sums(f, params, batch, None, settings)
            np.testing.assert_allclose(float(total / count), float(out.loss), atol=1e-5, rtol=0, err_msg=str(chunk))
    cfg.output_router_logits = False  # transformers' default: no load-balancing loss
    assert build_model(cfg, "causal_lm", jnp.float32, 0).router_aux_loss_coef == 0.0


@pytest.mark.parametrize("variant", ["mixtral", "qwen3_moe-norm-bias", "olmoe"])
def test_export_round_trip_loads_in_transformers_with_equal_logits(variant, tmp_path):
    cfg = VARIANTS[variant]()
    f, params = saved(hf_model(cfg), tmp_path / "in")
    params = {k: v + 0.01 * jnp.sin(jnp.arange(v.size).reshape(v.shape)) for k, v in params.items()}
    out = tmp_path / "out"
    hf_io.write_safetensors(to_hf_weights(params), out)
    cfg.save_pretrained(out)
    theirs, info = tf.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = padded_batch("right", seed=5)
    ref = hf_logits(theirs.eval(), ids, mask)
    ours = np.asarray(jax.jit(f.apply)(params, ids, mask))
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", KINDS)
def test_experts_are_stacked_and_every_matrix_has_a_sharding_rule(variant):
    from flax import nnx

    from jaxsft import parallel
    from jaxsft.models import flatten_state, hf_layout

    cfg = VARIANTS[variant]()
    model = nnx.eval_shape(lambda: build_model(cfg, "causal_lm", jnp.float32, 0))
    abstract = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    shapes = {k: v.shape for k, v in abstract.items()}
    experts = [k for k in shapes if ".experts." in k]
    e = cfg.num_local_experts if variant == "mixtral" else cfg.num_experts
    assert len(experts) == 3 * cfg.num_hidden_layers and all(shapes[k][0] == e for k in experts)
    names = hf_layout(abstract)
    moe = "block_sparse_moe" if variant == "mixtral" else "mlp"
    assert f"model.layers.1.{moe}.experts.{e - 1}.{'w2' if variant == 'mixtral' else 'down_proj'}.weight" in names
    assert f"model.layers.0.{moe}.gate.weight" in names
    sizes = {"data": 1, "fsdp": 2, "tensor": 2, "expert": 2}
    for name, shape in shapes.items():
        spec = tuple(parallel.spec_for(name, shape, parallel.rules_for(cfg), sizes))
        if name in experts:
            assert spec[0] == "expert" and set(spec[1:]) == {"fsdp", "tensor"}, (name, spec)
        elif len(shape) >= 2:
            assert "fsdp" in spec or "tensor" in spec, (name, shape, spec)
        elif not name.endswith("bias"):
            assert spec == (), (name, spec)


def test_lora_adapts_the_attention_projections_with_transformers_names_and_not_the_experts():
    from flax import nnx
    from ml_collections import ConfigDict

    from jaxsft.models import lora

    for variant in KINDS:
        cfg = VARIANTS[variant]()
        model = build_model(cfg, "causal_lm", jnp.float32, 0)
        lora_config = ConfigDict(dict(rank=4, alpha=8.0, dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "gate", "w1", "w2", "w3"]))
        adapted = lora.inject(model, lora_config)
        assert len(adapted) == 4 * cfg.num_hidden_layers and all(".self_attn." in a for a in adapted), adapted
        theirs = {n for n, m in hf_model(cfg).named_modules() if isinstance(m, torch.nn.Linear)}
        assert set(adapted) <= theirs  # PEFT finds the same modules
        assert not [p for p, _ in nnx.iter_modules(model) if ".experts" in ".".join(map(str, p))
                    and "lora" in ".".join(map(str, p))]


@pytest.mark.parametrize("variant", KINDS)
def test_bfloat16_compute_is_close_to_float32_and_gradients_reach_the_experts_with_lora(variant, tmp_path):
    from flax import nnx
    from ml_collections import ConfigDict

    from jaxsft.models import Functional, flatten_state, load_weights, lora

    cfg = VARIANTS[variant]()
    hf_model(cfg).save_pretrained(tmp_path)
    weights = hf_io.read_weights(tmp_path)
    ids, mask = padded_batch("right")
    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = build_model(cfg, "causal_lm", dtype, 0)
        params, _ = load_weights(model, weights, "test")
        out[dtype] = np.asarray(Functional(model).apply(params, ids, mask))
    real = mask == 1
    assert np.abs(out[jnp.bfloat16] - out[jnp.float32])[real].mean() < 0.05
    model = build_model(cfg, "causal_lm", jnp.float32, 0)
    lora.inject(model, ConfigDict(dict(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])))
    f = Functional(model)
    params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    grads = jax.grad(lambda p: f.apply(p, ids, mask)[real].mean())(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())
    assert any(np.abs(np.asarray(grads[k])).max() > 0 for k in grads if ".experts." in k)  # experts do get gradients


def test_unsupported_settings_are_refused_in_one_line():
    cases = [
        (VARIANTS["qwen3_moe"], {"mlp_only_layers": [0]}, "mlp_only_layers"),
        (VARIANTS["qwen3_moe"], {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        (VARIANTS["olmoe"], {"clip_qkv": 8.0}, "clip_qkv"),
        (VARIANTS["mixtral"], {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ]
    for make, settings, word in cases:
        cfg = make()
        for k, v in settings.items():
            setattr(cfg, k, v)
        with pytest.raises(UserError, match=word):
            build_model(cfg, "causal_lm", jnp.float32, 0)
    with pytest.raises(UserError, match="scan_layers"):
        build_model(VARIANTS["olmoe"](), "causal_lm", jnp.float32, 0, {"scan_layers": True})
    cfg = VARIANTS["olmoe"]()
    cfg.output_router_logits = True
    model = build_model(cfg, "causal_lm", jnp.float32, 0, {"remat": "dots"})
    with pytest.raises(UserError, match="remat"):
        model(*padded_batch("right"), router_aux_loss=True)


# ---- training with the experts split over 8 devices (a subprocess with 8 host CPU devices) ----------------------

MOE_MESHES = ({"data": 8}, {"data": 1, "expert": 8}, {"data": 2, "fsdp": 2, "expert": 2})


@pytest.mark.slow  # ~60 s: three meshes, each compiles its own step
def test_training_with_experts_split_over_the_expert_axis_matches_the_unsharded_run(tmp_path):
    model = make_tiny_moe(tmp_path / "olmoe", "olmoe", output_router_logits=True, router_aux_loss_coef=0.1)
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(64, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", alpaca_rows(16, seed=1))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, __file__, str(model), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    base = out["0"]
    assert len(base["losses"]) == 4 and np.isfinite(base["eval_loss"]) and not base["experts_split"]
    for i in range(1, len(MOE_MESHES)):
        np.testing.assert_allclose(out[str(i)]["losses"], base["losses"], atol=1e-5, rtol=0, err_msg=str(i))
        assert abs(out[str(i)]["eval_loss"] - base["eval_loss"]) < 1e-5
        assert out[str(i)]["experts_split"], MOE_MESHES[i]


def _train_on_meshes(model: str, tmp: str) -> dict:
    from jaxsft import config as config_lib
    from jaxsft import parallel, pipeline
    from jaxsft import train as train_lib

    tmp, out = Path(tmp), {}
    for i, mesh in enumerate(MOE_MESHES):
        c = config_lib.load_config_file(str(ROOT / "configs" / "sft_moe.py"))
        c.model.name_or_path = model
        c.data.train, c.data.eval = str(tmp / "train.jsonl"), str(tmp / "eval.jsonl")
        c.max_length, c.batch_size, c.gradient_accumulation_steps, c.learning_rate = 64, 8, 1, 1e-3
        c.max_steps, c.warmup_steps, c.dtype, c.model.remat, c.log_every_steps = 4, 0, "float32", "none", 1
        c.data.buckets = [c.max_length]
        c.eval_every_steps = c.checkpoint_every_steps = 4
        c.mesh = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **mesh}
        w = tmp / f"w{i}"
        final = train_lib.train_and_evaluate(c, w)
        losses = [json.loads(line)["loss"] for line in open(w / "metrics.jsonl") if '"loss"' in line]
        functional, template, _, _ = pipeline.workdir_model(w, c)
        params, _ = pipeline.restore_params(w, c, template, parallel.make_mesh(c.mesh), "latest",
                                            functional.trainable)
        kernel = next(v for k, v in params.items() if k.endswith("experts.gate_proj.kernel"))
        split = kernel.addressable_shards[0].data.shape[0] < kernel.shape[0]
        out[str(i)] = {"losses": losses, "eval_loss": final["eval_loss"], "experts_split": bool(split)}
    return out


def test_sft_moe_config_starts_with_its_command_and_loads():
    from jaxsft import config as config_lib

    path = ROOT / "configs" / "sft_moe.py"
    assert path.read_text().splitlines()[0].startswith("# COMMAND: python -m jaxsft.run --config configs/sft_moe.py")
    c = config_lib.load_config_file(str(path))
    assert c.task == "causal_lm" and c.mesh.expert == 1 and c.model.name_or_path.startswith("allenai/OLMoE")


# ---- the SFT CLI end to end ------------------------------------------------------------------------------------

@pytest.mark.slow  # a short run, evaluate, export and transformers' generate: ~40 s idle
@pytest.mark.parametrize("kind", ["qwen3_moe", "olmoe"])
def test_sft_moe_config_trains_evaluates_and_exports(kind, tmp_path):
    model = make_tiny_moe(tmp_path / kind, kind)
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(96, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", alpaca_rows(16, seed=1))
    w, hf = tmp_path / "w", tmp_path / "hf"
    final = last_json(cli("run", "--config", "configs/sft_moe.py", "--workdir", w,
                          f"--config.model.name_or_path={model}", f"--config.data.train={tmp_path / 'train.jsonl'}",
                          f"--config.data.eval={tmp_path / 'eval.jsonl'}", "--config.max_steps=30",
                          "--config.learning_rate=1e-2", "--config.max_length=128", "--config.batch_size=8",
                          "--config.warmup_steps=0", "--config.eval_every_steps=15", "--config.log_every_steps=5",
                          "--config.dtype=float32").stdout)
    events = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    train = [e["loss"] for e in events if "loss" in e]
    assert final["step"] == 30 and all(np.isfinite(train)) and train[-1] < 0.5 * train[0]
    evaluated = last_json(cli("evaluate", "--workdir", w).stdout)
    assert abs(evaluated["eval_loss"] - final["eval_loss"]) < 1e-4
    check_generate_cli(w, hf, tmp_path, {"qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}[kind], 4, 8)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(_train_on_meshes(*sys.argv[1:])), flush=True)
