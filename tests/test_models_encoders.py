"""ELECTRA and DistilBERT classifiers against transformers' PyTorch classes: logits with right padding, checkpoint
names both ways (base-model and pre-training checkpoints), export round trip, LoRA targets, sharding rules, and
one family end to end through the CLIs (run → evaluate → export → transformers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import minilm_path
from flax import nnx

from jaxsft import hf_io
from jaxsft.models import Functional, build_model, flatten_state, hf_name, load_weights, to_hf_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402
from encoder_checks import jax_logits, torch_logits  # noqa: E402

LENGTHS = [17, 9, 3, 12]
SMALL = dict(vocab_size=211, num_labels=3, max_position_embeddings=64, initializer_range=0.2)


def electra_config(embedding_size=24, **kw):
    return tf.ElectraConfig(**{**dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                      embedding_size=embedding_size, **SMALL), **kw})


def distilbert_config(sinusoidal=True, **kw):
    return tf.DistilBertConfig(**{**dict(dim=48, hidden_dim=96, n_layers=3, n_heads=4,
                                         sinusoidal_pos_embds=sinusoidal, **SMALL), **kw})


CASES = {
    "electra-projected": lambda: tf.ElectraForSequenceClassification(electra_config(24)),
    "electra-same-width": lambda: tf.ElectraForSequenceClassification(electra_config(48)),
    "electra-regression": lambda: tf.ElectraForSequenceClassification(electra_config(24, num_labels=1)),
    "distilbert-sinusoidal": lambda: tf.DistilBertForSequenceClassification(distilbert_config(True)),
    "distilbert-learned": lambda: tf.DistilBertForSequenceClassification(distilbert_config(False)),
    "distilbert-regression": lambda: tf.DistilBertForSequenceClassification(distilbert_config(False, num_labels=1)),
}


def padded_batch(vocab: int = 211, pad: int = 0, seed: int = 0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(5, vocab, (len(LENGTHS), max(LENGTHS)))
    mask = (np.arange(ids.shape[1])[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
    types = (np.arange(ids.shape[1])[None, :] >= 8).astype(np.int64).repeat(len(LENGTHS), 0) * mask
    return np.where(mask == 1, ids, pad), mask, types


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_with_padding(case, tmp_path):
    torch.manual_seed(1)
    model = CASES[case]().eval()
    model.save_pretrained(tmp_path)
    ids, mask, types = padded_batch()
    ref = torch_logits(model, ids, mask, types)
    ours, params, report = jax_logits(tmp_path, ids, mask, types)
    assert not report.missing and not report.unexpected
    assert ours.shape == ref.shape == (4, model.config.num_labels)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1e-2  # a real signal, not all zeros
    if case == "electra-projected":
        assert "electra.embeddings_project.kernel" in params
    if case == "electra-same-width":
        assert not any("embeddings_project" in k for k in params)


@pytest.mark.parametrize("case", ["electra-projected", "distilbert-sinusoidal"])
def test_scanned_and_rematerialised_layers_give_the_same_logits(case, tmp_path):
    torch.manual_seed(2)
    model = CASES[case]().eval()
    model.save_pretrained(tmp_path)
    ids, mask, types = padded_batch(seed=1)
    ref = torch_logits(model, ids, mask, types)
    ours, params, _ = jax_logits(tmp_path, ids, mask, types, scan_layers=True, remat="dots")
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    stacked = [k for k in params if ".layer." in k and k.endswith("kernel")]
    assert stacked and all(params[k].shape[0] == 3 for k in stacked)


def test_training_forward_applies_dropout_and_is_deterministic_per_rng(tmp_path):
    for make in (lambda: tf.ElectraForSequenceClassification(electra_config(24, hidden_dropout_prob=0.3)),
                 lambda: tf.DistilBertForSequenceClassification(distilbert_config(True, dropout=0.3))):
        folder = tmp_path / make().config.model_type
        make().save_pretrained(folder)
        model = build_model(tf.AutoConfig.from_pretrained(folder), "classification", jnp.float32, 0)
        params, _ = load_weights(model, hf_io.read_weights(folder), str(folder))
        ids, mask, types = padded_batch()
        f = jax.jit(Functional(model).apply)
        a, b = f(params, ids, mask, types, rng=jax.random.key(0)), f(params, ids, mask, types, rng=jax.random.key(0))
        c, plain = f(params, ids, mask, types, rng=jax.random.key(1)), f(params, ids, mask, types)
        np.testing.assert_array_equal(a, b)
        assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-6
        assert np.abs(np.asarray(a) - np.asarray(plain)).max() > 1e-6


def test_sinusoidal_positions_initialise_as_transformers(tmp_path):
    cfg = distilbert_config(True, max_position_embeddings=40)
    torch.manual_seed(0)
    theirs = tf.DistilBertForSequenceClassification(cfg).distilbert.embeddings.position_embeddings.weight
    ours = build_model(cfg, "classification", jnp.float32, 0)
    np.testing.assert_allclose(np.asarray(ours.distilbert.embeddings.position_embeddings.embedding.value),
                               theirs.detach().numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["electra", "distilbert"])
def test_base_model_checkpoint_loads_the_backbone_and_reports_the_new_head(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "electra":
        tf.ElectraModel(electra_config(24)).save_pretrained(tmp_path)  # names without "electra."
        head = ["classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias",
                "classifier.out_proj.weight"]
        ours_name, theirs_name = "electra.embeddings_project.kernel", "embeddings_project.weight"
    else:
        tf.DistilBertModel(distilbert_config(False)).save_pretrained(tmp_path)  # names without "distilbert."
        head = ["classifier.bias", "classifier.weight", "pre_classifier.bias", "pre_classifier.weight"]
        ours_name, theirs_name = "distilbert.transformer.layer.1.ffn.lin1.kernel", "transformer.layer.1.ffn.lin1.weight"
    model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    params, report = load_weights(model, hf_io.read_weights(tmp_path), str(tmp_path))
    assert sorted(report.missing) == head and not report.unexpected
    np.testing.assert_array_equal(params[ours_name], hf_io.read_weights(tmp_path)[theirs_name].T)


@pytest.mark.parametrize("make", [
    lambda: tf.ElectraForPreTraining(electra_config(24)),  # the hub's *-discriminator checkpoints
    lambda: tf.ElectraForMaskedLM(electra_config(24)),  # *-generator
    lambda: tf.DistilBertForMaskedLM(distilbert_config(True)),  # distilbert-base-uncased
], ids=["electra-discriminator", "electra-generator", "distilbert-mlm"])
def test_pretraining_heads_of_hub_checkpoints_are_ignored(make, tmp_path):
    torch.manual_seed(0)
    pretrained = make()
    pretrained.save_pretrained(tmp_path)
    model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    params, report = load_weights(model, hf_io.read_weights(tmp_path), str(tmp_path))
    assert not report.unexpected, report.unexpected
    assert all(n.startswith(("classifier.", "pre_classifier.")) for n in report.missing), report.missing
    # the backbone is the checkpoint's: transformers' classifier from the same folder computes the same hidden states
    theirs = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    base = theirs.base_model_prefix
    hf_params = dict(theirs.named_parameters())
    checked = 0
    for name, value in params.items():
        if name.startswith(base + "."):
            hf, transpose = hf_name(name)
            want = hf_params[hf].detach().numpy()
            np.testing.assert_array_equal(np.asarray(value), want.T if transpose else want)
            checked += 1
    assert checked > 10


@pytest.mark.parametrize("case", ["electra-projected", "distilbert-sinusoidal"])
def test_export_round_trip_loads_in_transformers_with_equal_logits(case, tmp_path):
    torch.manual_seed(3)
    CASES[case]().save_pretrained(tmp_path / "src")
    ids, mask, types = padded_batch(seed=3)
    ours, params, _ = jax_logits(tmp_path / "src", ids, mask, types)
    # Perturb the params so the test cannot pass by re-reading the original files.
    params = {k: v + 0.01 * jnp.sin(jnp.arange(v.size).reshape(v.shape)) for k, v in params.items()}
    hf_io.write_safetensors(to_hf_weights(params), tmp_path / "out")
    hf_config = tf.AutoConfig.from_pretrained(tmp_path / "src")
    from jaxsft.models.registry import family_for

    hf_config.architectures = [family_for(hf_config).hf_architecture(hf_config, "classification")]
    hf_config.save_pretrained(tmp_path / "out")
    theirs = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(theirs).__name__ == hf_config.architectures[0]
    ref = torch_logits(theirs, ids, mask, types)
    again, _, report = jax_logits(tmp_path / "out", ids, mask, types)
    assert not report.missing and not report.unexpected
    np.testing.assert_allclose(again, ref, atol=1e-4, rtol=0)
    assert np.abs(again - ours).max() > 1e-3  # the perturbation really travelled


@pytest.mark.parametrize("kind, targets, want", [
    ("electra", ["query", "key", "value", "dense"], 3 * 6 + 1),  # per layer q/k/v, 3 dense; the head's dense
    ("distilbert", ["q_lin", "k_lin", "v_lin", "out_lin"], 3 * 4),
])
def test_lora_targets_are_transformers_module_names(kind, targets, want):
    from jaxsft.models import lora

    cfg = electra_config(24) if kind == "electra" else distilbert_config(True)
    model = build_model(cfg, "classification", jnp.float32, 0)
    lc = ml_collections.ConfigDict(dict(rank=4, alpha=8.0, dropout=0.0, target_modules=targets, use_dora=False,
                                        quantize=""))
    adapted = lora.inject(model, lc)
    assert len(adapted) == want, adapted
    assert all(a.startswith(kind + ".") or a == "classifier.dense" for a in adapted)


@pytest.mark.parametrize("kind", ["electra", "distilbert"])
def test_partition_rules_cover_every_large_kernel(kind):
    from jaxsft import parallel
    from jaxsft.models import distilbert, electra

    family = electra if kind == "electra" else distilbert
    cfg = electra_config(24) if kind == "electra" else distilbert_config(True)
    for scan in (False, True):
        model = build_model(cfg, "classification", jnp.float32, 0, {"scan_layers": scan})
        shapes = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        for name in shapes:
            if name.endswith(("kernel", "embedding")):
                assert parallel._rule_spec(name, family.PARTITION_RULES) is not None, name
        specs = parallel.param_specs(shapes, family.PARTITION_RULES, parallel.make_mesh(
            ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))))
        assert len(specs) == len(shapes)


def make_tiny_encoder(out, kind: str, num_labels: int = 2):
    """A tiny random ELECTRA / DistilBERT classifier with MiniLM's tokenizer (conftest.make_tiny_classifier's)."""
    tok = tf.AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    if kind == "electra":
        model = tf.ElectraForSequenceClassification(tf.ElectraConfig(
            embedding_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=tok.vocab_size, num_labels=num_labels, max_position_embeddings=128))
    else:
        model = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=tok.vocab_size, num_labels=num_labels,
            max_position_embeddings=128, sinusoidal_pos_embds=True))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow  # three CLI runs + an export: ~60 s idle
@pytest.mark.parametrize("kind", ["electra", "distilbert"])
def test_cli_trains_evaluates_and_exports_with_transformers_predictions(kind, tmp_path):
    from encoder_checks import check_cli_round_trip

    check_cli_round_trip(tmp_path, f"classify_{kind}", make_tiny_encoder(tmp_path / "ckpt", kind), kind)
