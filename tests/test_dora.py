"""DoRA (config.lora.use_dora) equal to PEFT's `LoraConfig(use_dora=True)`: the forward in evaluation and in
training (dropout > 0 follows PEFT's dropout path, with the same masks), the gradients of A, B and the magnitude
(PEFT detaches the weight norm), the merged export (transformers) and the adapter folder (peft) give PEFT's logits;
the SFT CLI trains, evaluates and exports with it; unsupported combinations are one line."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import alpaca_rows, make_tiny_decoder, write_jsonl
from test_models_decoder import SMALL, VOCAB, hf_model, padded_batch
from test_sft import cli

from jaxsft import config as config_lib
from jaxsft import defaults, export
from jaxsft.errors import UserError
from jaxsft.models import Functional, build_model, layers, load_weights, lora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import transformers as tf  # noqa: E402

RANK, ALPHA, RATE = 4, 8.0, 0.25
TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def hf_config(variant: str):
    if variant == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tf.LlamaConfig(**SMALL)


def lora_config(variant: str, dropout: float = 0.0) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"rank": RANK, "alpha": ALPHA, "dropout": dropout,
                                      "target_modules": TARGETS[variant], "use_dora": True})


def peft_model(variant: str, dropout: float = 0.0):
    """A tiny PyTorch model under PEFT's DoRA, lora_B and the magnitudes perturbed away from their start."""
    base = hf_model(hf_config(variant))
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS[variant],
                             use_dora=True, fan_in_fan_out=variant == "gpt2")
    model = peft.get_peft_model(base, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model.eval()


def ours_like(theirs, variant: str, dropout: float = 0.0):
    """(Functional, params, adapted module paths) of our model with DoRA holding the PEFT model's weights."""
    model = build_model(hf_config(variant), "causal_lm", jnp.float32, 0)
    adapted = lora.inject(model, lora_config(variant, dropout))
    weights, mags = {}, {}
    for k, v in theirs.state_dict().items():
        k = k.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".default.", ".")
        if k.endswith(".lora_magnitude_vector.weight"):
            mags[k[: -len(".lora_magnitude_vector.weight")]] = v.numpy()
        else:
            weights[k] = v.numpy()
    params, report = load_weights(model, weights, "peft")
    assert sorted(report.missing) == sorted(f"{m}.{lora.MAGNITUDE}" for m in adapted) and sorted(mags) == adapted
    for m, value in mags.items():
        w = params[f"{m}.kernel"] if f"{m}.kernel" in params else params[f"{m}.weight"]
        params[f"{m}.{lora.MAGNITUDE}"] = jnp.asarray(lora.magnitude_delta(w, value))
    return Functional(model), params, adapted


class FixedDropout(torch.nn.Module):
    """PEFT's lora_dropout with our mask: x / (1 - rate) where kept, else 0 (as layers.dropout)."""

    def __init__(self, keep):
        super().__init__()
        self.keep = torch.from_numpy(np.array(keep))

    def forward(self, x):
        return torch.where(self.keep, x / (1.0 - RATE), torch.zeros_like(x))


def with_our_masks(theirs, adapted, key, batch_shape):
    """Gives every adapted PyTorch layer the dropout mask our layer number i draws from fold_in(key, 7919 + i)."""
    modules = dict(theirs.base_model.model.named_modules())
    for i, name in enumerate(adapted):
        layer = modules[name]
        features = layer.in_features
        keep = layers.dropout_keep(jax.random.fold_in(key, 7919 + i), (*batch_shape, features), RATE)
        layer.lora_dropout["default"] = FixedDropout(keep)


def loss_inputs(seed=0):
    ids, mask = padded_batch("right", seed=seed)
    proj = np.random.RandomState(seed + 5).randn(*ids.shape, VOCAB).astype(np.float32) * mask[..., None]
    return ids, mask, proj


def torch_logits(model, ids, mask):
    return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["eval", "train-dropout"])
def test_forward_and_gradients_equal_peft(variant, mode):
    dropout = RATE if mode == "train-dropout" else 0.0
    theirs = peft_model(variant, dropout)
    apply, params, adapted = ours_like(theirs, variant, dropout)
    ids, mask, proj = loss_inputs()
    key = jax.random.key(7) if mode == "train-dropout" else None
    if key is not None:
        with_our_masks(theirs, adapted, key, ids.shape)
        theirs.train()  # PEFT's training path: the base output of the dropped-out input, recomputed

    ref = torch_logits(theirs, ids, mask)
    (ref * torch.from_numpy(proj)).sum().backward()
    train = {k: v for k, v in params.items() if lora.is_adapter(k)}
    frozen = {k: v for k, v in params.items() if not lora.is_adapter(k)}

    def loss(train):
        logits = apply.apply({**frozen, **train}, jnp.asarray(ids), jnp.asarray(mask), rng=key)
        return (logits * proj).sum(), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(train)
    real = mask == 1
    np.testing.assert_allclose(np.asarray(logits)[real], ref.detach().numpy()[real], atol=1e-5, rtol=0)

    named = dict(theirs.named_parameters())
    for m in adapted:
        pt = f"base_model.model.{m}"
        for ours_key, theirs_key, t in ((f"{m}.lora_A.kernel", f"{pt}.lora_A.default.weight", True),
                                        (f"{m}.lora_B.kernel", f"{pt}.lora_B.default.weight", True),
                                        (f"{m}.{lora.MAGNITUDE}", f"{pt}.lora_magnitude_vector.default.weight", False)):
            g = named[theirs_key].grad.numpy()
            g = g.T if t else g
            assert np.abs(g).max() > 1e-3, theirs_key  # every adapter param gets a real gradient
            np.testing.assert_allclose(np.asarray(grads[ours_key]), g, rtol=1e-4, atol=1e-5 * np.abs(g).max(),
                                       err_msg=ours_key)
    if key is not None:  # the masks mattered: evaluation gives other logits
        evaluated = jax.jit(lambda p: apply.apply(p, jnp.asarray(ids), jnp.asarray(mask)))(params)
        assert np.abs(np.asarray(evaluated) - np.asarray(logits))[real].max() > 1e-3


def test_the_weight_norm_is_a_constant_of_the_backward_pass():
    """Were ||W + s·B·A|| differentiated, the magnitude's gradient would differ from PEFT's (checked above) and
    B's would too: here the factor g = m / ||…|| has no gradient with respect to A or B."""
    w = jax.random.normal(jax.random.key(0), (6, 5))
    a, b = jax.random.normal(jax.random.key(1), (6, 2)), jax.random.normal(jax.random.key(2), (2, 5))
    delta = jnp.full((5,), 0.3)
    ga, gb, gd = jax.grad(lambda a, b, d: lora.dora_factor(w, a, b, d, 2.0).sum(), argnums=(0, 1, 2))(a, b, delta)
    assert not np.any(np.asarray(ga)) and not np.any(np.asarray(gb))
    np.testing.assert_allclose(np.asarray(gd), 1 / np.linalg.norm(np.asarray(w + 2.0 * a @ b), axis=0), rtol=1e-6)


def test_injected_magnitude_starts_at_the_weight_norm_as_peft_does():
    """Fresh adapters (B = 0) change nothing: PEFT starts m at ||W||, our stored offset m - ||W|| at 0."""
    theirs = hf_model(hf_config("llama"))
    model = peft.get_peft_model(theirs, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS["llama"],
                                                        use_dora=True)).eval()
    ours = build_model(hf_config("llama"), "causal_lm", jnp.float32, 0)
    adapted = lora.inject(ours, lora_config("llama"))
    params, _ = load_weights(ours, {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v.numpy()
                                    for k, v in model.state_dict().items() if "lora_" not in k}, "test")
    assert all(not np.any(np.asarray(params[f"{m}.{lora.MAGNITUDE}"])) for m in adapted)
    mags = lora.magnitudes(params)
    for m in adapted:
        ref = model.base_model.model.get_submodule(m).lora_magnitude_vector["default"].weight.detach().numpy()
        np.testing.assert_allclose(np.asarray(mags[m]), ref, rtol=1e-6)
    ids, mask, _ = loss_inputs(1)
    with torch.no_grad():
        ref = torch_logits(model, ids, mask).numpy()
    real = mask == 1
    np.testing.assert_allclose(np.asarray(Functional(ours).apply(params, ids, mask))[real], ref[real], atol=1e-5)


def test_merged_export_and_peft_adapter_folder_give_peft_logits(tmp_path):
    theirs = peft_model("llama")
    apply, params, adapted = ours_like(theirs, "llama")
    ids, mask, _ = loss_inputs(2)
    real = mask == 1
    with torch.no_grad():
        ref = torch_logits(theirs, ids, mask).numpy()
    config = defaults.base_config()
    config.task, config.model.name_or_path = "causal_lm", "tiny-llama"
    config.lora.update(dict(lora_config("llama")))
    apply.trainable = lora.trainable_predicate(None, "causal_lm")
    cfg = hf_config("llama")

    merged = tmp_path / "merged"
    export.write_weights(lora.merge(params, apply.lora_scales), merged, np.float32)
    cfg.save_pretrained(merged)
    tuned = tf.AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
    with torch.no_grad():
        np.testing.assert_allclose(torch_logits(tuned, ids, mask).numpy()[real], ref[real], atol=1e-5)

    folder = tmp_path / "adapters"
    folder.mkdir()
    export.write_peft_adapters(params, apply, config, cfg, folder, np.float32)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["r"] == RANK
    from safetensors.numpy import load_file

    keys = load_file(folder / "adapter_model.safetensors")
    assert sorted(k for k in keys if "magnitude" in k) == sorted(f"base_model.model.{m}.lora_magnitude_vector"
                                                                for m in adapted)  # the key PEFT itself writes
    loaded = peft.PeftModel.from_pretrained(hf_model(cfg), folder).eval()
    with torch.no_grad():
        np.testing.assert_allclose(torch_logits(loaded, ids, mask).numpy()[real], ref[real], atol=1e-5)
    # and ours gives them too
    np.testing.assert_allclose(np.asarray(apply.apply(params, ids, mask))[real], ref[real], atol=1e-5)


def test_merge_on_devices_equals_the_host_merge():
    rs = np.random.RandomState(0)
    w, a, b, d = (rs.randn(*s).astype(np.float32) for s in ((8, 6), (8, 2), (2, 6), (6,)))
    params = {"q.kernel": w, "q.lora_A.kernel": a, "q.lora_B.kernel": b, f"q.{lora.MAGNITUDE}": d}
    host = lora.merge(params, {"q": 0.5})["q.kernel"]
    dev = lora.merge({**params, "q.kernel": jnp.asarray(w)}, {"q": 0.5})["q.kernel"]
    np.testing.assert_allclose(np.asarray(dev), host, rtol=1e-5)
    merged = w + 0.5 * a @ b
    np.testing.assert_allclose(np.linalg.norm(host, axis=0), np.linalg.norm(w, axis=0) + d, rtol=1e-5)  # ||W'|| = m
    np.testing.assert_allclose(host / np.linalg.norm(host, axis=0), merged / np.linalg.norm(merged, axis=0),
                               rtol=1e-5, atol=1e-6)  # direction of W + s·A·B


def test_magnitude_shards_like_the_layers_output():
    from jax.sharding import PartitionSpec as P

    from jaxsft import parallel
    from jaxsft.models import decoder

    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    spec = lambda name, shape: parallel.spec_for(name, shape, decoder.PARTITION_RULES, sizes)  # noqa: E731
    assert spec(f"model.layers.0.self_attn.q_proj.{lora.MAGNITUDE}", (64,)) == P("tensor")
    assert spec(f"model.layers.0.self_attn.o_proj.{lora.MAGNITUDE}", (64,)) == P("fsdp")
    assert lora.is_adapter(f"model.layers.0.self_attn.q_proj.{lora.MAGNITUDE}")


def test_unsupported_combinations_are_one_line():
    config = defaults.base_config()
    config.lora.use_dora = True
    with pytest.raises(UserError, match=r"^config\.lora\.use_dora=True needs config\.lora\.rank > 0"):
        config_lib.check_values(config)
    config.lora.rank, config.optimizer = 4, "adafactor"
    with pytest.raises(UserError, match=r"^config\.lora\.use_dora=True with optimizer=adafactor is not supported"):
        config_lib.check_values(config)
    config.optimizer = "adamw"
    config_lib.check_values(config)

    from jaxsft import pipeline

    config.task, config.model.scan_layers = "causal_lm", True
    with pytest.raises(UserError, match=r"^config\.model\.scan_layers=True with LoRA"):
        pipeline.build(tf.LlamaConfig(**SMALL), config)
    cls = build_model(tf.LlamaConfig(**SMALL, num_labels=2), "classification", jnp.float32, 0)
    with pytest.raises(UserError, match=r"^lora\.use_dora: lora\.target_modules matched score, the new task head"):
        lora.inject(cls, ml_collections.ConfigDict({**dict(lora_config("llama")), "target_modules": ["q_proj",
                                                                                                     "score"]}))


@pytest.mark.slow
def test_sft_cli_trains_evaluates_and_exports_dora(tmp_path):
    model = make_tiny_decoder(tmp_path / "llama")
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(64, seed=0))
    evals = write_jsonl(tmp_path / "eval.jsonl", alpaca_rows(16, seed=1))
    w = tmp_path / "w"
    cli("run", "--config", "configs/sft.py", "--workdir", w, f"--config.model.name_or_path={model}",
        f"--config.data.train={train}", f"--config.data.eval={evals}", "--config.max_steps=8",
        "--config.learning_rate=1e-2", "--config.max_length=128", "--config.batch_size=8", "--config.dtype=float32",
        "--config.warmup_steps=0", "--config.lora.rank=4", "--config.lora.alpha=8", "--config.lora.dropout=0.1",
        "--config.lora.use_dora=True", "--config.lora.target_modules=q_proj,v_proj,down_proj")
    rows = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    losses, evaluated = [r["loss"] for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]
    assert losses and all(np.isfinite(losses)) and evaluated and np.isfinite(evaluated[-1]["eval_loss"])
    assert json.loads((w / "config.json").read_text())["lora"]["use_dora"] is True
    merged, adapters = tmp_path / "merged", tmp_path / "adapters"
    cli("export", "--workdir", w, "--output", merged)
    cli("export", "--workdir", w, "--output", adapters, "--adapters_only")
    assert json.loads((adapters / "adapter_config.json").read_text())["use_dora"] is True

    base = tf.AutoModelForCausalLM.from_pretrained(model).eval()
    tuned = tf.AutoModelForCausalLM.from_pretrained(merged).eval()
    with_peft = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(model), adapters).eval()
    for m in ("q_proj", "v_proj", "down_proj"):  # the magnitudes trained away from their start, ||W||
        layer = with_peft.base_model.model.model.layers[0].get_submodule("mlp" if m == "down_proj" else "self_attn")
        layer = getattr(layer, m)
        start = torch.linalg.norm(layer.base_layer.weight, dim=1)
        assert (layer.lora_magnitude_vector["default"].weight - start).abs().max() > 1e-4, m
    ids = torch.tensor([[101, 2000, 2001, 2002, 2003, 2004]])
    with torch.no_grad():
        a, b = tuned(input_ids=ids).logits, with_peft(input_ids=ids).logits
    assert (a - base(input_ids=ids).logits).abs().max() > 1e-4  # the adapters changed the model
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    out = json.loads(cli("evaluate", "--workdir", w).stdout.strip().splitlines()[-1])
    assert np.isfinite(out["eval_loss"])
