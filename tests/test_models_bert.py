"""The BERT family against transformers' PyTorch classes and real HF Flax checkpoints; export round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED

from jaxsft import hf_io
from jaxsft.models import Functional, build_model, load_weights, to_hf_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402


def jax_logits(folder, ids, mask, types=None):
    hf_config = tf.AutoConfig.from_pretrained(folder)
    model = build_model(hf_config, "classification", jnp.float32, 0)
    params, report = load_weights(model, hf_io.read_weights(folder), str(folder))
    f = Functional(model)
    types = np.zeros_like(ids) if types is None else types
    return np.asarray(jax.jit(f.apply)(params, ids, mask, types)), params, report


def padded_batch(vocab: int, pad: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(5, vocab, (4, 17))
    mask = np.ones_like(ids)
    for row, n in enumerate([17, 9, 3, 12]):
        mask[row, n:] = 0
    return np.where(mask == 1, ids, pad), mask


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta"])
def test_logits_match_transformers_with_padding(kind, tmp_path):
    torch.manual_seed(1)
    common = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=211,
                  num_labels=3, max_position_embeddings=64)
    if kind == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(type_vocab_size=2, **common))
    elif kind == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(pad_token_id=1, **common))
    else:
        model = tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(pad_token_id=1, **common))
    model.eval().save_pretrained(tmp_path)
    ids, mask = padded_batch(211, model.config.pad_token_id)
    types = (np.arange(17)[None, :] >= 8).astype(np.int64).repeat(4, 0) * (kind == "bert")
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types)).logits.numpy()
    ours, _, report = jax_logits(tmp_path, ids, mask, types)
    assert not report.missing and not report.unexpected
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1e-3  # a real signal, not all zeros


@pytest.mark.parametrize("name", ["bert_seqcls", "roberta_seqcls"])
def test_hf_flax_msgpack_checkpoint_matches_its_reference_logits(name):
    folder = SHARED / "fixtures" / "hf_flax" / name
    if not folder.is_dir():
        pytest.skip("../shared/fixtures/hf_flax not present")
    ref = np.load(folder / "reference_outputs.npz")
    ours, _, report = jax_logits(folder, ref["input_ids"], ref["attention_mask"])
    assert not report.missing
    np.testing.assert_allclose(ours, ref["logits"], atol=1e-4, rtol=0)


def test_base_model_checkpoint_reports_new_head_and_loads_backbone(tmp_path):
    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=100)
    tf.BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path)  # keys without the "bert." prefix
    model = build_model(tf.AutoConfig.from_pretrained(tmp_path), "classification", jnp.float32, 0)
    params, report = load_weights(model, hf_io.read_weights(tmp_path), str(tmp_path))
    assert sorted(report.missing) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias",
                                      "classifier.weight"]
    ckpt = hf_io.read_weights(tmp_path)
    np.testing.assert_array_equal(params["bert.embeddings.word_embeddings.embedding"],
                                  ckpt["embeddings.word_embeddings.weight"])


def test_sharded_safetensors_index_loads_like_single_file(tmp_path):
    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        vocab_size=300, num_labels=2)
    model = tf.BertForSequenceClassification(cfg)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = hf_io.read_weights(tmp_path / "one"), hf_io.read_weights(tmp_path / "sharded")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_folder_without_weights_is_a_clear_error(tmp_path):
    from jaxsft.errors import UserError

    with pytest.raises(UserError, match="no weights in"):
        hf_io.read_weights(tmp_path)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_roberta"])
def test_export_round_trip_loads_in_transformers_with_equal_logits(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    ids, mask = padded_batch(500, 0 if fixture == "tiny_bert" else 1, seed=3)
    ours, params, _ = jax_logits(folder, ids, mask)
    # Perturb the params so the test cannot pass by re-reading the original files.
    params = {k: v + 0.01 * jnp.sin(jnp.arange(v.size).reshape(v.shape)) for k, v in params.items()}
    hf_io.write_safetensors(to_hf_weights(params), tmp_path)
    tf.AutoConfig.from_pretrained(folder).save_pretrained(tmp_path)
    theirs = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    again, _, _ = jax_logits(tmp_path, ids, mask)
    np.testing.assert_allclose(again, ref, atol=1e-4, rtol=0)
    assert np.abs(again - ours).max() > 1e-3  # the perturbation really travelled


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    from jaxsft.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot get 'no-such-org/no-such-model' from the Hugging Face hub"):
        hf_io.resolve("no-such-org/no-such-model")
    with pytest.raises(UserError, match="folder not found"):
        hf_io.resolve("./no/such/folder")
