"""Encoder-decoder models (T5 v1.0 / v1.1, mT5, umT5, Marian) against transformers' PyTorch classes and HF Flax
checkpoints: padded sources, cached step-by-step decoding, export round trip."""

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

VOCAB, PAD, START = 101, 0, 0
T5_SMALL = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, pad_token_id=PAD,
                decoder_start_token_id=START, relative_attention_num_buckets=8, relative_attention_max_distance=20)
VARIANTS = {
    "t5-v1.0-relu-tied": lambda: tf.T5Config(num_decoder_layers=3, **T5_SMALL),
    "t5-v1.1-gated-gelu-untied": lambda: tf.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                                     **T5_SMALL),
    "mt5": lambda: tf.MT5Config(tie_word_embeddings=False, **T5_SMALL),
    "umt5": lambda: tf.UMT5Config(tie_word_embeddings=False, **T5_SMALL),
    "marian": lambda: tf.MarianConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                      decoder_ffn_dim=48, max_position_embeddings=64, scale_embedding=True,
                                      activation_function="swish", pad_token_id=PAD, decoder_start_token_id=START),
    "marian-own-vocabularies-untied": lambda: tf.MarianConfig(
        vocab_size=VOCAB + 20, decoder_vocab_size=VOCAB, share_encoder_decoder_embeddings=False,
        tie_word_embeddings=False, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=40, max_position_embeddings=64,
        pad_token_id=PAD, decoder_start_token_id=START),
}


def untied(cfg) -> bool:
    if cfg.model_type == "marian":
        return not cfg.tie_word_embeddings
    return cfg.model_type == "mt5" or not cfg.scale_decoder_outputs


def hf_model(cfg):
    """A random PyTorch model, every trained parameter perturbed, an untied lm_head where the config says so (a
    fresh transformers 5 T5 shares it) and, for Marian, a random final_logits_bias; eval mode."""
    torch.manual_seed(0)
    model = tf.AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" not in name:  # Marian's sinusoidal table is fixed
                p.add_(0.1 * torch.randn_like(p))
        if cfg.model_type != "marian" and untied(cfg):
            model.lm_head.weight = torch.nn.Parameter(model.shared.weight + 0.3 * torch.randn_like(model.shared.weight))
        if cfg.model_type == "marian":
            model.final_logits_bias.normal_()
    return model


def jax_model(folder):
    """(Functional, params, load report) of our model read back from a saved checkpoint folder."""
    hf_config = tf.AutoConfig.from_pretrained(folder)
    model = build_model(hf_config, "seq2seq", jnp.float32, 0)
    params, report = load_weights(model, hf_io.read_weights(folder), str(folder))
    return Functional(model), params, report


def functional(model):
    from flax import nnx

    from jaxsft.models import flatten_state

    return Functional(model), flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def saved(cfg, folder):
    """`hf_model(cfg)` saved with save_pretrained into `folder`; returns the PyTorch model."""
    model = hf_model(cfg)
    model.save_pretrained(folder)
    return model


def sources(lengths=(13, 9, 4), seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (len(lengths), max(lengths)))
    mask = (np.arange(ids.shape[1])[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, PAD).astype(np.int32), mask


def targets(model, lengths=(7, 5, 2), seed=1):
    """(decoder_input_ids, decoder_attention_mask): labels padded with -100, shifted right by transformers."""
    rng = np.random.RandomState(seed)
    labels = rng.randint(3, VOCAB, (len(lengths), max(lengths)))
    labels[np.arange(labels.shape[1])[None] >= np.asarray(lengths)[:, None]] = -100
    labels = torch.tensor(labels)
    if model.config.model_type == "marian":
        from transformers.models.marian.modeling_marian import shift_tokens_right

        dec = shift_tokens_right(labels, PAD, START)
    else:
        dec = model._shift_right(labels)
    mask = (np.arange(labels.shape[1])[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return dec.numpy().astype(np.int32), mask


def hf_logits(model, ids, mask, dec, dec_mask=None):
    kwargs = {} if dec_mask is None else {"decoder_attention_mask": torch.tensor(dec_mask)}
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(dec, dtype=torch.long), **kwargs).logits.float().numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_seq2seq_logits_match_transformers_with_padded_sources(variant, tmp_path):
    model = saved(VARIANTS[variant](), tmp_path)
    f, params, report = jax_model(tmp_path)
    assert not report.missing and not report.unexpected
    assert ("lm_head.kernel" in params) == untied(model.config)
    ids, mask = sources()
    dec, dec_mask = targets(model)
    ref = hf_logits(model, ids, mask, dec, dec_mask)
    ours = np.asarray(jax.jit(f.apply)(params, ids, mask, dec, dec_mask))
    real = dec_mask == 1
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    assert np.abs(ref[real]).max() > 0.5 and ref[real].std(axis=0).mean() > 0.05  # not trivial
    no_mask = np.asarray(f.apply(params, ids, mask, dec))  # right padding never reaches real positions
    np.testing.assert_allclose(no_mask[real], ours[real], atol=1e-4, rtol=0)


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    from jaxsft.models.t5 import relative_position_bucket

    rel = np.arange(-400, 401)[None]
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (8, 20), (64, 300)):
            ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional, num_buckets, max_distance)
            ours = relative_position_bucket(jnp.asarray(rel, jnp.int32), bidirectional=bidirectional,
                                            num_buckets=num_buckets, max_distance=max_distance)
            np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


@pytest.mark.parametrize("name", ["t5_seq2seq", "marian_seq2seq"])
def test_hf_flax_msgpack_checkpoint_matches_its_reference_logits(name):
    folder = SHARED / "fixtures" / "hf_flax" / name
    if not folder.is_dir():
        pytest.skip("../shared/fixtures/hf_flax not present")
    ref = np.load(folder / "reference_outputs.npz")
    f, params, report = jax_model(folder)
    assert not report.missing and not report.unexpected
    ours = np.asarray(jax.jit(f.apply)(params, ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"]))
    np.testing.assert_allclose(ours, ref["logits"], atol=1e-4, rtol=0)
    assert np.abs(ref["logits"]).max() > 0.5


@pytest.mark.parametrize("variant", ["t5-v1.0-relu-tied", "umt5", "marian"])
def test_cached_decoding_matches_teacher_forcing_and_compiles_once(variant, tmp_path):
    saved(VARIANTS[variant](), tmp_path)
    f, params, _ = jax_model(tmp_path)
    ids, mask = sources(lengths=(11, 6, 3), seed=2)
    steps, batch = 9, ids.shape[0]  # past T5's exact-distance buckets into the logarithmic ones
    dec = np.random.RandomState(3).randint(3, VOCAB, (batch, steps)).astype(np.int32)
    full = np.asarray(jax.jit(f.apply)(params, ids, mask, dec))

    encoded = jax.jit(lambda params, ids, mask: f.method(params, "encode", ids, mask))(params, ids, mask)
    assert encoded.shape == (batch, ids.shape[1], 32) and encoded.dtype == jnp.float32
    cross = jax.jit(lambda params, encoded: f.method(params, "cross_kv", encoded))(params, encoded)
    max_length = steps + 3
    cache = f.method(params, "init_cache", batch, max_length)
    assert len(cache) == len(cross) and cache["layers.1.k"].shape == (batch, max_length, 4, 8)
    assert cross["layers.1.v"].shape == (batch, ids.shape[1], 4, 8)
    step = jax.jit(lambda params, cache, tokens, i: f.method(params, "decode", tokens, cross, mask, cache=cache,
                                                             cache_index=i))
    logits, cache = step(params, cache, dec[:, :2], jnp.int32(0))  # a two-token first chunk
    np.testing.assert_allclose(np.asarray(logits), full[:, :2], atol=1e-4, rtol=0)
    for j in range(2, steps):
        logits, cache = step(params, cache, dec[:, j:j + 1], jnp.int32(j))
        assert logits.shape == (batch, 1, VOCAB) and logits.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, j], atol=1e-4, rtol=0, err_msg=f"step {j}")
    assert step._cache_size() == 2  # the two-token chunk, then one shape for every single-token step


@pytest.mark.parametrize("variant", ["t5-v1.0-relu-tied", "t5-v1.1-gated-gelu-untied", "marian",
                                     "marian-own-vocabularies-untied"])
def test_export_round_trip_loads_in_transformers_with_equal_logits(variant, tmp_path):
    cfg = VARIANTS[variant]()
    saved(cfg, tmp_path / "src")
    f, params, _ = jax_model(tmp_path / "src")
    params = {k: v + 0.01 * jnp.sin(jnp.arange(v.size).reshape(v.shape)) for k, v in params.items()}
    out = tmp_path / "export"
    hf_io.write_safetensors(to_hf_weights(params), out)
    tf.AutoConfig.from_pretrained(tmp_path / "src").save_pretrained(out)
    theirs, info = tf.AutoModelForSeq2SeqLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = sources(seed=5)
    dec, _ = targets(theirs, seed=6)
    ref = hf_logits(theirs.eval(), ids, mask, dec)
    np.testing.assert_allclose(np.asarray(jax.jit(f.apply)(params, ids, mask, dec)), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["t5-v1.1-gated-gelu-untied", "marian"])
def test_dropout_only_with_an_rng_and_bfloat16_compute_runs(variant):
    cfg = VARIANTS[variant]()
    ids, mask = sources()
    dec = np.random.RandomState(4).randint(3, VOCAB, (3, 5)).astype(np.int32)
    f32, params = functional(build_model(cfg, "seq2seq", jnp.float32, 0))
    apply = jax.jit(f32.apply)
    eval_logits = np.asarray(apply(params, ids, mask, dec))
    np.testing.assert_array_equal(np.asarray(apply(params, ids, mask, dec)), eval_logits)
    train_logits = np.asarray(apply(params, ids, mask, dec, rng=jax.random.PRNGKey(1)))
    assert np.abs(train_logits - eval_logits).max() > 1e-3
    f16, params16 = functional(build_model(cfg, "seq2seq", jnp.bfloat16, 0))
    logits16 = jax.jit(f16.apply)(params16, ids, mask, dec)
    scale = np.abs(eval_logits).max()
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits16), eval_logits, atol=0.05 * scale, rtol=0)

    @jax.jit
    def decode(params):
        encoded = f16.method(params, "encode", ids, mask)
        cache = f16.method(params, "init_cache", 3, 8)
        logits, cache = f16.method(params, "decode", dec, f16.method(params, "cross_kv", encoded), mask, cache=cache,
                                   cache_index=0)
        return encoded, cache["layers.0.k"], logits

    encoded, cached_k, step = decode(params16)
    assert encoded.dtype == cached_k.dtype == jnp.bfloat16 and step.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(step), np.asarray(logits16), atol=0.05 * scale, rtol=0)


def test_base_model_checkpoints_and_alias_keys_load_cleanly():
    from jaxsft.models import marian, t5

    assert marian.normalize_hf_key("encoder.layers.0.fc1.weight", "model") == "model.encoder.layers.0.fc1.weight"
    model = hf_model(VARIANTS["marian"]())
    weights = {k.removeprefix("model."): v.numpy() for k, v in model.state_dict().items() if k.startswith("model.")}
    weights["final_logits_bias"] = model.final_logits_bias.numpy()
    jmodel = build_model(model.config, "seq2seq", jnp.float32, 0)
    _, report = load_weights(jmodel, weights, "test")  # embed_positions and embed_tokens aliases are ignored
    assert not report.missing and not report.unexpected
    model = hf_model(VARIANTS["t5-v1.0-relu-tied"]())
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        weights[alias] = weights["shared.weight"]
    weights["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = np.zeros((8, 4), np.float32)
    _, report = load_weights(build_model(model.config, "seq2seq", jnp.float32, 0), weights, "test")
    assert not report.missing and not report.unexpected
    assert t5.hf_architecture(model.config, "seq2seq") == "T5ForConditionalGeneration"
