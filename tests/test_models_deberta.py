"""DeBERTa-v2/v3 classifiers against transformers' DebertaV2ForSequenceClassification: logits with padding for v3
(shared keys, log buckets, no absolute positions), v2-style (separate position projections, absolute positions,
token types, embedding projection), c2p-only, no relative attention, the convolution after layer 0; relative
buckets as transformers computes them; checkpoint names both ways; export round trip; LoRA targets; sharding rules;
and configs/classify_deberta.py end to end through the CLIs (run → evaluate → export → transformers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
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
from flax import nnx

from jaxsft import hf_io
from jaxsft.models import Functional, build_model, flatten_state, hf_name, load_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402

from jaxsft.models import deberta  # noqa: E402

LENGTHS = [17, 9, 3, 12]
SMALL = dict(vocab_size=211, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=64, num_labels=3, initializer_range=0.2)
# microsoft/deberta-v3-base's attention settings (position_buckets 256 there; 8 here, so that rows of 17 tokens
# reach the log-spaced buckets)
V3 = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=-1,
          share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0)


def config(**kw):
    return tf.DebertaV2Config(**{**SMALL, **V3, **kw})


CASES = {
    "v3": lambda: config(),
    "v3-regression": lambda: config(num_labels=1),
    # v2-style: separate pos_key_proj / pos_query_proj, absolute positions, token types, no buckets (distances
    # clipped at 12 < 17), no rel LayerNorm, an embedding projection, tanh pooler, its own classifier dropout
    "v2-separate-keys": lambda: config(share_att_key=False, position_biased_input=True, type_vocab_size=2,
                                       position_buckets=-1, max_relative_positions=12, norm_rel_ebd="none",
                                       embedding_size=24, pooler_hidden_act="tanh", cls_dropout=0.2),
    "c2p-only": lambda: config(pos_att_type=["c2p"], share_att_key=False),
    "p2c-only": lambda: config(pos_att_type=["p2c"]),
    "no-relative-attention": lambda: config(relative_attention=False, pos_att_type=None, position_biased_input=True,
                                            type_vocab_size=2),
    "conv": lambda: config(conv_kernel_size=3, conv_act="gelu"),
}


def padded_batch(seed: int = 0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(5, SMALL["vocab_size"], (len(LENGTHS), max(LENGTHS)))
    mask = (np.arange(ids.shape[1])[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
    types = (np.arange(ids.shape[1])[None, :] >= 8).astype(np.int64).repeat(len(LENGTHS), 0) * mask
    return np.where(mask == 1, ids, 0), mask, types


def save_case(case: str, folder, seed: int = 1):
    torch.manual_seed(seed)
    model = tf.DebertaV2ForSequenceClassification(CASES[case]()).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_with_padding(case, tmp_path):
    model = save_case(case, tmp_path)
    ids, mask, types = padded_batch()
    ref = torch_logits(model, ids, mask, types)
    ours, params, report = jax_logits(tmp_path, ids, mask, types)
    assert not report.missing and not report.unexpected
    assert ours.shape == ref.shape == (4, model.config.num_labels)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1e-2  # a real signal, not all zeros
    if case == "v2-separate-keys":
        assert {"deberta.embeddings.embed_proj.kernel", "deberta.encoder.layer.0.attention.self.pos_key_proj.kernel",
                "deberta.embeddings.position_embeddings.embedding"} <= set(params)
    if case == "v3":
        assert not any("pos_key_proj" in k or "position_embeddings" in k or "token_type" in k for k in params)


def test_padding_changes_nothing_for_the_real_tokens(tmp_path):
    """A row's logits do not depend on how much padding follows it (the relative terms of padded keys are masked)."""
    save_case("v3", tmp_path)
    ids, mask, types = padded_batch()
    full, _, _ = jax_logits(tmp_path, ids, mask, types)
    short, _, _ = jax_logits(tmp_path, ids[:, :12], mask[:, :12], types[:, :12])
    np.testing.assert_allclose(short[1:], full[1:], atol=1e-5, rtol=0)  # rows 1..3 have at most 12 tokens


@pytest.mark.parametrize("buckets, max_position", [(256, 512), (256, 1024), (8, 64), (64, 128)])
def test_relative_positions_equal_transformers_buckets(buckets, max_position):
    from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

    length = 1500
    ours = deberta.relative_positions(length, buckets, max_position)
    x = torch.zeros(1, length, 1)
    theirs = hf.build_relative_position(x, x, bucket_size=buckets, max_position=max_position)[0].numpy()
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("case", ["v3", "conv"])
def test_scanned_and_rematerialised_layers_give_the_same_logits(case, tmp_path):
    model = save_case(case, tmp_path, seed=2)
    ids, mask, types = padded_batch(seed=1)
    ref = torch_logits(model, ids, mask, types)
    for options in ({"remat": "full"}, {"scan_layers": True, "remat": "dots"}):
        ours, params, _ = jax_logits(tmp_path, ids, mask, types, **options)
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    stacked = [k for k in params if ".layer." in k and k.endswith("kernel")]  # the scanned run's
    assert stacked and all(params[k].shape[0] == 3 for k in stacked)


def test_training_forward_applies_dropout_and_is_deterministic_per_rng(tmp_path):
    torch.manual_seed(0)
    tf.DebertaV2ForSequenceClassification(config(hidden_dropout_prob=0.3)).save_pretrained(tmp_path)
    model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    params, _ = load_weights(model, hf_io.read_weights(tmp_path), str(tmp_path))
    ids, mask, types = padded_batch()
    f = jax.jit(Functional(model).apply)
    a, b = f(params, ids, mask, types, rng=jax.random.key(0)), f(params, ids, mask, types, rng=jax.random.key(0))
    c, plain = f(params, ids, mask, types, rng=jax.random.key(1)), f(params, ids, mask, types)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-6
    assert np.abs(np.asarray(a) - np.asarray(plain)).max() > 1e-6


def test_base_model_checkpoint_loads_the_backbone_and_reports_the_new_head(tmp_path):
    torch.manual_seed(0)
    tf.DebertaV2Model(config()).save_pretrained(tmp_path)  # names without "deberta."
    model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    params, report = load_weights(model, hf_io.read_weights(tmp_path), str(tmp_path))
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight", "pooler.dense.bias",
                                      "pooler.dense.weight"]
    assert not report.unexpected
    np.testing.assert_array_equal(params["deberta.encoder.rel_embeddings.embedding"],
                                  hf_io.read_weights(tmp_path)["encoder.rel_embeddings.weight"])


@pytest.mark.parametrize("legacy", [True, False], ids=["cls-predictions", "lm-predictions"])
def test_masked_lm_heads_of_hub_checkpoints_are_ignored(legacy, tmp_path):
    torch.manual_seed(0)
    tf.DebertaV2ForMaskedLM(config(legacy=legacy)).save_pretrained(tmp_path)
    weights = hf_io.read_weights(tmp_path)
    # v3 hub checkpoints also carry an absolute position table their config does not use, and an RTD head
    weights["deberta.embeddings.position_embeddings.weight"] = np.zeros((64, 48), np.float32)
    weights["mask_predictions.classifier.weight"] = np.zeros((1, 48), np.float32)
    model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    params, report = load_weights(model, weights, str(tmp_path))
    assert not report.unexpected, report.unexpected
    assert all(n.startswith(("classifier.", "pooler.")) for n in report.missing), report.missing
    theirs = dict(tf.AutoModelForSequenceClassification.from_pretrained(tmp_path).named_parameters())
    checked = 0
    for name, value in params.items():
        if name.startswith("deberta."):
            hf, transpose = hf_name(name)
            want = theirs[hf].detach().numpy()
            np.testing.assert_array_equal(np.asarray(value), want.T if transpose else want)
            checked += 1
    assert checked > 10


@pytest.mark.parametrize("case", ["v3", "conv"])
def test_export_round_trip_loads_in_transformers_with_equal_logits(case, tmp_path):
    save_case(case, tmp_path / "src", seed=3)
    check_export_round_trip(tmp_path, tmp_path / "src", *padded_batch(seed=3))


def test_lora_targets_are_transformers_module_names():
    adapted = check_lora_targets_match_peft(config(share_att_key=False), tf.DebertaV2ForSequenceClassification, [
        "query_proj", "key_proj", "value_proj", "pos_key_proj", "pos_query_proj", "dense"])
    assert len(adapted) == 3 * 8 + 1  # per layer q/k/v, 2 position projections, 3 dense; the pooler's


def test_lora_on_shared_query_and_key_projections_adapts_the_relative_terms_too(tmp_path):
    """With share_att_key, query_proj and key_proj also project the relative table (as in transformers, where
    PEFT's wrapped module serves both calls): a nonzero adapter changes the logits through both paths."""
    from jaxsft.models import lora

    save_case("v3", tmp_path)
    model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    lora.inject(model, ml_collections.ConfigDict(dict(rank=2, alpha=2.0, dropout=0.0, target_modules=["key_proj"],
                                                      use_dora=False, quantize="")))
    params, report = load_weights(model, hf_io.read_weights(tmp_path), str(tmp_path))
    ids, mask, types = padded_batch()
    f = jax.jit(Functional(model).apply)
    base = f(params, ids, mask, types)
    bumped = {k: v + 0.1 if "lora_B" in k else v for k, v in params.items()}
    assert np.abs(np.asarray(f(bumped, ids, mask, types)) - np.asarray(base)).max() > 1e-4
    merged = dict(lora.merge(bumped, Functional(model).lora_scales))
    plain = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    np.testing.assert_allclose(jax.jit(Functional(plain).apply)(merged, ids, mask, types), f(bumped, ids, mask, types),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["v3", "v2-separate-keys", "conv"])
@pytest.mark.parametrize("scan", [False, True])
def test_partition_rules_cover_every_large_kernel(case, scan):
    check_partition_rules_cover_every_large_kernel(CASES[case](), deberta, {"scan_layers": scan})


def test_rows_longer_than_an_absolute_position_table_are_refused(tmp_path):
    """With position_biased_input the table bounds the length (a gather past it would clamp silently); v3's
    relative buckets have no such bound."""
    from jaxsft.errors import UserError

    def logits(case):
        model = build_model(CASES[case](), "classification", jnp.float32, 0)
        ids = np.ones((1, 65), np.int32)
        return Functional(model).apply(flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param))), ids, ids, ids * 0)

    with pytest.raises(UserError, match="sequence length 65 exceeds the model's 64 positions"):
        logits("v2-separate-keys")
    assert logits("v3").shape == (1, 3)


def test_even_convolution_kernel_is_refused_in_one_line():
    from jaxsft.errors import UserError

    with pytest.raises(UserError, match="conv_kernel_size=4 in config.json: only odd sizes"):
        build_model(config(conv_kernel_size=4), "classification", jnp.float32, 0)


def make_tiny_deberta(out, num_labels: int = 2):
    """A tiny random DeBERTa-v3-style classifier with MiniLM's WordPiece tokenizer (DeBERTa-v3's own is
    sentencepiece; any tokenizer whose ids fit the vocabulary will do)."""
    tok = tf.AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    model = tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**{
        **V3, "position_buckets": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": tok.vocab_size, "num_labels": num_labels,
        "max_position_embeddings": 128, "pad_token_id": tok.pad_token_id}))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_config_starts_with_its_command_and_names_deberta_v3():
    c = load_config_with_command("classify_deberta")
    assert c.model.name_or_path == "microsoft/deberta-v3-base" and c.task == "classification"


@pytest.mark.slow  # three CLI runs + an export: ~100 s idle
def test_cli_trains_evaluates_and_exports_with_transformers_predictions(tmp_path):
    check_cli_round_trip(tmp_path, "classify_deberta", make_tiny_deberta(tmp_path / "ckpt"), "deberta-v2")
