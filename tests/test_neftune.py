"""NEFTune (config.neftune_noise_alpha) equal to transformers' definition: the training forward of our model with
its noise equals transformers' model with `neftune_post_forward_hook` adding that same noise (so the noise sits
where transformers puts it, with transformers' magnitude alpha / sqrt(L * d)); evaluation is untouched; families
without it refuse the key; the SFT CLI trains with it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import alpaca_rows, make_tiny_decoder, write_jsonl
from test_models_decoder import SMALL, VOCAB, hf_model
from test_sft import cli

from jaxsft.errors import UserError
from jaxsft.models import Functional, build_model, layers, load_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402
from transformers.integrations.neftune import neftune_post_forward_hook  # noqa: E402

ALPHA = 5.0


def test_noise_magnitude_and_shape_follow_the_definition():
    x = jnp.zeros((4, 96, 32), jnp.float32)
    key = jax.random.key(0)
    noise = np.asarray(layers.neftune(x, ALPHA, key))
    mag = ALPHA / np.sqrt(96 * 32)
    assert np.abs(noise).max() <= mag and np.abs(noise).max() > 0.99 * mag
    assert abs(noise.mean()) < 0.02 * mag and abs(noise.std() - mag / np.sqrt(3)) < 0.02 * mag  # uniform
    assert not np.array_equal(noise, np.asarray(layers.neftune(x, ALPHA, jax.random.key(1))))  # a fresh draw per key
    assert layers.neftune(x, ALPHA, None) is x and layers.neftune(x, 0.0, key) is x  # evaluation; off
    bf = layers.neftune(x.astype(jnp.bfloat16), ALPHA, key)
    assert bf.dtype == jnp.bfloat16


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_training_forward_equals_transformers_with_the_neftune_hook(variant, monkeypatch):
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if variant == "gpt2" \
        else tf.LlamaConfig(**SMALL)
    theirs = hf_model(cfg)
    weights = {k: v.numpy() for k, v in theirs.state_dict().items()}
    ours = build_model(cfg, "causal_lm", jnp.float32, 0, {"neftune_noise_alpha": ALPHA})
    params, _ = load_weights(ours, weights, "test")
    apply = Functional(ours).apply
    rs = np.random.RandomState(0)
    ids = rs.randint(1, VOCAB, size=(3, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    key = jax.random.key(3)

    train_logits = np.asarray(apply(params, jnp.asarray(ids), jnp.asarray(mask), rng=key))
    eval_logits = np.asarray(apply(params, jnp.asarray(ids), jnp.asarray(mask)))
    hidden = 32
    noise = np.asarray(layers.neftune(jnp.zeros((3, 12, hidden), jnp.float32), ALPHA, key))

    asked = []
    real_uniform = torch.Tensor.uniform_

    def our_noise(self, a, b):  # transformers' hook draws with uniform_(-mag, mag): ours instead, same bounds
        asked.append((float(a), float(b)))
        return self.copy_(torch.from_numpy(noise.copy()))

    emb = theirs.get_input_embeddings()
    emb.neftune_noise_alpha = ALPHA
    emb.register_forward_hook(neftune_post_forward_hook)
    monkeypatch.setattr(torch.Tensor, "uniform_", our_noise)
    theirs.train()
    with torch.no_grad():
        ref_train = theirs(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)).logits.numpy()
    monkeypatch.setattr(torch.Tensor, "uniform_", real_uniform)
    theirs.eval()
    with torch.no_grad():
        ref_eval = theirs(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)).logits.numpy()

    mag = ALPHA / np.sqrt(12 * hidden)
    assert asked == [pytest.approx((-mag, mag), rel=1e-6)]  # transformers' magnitude is ours
    real = mask.astype(bool)
    np.testing.assert_allclose(train_logits[real], ref_train[real], atol=1e-4)
    np.testing.assert_allclose(eval_logits[real], ref_eval[real], atol=1e-4)
    assert np.abs(train_logits - eval_logits)[real].max() > 1e-3  # the noise matters


def test_families_without_neftune_refuse_it_in_one_line():
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4)
    with pytest.raises(UserError, match=r"^config\.neftune_noise_alpha=5\.0 is not available for bert models"):
        build_model(cfg, "classification", jnp.float32, 0, {"neftune_noise_alpha": 5.0})


@pytest.mark.slow
def test_sft_cli_trains_with_neftune(tmp_path):
    model = make_tiny_decoder(tmp_path / "m")
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(48))
    losses = {}
    for alpha in (0.0, ALPHA):
        w = tmp_path / f"w{alpha}"
        cli("run", "--config", "configs/sft.py", "--workdir", w, f"--config.model.name_or_path={model}",
            f"--config.data.train={data}", "--config.max_steps=4", "--config.log_every_steps=1",
            "--config.max_length=128", "--config.batch_size=4", "--config.dtype=float32", "--config.warmup_steps=0",
            "--config.learning_rate=1e-2", f"--config.neftune_noise_alpha={alpha}")
        rows = [json.loads(ln) for ln in (w / "metrics.jsonl").read_text().splitlines()]
        losses[alpha] = [r["loss"] for r in rows if "loss" in r]
        assert json.loads((w / "config.json").read_text())["neftune_noise_alpha"] == alpha
    assert len(losses[ALPHA]) == 4 and all(np.isfinite(losses[ALPHA]))
    assert losses[0.0] != losses[ALPHA]  # the noise changed training
    assert losses[0.0][0] == pytest.approx(losses[ALPHA][0], rel=0.05)  # ... without breaking it
