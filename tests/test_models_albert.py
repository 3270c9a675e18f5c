"""ALBERT classifiers against transformers' PyTorch AlbertForSequenceClassification: logits with padding and token
types for the layer-sharing layouts transformers supports (one shared layer, several groups, several layers per
group, groups not dividing the depth), scanned and rematerialised runs, checkpoint names both ways (base-model and
pre-training checkpoints), export round trip, LoRA targets as PEFT matches them, sharding rules, and the CLIs end to
end (run → evaluate → export → transformers)."""

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
    jax_logits,
    load_config_with_command,
    torch_logits,
)
from test_models_encoders import padded_batch

from jaxsft import hf_io
from jaxsft.errors import UserError
from jaxsft.models import Functional, build_model, hf_name, load_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402


def albert_config(**kw):
    base = dict(vocab_size=211, embedding_size=24, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_labels=3, max_position_embeddings=64, initializer_range=0.2)
    return tf.AlbertConfig(**{**base, **kw})


CASES = {  # num_hidden_layers, num_hidden_groups, inner_group_num
    "shared-1-group": dict(num_hidden_layers=3),
    "2-groups-of-2-layers": dict(num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2),
    "2-groups-over-3-layers": dict(num_hidden_layers=3, num_hidden_groups=2),
    "regression": dict(num_labels=1),
    "relu-same-width": dict(embedding_size=48, hidden_act="relu"),
}


def saved(folder, seed: int = 1, **kw):
    torch.manual_seed(seed)
    model = tf.AlbertForSequenceClassification(albert_config(**kw)).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_with_padding(case, tmp_path):
    model = saved(tmp_path, **CASES[case])
    ids, mask, types = padded_batch()
    ref = torch_logits(model, ids, mask, types)
    ours, params, report = jax_logits(tmp_path, ids, mask, types)
    assert not report.missing and not report.unexpected
    assert ours.shape == ref.shape == (4, model.config.num_labels)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1e-2  # a real signal, not all zeros
    groups = {k.split(".")[3] for k in params if ".albert_layer_groups." in k}
    assert len(groups) == model.config.num_hidden_groups  # one set of weights per group, however deep


@pytest.mark.parametrize("case", ["shared-1-group", "2-groups-of-2-layers", "2-groups-over-3-layers"])
def test_scanned_and_rematerialised_layers_give_the_same_logits_and_names(case, tmp_path):
    model = saved(tmp_path, seed=2, **CASES[case])
    ids, mask, types = padded_batch(seed=1)
    ref = torch_logits(model, ids, mask, types)
    plain, plain_params, _ = jax_logits(tmp_path, ids, mask, types)
    ours, params, _ = jax_logits(tmp_path, ids, mask, types, scan_layers=True, remat="dots")
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert params.keys() == plain_params.keys()  # shared weights are not stacked: the same names either way


def test_training_forward_applies_dropout_and_is_deterministic_per_rng(tmp_path):
    saved(tmp_path, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.1, classifier_dropout_prob=0.3)
    model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    params, _ = load_weights(model, hf_io.read_weights(tmp_path), str(tmp_path))
    ids, mask, types = padded_batch()
    trained = {}
    for scan in (False, True):
        model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0,
                            {"scan_layers": scan})
        f = jax.jit(Functional(model).apply)
        a, b = f(params, ids, mask, types, rng=jax.random.key(0)), f(params, ids, mask, types, rng=jax.random.key(0))
        c, plain = f(params, ids, mask, types, rng=jax.random.key(1)), f(params, ids, mask, types)
        np.testing.assert_array_equal(a, b)
        assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-6
        assert np.abs(np.asarray(a) - np.asarray(plain)).max() > 1e-6
        trained[scan] = np.asarray(a)
    # the same dropout masks scanned or not: each application's keys come from its layer index
    np.testing.assert_allclose(trained[True], trained[False], atol=1e-5, rtol=0)


def test_more_groups_than_layers_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"num_hidden_groups=4 with num_hidden_layers=3 .* is not supported"):
        build_model(albert_config(num_hidden_groups=4), "classification", jnp.float32, 0)


def test_base_model_checkpoint_loads_the_backbone_and_reports_the_new_head(tmp_path):
    torch.manual_seed(0)
    tf.AlbertModel(albert_config()).save_pretrained(tmp_path)  # names without "albert."
    model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    params, report = load_weights(model, hf_io.read_weights(tmp_path), str(tmp_path))
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"] and not report.unexpected
    name = "encoder.albert_layer_groups.0.albert_layers.0.ffn.weight"
    np.testing.assert_array_equal(params["albert.encoder.albert_layer_groups.0.albert_layers.0.ffn.kernel"],
                                  hf_io.read_weights(tmp_path)[name].T)


@pytest.mark.parametrize("make", [
    lambda: tf.AlbertForMaskedLM(albert_config()),  # albert-base-v2
    lambda: tf.AlbertForPreTraining(albert_config()),  # MLM + sentence-order heads
], ids=["masked-lm", "pretraining"])
def test_pretraining_heads_of_hub_checkpoints_are_ignored(make, tmp_path):
    torch.manual_seed(0)
    make().save_pretrained(tmp_path)
    model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    params, report = load_weights(model, hf_io.read_weights(tmp_path), str(tmp_path))
    assert not report.unexpected, report.unexpected
    assert all(n.startswith(("classifier.", "albert.pooler.")) for n in report.missing), report.missing
    theirs = dict(tf.AlbertForSequenceClassification.from_pretrained(tmp_path).named_parameters())
    for name, value in params.items():
        if name.startswith("albert.encoder."):
            hf, transpose = hf_name(name)
            want = theirs[hf].detach().numpy()
            np.testing.assert_array_equal(np.asarray(value), want.T if transpose else want)


@pytest.mark.parametrize("case", ["shared-1-group", "2-groups-of-2-layers"])
def test_export_round_trip_loads_in_transformers_with_equal_logits(case, tmp_path):
    saved(tmp_path / "src", seed=3, **CASES[case])
    check_export_round_trip(tmp_path, tmp_path / "src", *padded_batch(seed=3))


def test_lora_targets_are_the_modules_peft_adapts():
    adapted = check_lora_targets_match_peft(albert_config(**CASES["2-groups-of-2-layers"]),
                                            tf.AlbertForSequenceClassification,
                                            ["query", "key", "value", "dense", "ffn", "ffn_output"])
    assert len(adapted) == 2 * 2 * 6  # groups x layers per group x targets: shared, however deep


@pytest.mark.parametrize("scan", [False, True])
def test_partition_rules_cover_every_large_kernel(scan):
    from jaxsft.models import albert

    check_partition_rules_cover_every_large_kernel(albert_config(**CASES["2-groups-of-2-layers"]), albert,
                                                   {"scan_layers": scan})


def test_config_starts_with_its_command_and_loads():
    c = load_config_with_command("classify_albert")
    assert c.model.name_or_path == "albert/albert-base-v2" and c.model.scan_layers


def make_tiny_albert(out, num_labels: int = 2):
    """A tiny random ALBERT classifier (embedding projection, one shared layer run twice) with MiniLM's tokenizer."""
    tok = tf.AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    tf.AlbertForSequenceClassification(tf.AlbertConfig(
        embedding_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=tok.vocab_size, num_labels=num_labels, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow  # three CLI runs + an export: ~50 s idle
def test_cli_trains_evaluates_and_exports_with_transformers_predictions(tmp_path):
    check_cli_round_trip(tmp_path, "classify_albert", make_tiny_albert(tmp_path / "ckpt"), "albert")
