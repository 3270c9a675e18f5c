"""ModernBERT classifiers against transformers' PyTorch ModernBertForSequenceClassification: logits with right and
left padding for [CLS] and mean pooling, rows longer than the sliding window (local vs global layers), checkpoint
names both ways (base-model and masked-LM checkpoints), export round trip, LoRA targets as PEFT matches them,
sharding rules, and the CLIs end to end (run → evaluate → export → transformers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import minilm_path
from encoder_checks import (
    check_cli_round_trip,
    check_export_round_trip,
    check_lora_targets_match_peft,
    check_partition_rules_cover_every_large_kernel,
    load_config_with_command,
)
from encoder_checks import jax_logits as jax_logits_with_types
from encoder_checks import torch_logits as torch_logits_with_types

from jaxsft import hf_io
from jaxsft.errors import UserError
from jaxsft.models import Functional, build_model, load_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402

LENGTHS = [17, 9, 3, 12]  # the longest rows pass the sliding window (local_attention=6: 3 slots either side)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)


def modernbert_config(**kw):
    base = dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
                max_position_embeddings=64, local_attention=6, global_attn_every_n_layers=2, num_labels=3,
                initializer_range=0.2, **TOKENS)
    return tf.ModernBertConfig(**{**base, **kw})


CASES = {
    "cls": dict(classifier_pooling="cls"),
    "mean": dict(classifier_pooling="mean"),
    "biases": dict(classifier_pooling="mean", norm_bias=True, attention_bias=True, mlp_bias=True,
                   classifier_bias=True),
    "regression": dict(classifier_pooling="cls", num_labels=1),
    "odd-window-every-3": dict(classifier_pooling="mean", local_attention=7, global_attn_every_n_layers=3),
}


def padded_batch(side: str = "right", seed: int = 0):
    rng = np.random.RandomState(seed)
    t = max(LENGTHS)
    ids = rng.randint(5, 211, (len(LENGTHS), t))
    index = np.arange(t)[None, :] if side == "right" else np.arange(t)[::-1][None, :]
    mask = (index < np.array(LENGTHS)[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, 0), mask


def torch_logits(model, ids, mask):
    return torch_logits_with_types(model, ids, mask, None)


def jax_logits(folder, ids, mask, **options):
    return jax_logits_with_types(folder, ids, mask, np.zeros_like(ids), **options)


def saved(folder, seed: int = 1, **kw):
    torch.manual_seed(seed)
    model = tf.ModernBertForSequenceClassification(modernbert_config(**kw)).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_with_padding(case, side, tmp_path):
    model = saved(tmp_path, **CASES[case])
    ids, mask = padded_batch(side)
    ref = torch_logits(model, ids, mask)
    ours, params, report = jax_logits(tmp_path, ids, mask)
    assert not report.missing and not report.unexpected
    assert ours.shape == ref.shape == (4, model.config.num_labels)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1e-2  # a real signal, not all zeros
    assert "model.layers.0.attn_norm.scale" not in params and "model.layers.1.attn_norm.scale" in params
    assert any(k.endswith("norm.bias") for k in params) == (case == "biases")


def test_sliding_window_layers_see_only_their_window(tmp_path):
    """Rows of 17 slots with a window of 3 either side: a wider window (or none) gives other logits, so the match
    above checks the local layers' mask, not only the global ones'."""
    model = saved(tmp_path / "narrow", classifier_pooling="cls")
    ids, mask = padded_batch()
    ref = torch_logits(model, ids, mask)
    wide = tf.ModernBertForSequenceClassification(modernbert_config(classifier_pooling="cls", local_attention=64))
    wide.load_state_dict(model.state_dict())
    wide.eval().save_pretrained(tmp_path / "wide")
    assert np.abs(torch_logits(wide, ids, mask) - ref)[0].max() > 1e-3  # row 0 (17 tokens) reaches past the window
    ours, _, _ = jax_logits(tmp_path / "wide", ids, mask)
    np.testing.assert_allclose(ours, torch_logits(wide, ids, mask), atol=1e-4, rtol=0)


def test_pad_slots_outside_every_window_follow_the_default_sdpa_attention(tmp_path):
    """With left padding and [CLS] pooling the pooled slot of a short row is a pad that sees no key in the local
    layers: transformers' default SDPA attention gives it zeros (torch's safe softmax), its eager attention an
    average of the masked values; jaxsft follows the default."""
    sdpa = saved(tmp_path, classifier_pooling="cls")
    eager = tf.ModernBertForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert sdpa.config._attn_implementation == "sdpa"
    ids, mask = padded_batch("left")
    ours, _, _ = jax_logits(tmp_path, ids, mask)
    np.testing.assert_allclose(ours, torch_logits(sdpa, ids, mask), atol=1e-4, rtol=0)
    assert np.abs(torch_logits(eager, ids, mask) - ours)[1:].max() > 1e-2


def test_rematerialised_layers_give_the_same_logits_and_scanning_is_refused(tmp_path):
    model = saved(tmp_path, classifier_pooling="mean")
    ids, mask = padded_batch(seed=1)
    ours, _, _ = jax_logits(tmp_path, ids, mask, remat="dots")
    np.testing.assert_allclose(ours, torch_logits(model, ids, mask), atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="model.scan_layers=True is not available for modernbert"):
        build_model(model.config, "classification", jnp.float32, 0, {"scan_layers": True})


def test_training_forward_applies_dropout_and_is_deterministic_per_rng(tmp_path):
    saved(tmp_path, embedding_dropout=0.1, attention_dropout=0.1, mlp_dropout=0.1, classifier_dropout=0.3)
    model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    params, _ = load_weights(model, hf_io.read_weights(tmp_path), str(tmp_path))
    ids, mask = padded_batch()
    f = jax.jit(Functional(model).apply)
    a, b = f(params, ids, mask, rng=jax.random.key(0)), f(params, ids, mask, rng=jax.random.key(0))
    c, plain = f(params, ids, mask, rng=jax.random.key(1)), f(params, ids, mask)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-6
    assert np.abs(np.asarray(a) - np.asarray(plain)).max() > 1e-6


def test_batch_filler_rows_without_tokens_stay_finite_with_mean_pooling(tmp_path):
    saved(tmp_path, classifier_pooling="mean")
    ids, mask = padded_batch()
    mask[3] = 0
    ours, _, _ = jax_logits(tmp_path, ids, mask)
    assert np.isfinite(ours).all()


def test_base_model_checkpoint_loads_the_backbone_and_reports_the_new_head(tmp_path):
    torch.manual_seed(0)
    tf.ModernBertModel(modernbert_config()).save_pretrained(tmp_path)  # names without "model."
    model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    params, report = load_weights(model, hf_io.read_weights(tmp_path), str(tmp_path))
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight", "head.dense.weight", "head.norm.weight"]
    assert not report.unexpected
    np.testing.assert_array_equal(params["model.layers.1.attn.Wqkv.kernel"],
                                  hf_io.read_weights(tmp_path)["layers.1.attn.Wqkv.weight"].T)


def test_masked_lm_checkpoint_gives_its_head_and_drops_its_decoder_as_transformers(tmp_path):
    """answerdotai/ModernBERT-base is a ModernBertForMaskedLM: its `head` has the classifier head's names and
    loads into it (in transformers too), the decoder is ignored; only the classifier is new."""
    torch.manual_seed(0)
    tf.ModernBertForMaskedLM(modernbert_config(decoder_bias=True)).save_pretrained(tmp_path)
    model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    params, report = load_weights(model, hf_io.read_weights(tmp_path), str(tmp_path))
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"] and not report.unexpected
    theirs = tf.ModernBertForSequenceClassification.from_pretrained(tmp_path).eval()
    np.testing.assert_array_equal(np.asarray(params["head.dense.kernel"]), theirs.head.dense.weight.detach().numpy().T)


@pytest.mark.parametrize("case", ["mean", "biases"])
def test_export_round_trip_loads_in_transformers_with_equal_logits(case, tmp_path):
    saved(tmp_path / "src", seed=3, **CASES[case])
    ids, mask = padded_batch(seed=3)
    check_export_round_trip(tmp_path, tmp_path / "src", ids, mask, np.zeros_like(ids))


def test_lora_targets_are_the_modules_peft_adapts():
    adapted = check_lora_targets_match_peft(modernbert_config(), tf.ModernBertForSequenceClassification,
                                            ["Wqkv", "Wo", "Wi"])
    assert len(adapted) == 4 * 4  # per layer attn.Wqkv, attn.Wo, mlp.Wi, mlp.Wo


def test_partition_rules_cover_every_large_kernel():
    from jaxsft.models import modernbert

    check_partition_rules_cover_every_large_kernel(modernbert_config(), modernbert)


def test_config_starts_with_its_command_and_loads():
    c = load_config_with_command("classify_modernbert")
    assert c.model.name_or_path == "answerdotai/ModernBERT-base" and not c.model.scan_layers


def make_tiny_modernbert(out, num_labels: int = 2):
    """A tiny random ModernBERT classifier (mean pooling, a window shorter than the rows) with MiniLM's tokenizer."""
    tok = tf.AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    model = tf.ModernBertForSequenceClassification(tf.ModernBertConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=tok.vocab_size,
        num_labels=num_labels, max_position_embeddings=128, local_attention=8, global_attn_every_n_layers=2,
        classifier_pooling="mean", pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow  # three CLI runs + an export: ~50 s idle
def test_cli_trains_evaluates_and_exports_with_transformers_predictions(tmp_path):
    check_cli_round_trip(tmp_path, "classify_modernbert", make_tiny_modernbert(tmp_path / "ckpt"), "modernbert")
