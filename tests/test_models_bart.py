"""BART, mBART and M2M100 / NLLB against transformers' PyTorch classes: logits with left- and right-padded sources,
cached decoding, greedy and beam search equal to `generate` (with the target language's forced BOS), export round
trip, LoRA names, sharding rules; and the NLLB translation config end to end through the CLIs (slow)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LEXICON, ROOT, parallel_rows, write_parallel
from test_models_seq2seq import hf_logits, jax_model

from jaxsft import decoding, hf_io, pipeline
from jaxsft.defaults import base_config
from jaxsft.models import Functional, build_model, load_weights, to_hf_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402

VOCAB, BOS, PAD, EOS, LANG = 101, 0, 1, 2, 97  # LANG: a target-language code token, forced after the start
SMALL = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
             bos_token_id=BOS, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=EOS)
VARIANTS = {
    "bart": lambda: tf.BartConfig(**SMALL),
    "bart-scaled-relu-untied": lambda: tf.BartConfig(scale_embedding=True, activation_function="relu",
                                                     tie_word_embeddings=False, **SMALL),
    "mbart": lambda: tf.MBartConfig(scale_embedding=True, **SMALL),
    "m2m_100": lambda: tf.M2M100Config(**SMALL),  # scale_embedding, relu, LayerDrop 0.05 (training only)
}
FAMILY_OF = {"bart": "bart", "bart-scaled-relu-untied": "bart", "mbart": "mbart", "m2m_100": "m2m_100"}


def hf_model(cfg):
    """A random PyTorch model, every parameter perturbed (an untied lm_head apart from the table), a random
    final_logits_bias where the family has one; eval mode."""
    torch.manual_seed(0)
    model = tf.AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_()
    return model


def saved(cfg, folder):
    model = hf_model(cfg)
    model.save_pretrained(folder)
    return model


def sources(lengths=(13, 9, 4), seed=0, left=False):
    """Token ids (never BOS / PAD / EOS / LANG) padded on the right, or on the left, with PAD."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, LANG, (len(lengths), max(lengths)))
    index = np.arange(ids.shape[1])[None]
    n = np.asarray(lengths)[:, None]
    mask = (index >= ids.shape[1] - n) if left else (index < n)
    return np.where(mask, ids, PAD).astype(np.int32), mask.astype(np.int32)


def targets(lengths=(7, 5, 2), seed=1):
    """(decoder_input_ids, decoder_attention_mask): labels shifted right behind the start token, PAD after."""
    from transformers.models.bart.modeling_bart import shift_tokens_right

    rng = np.random.RandomState(seed)
    labels = rng.randint(3, LANG, (len(lengths), max(lengths)))
    mask = np.arange(labels.shape[1])[None] < np.asarray(lengths)[:, None]
    dec = shift_tokens_right(torch.tensor(np.where(mask, labels, -100)), PAD, EOS)
    return dec.numpy().astype(np.int32), mask.astype(np.int32)


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_with_padded_sources(variant, left, tmp_path):
    model = saved(VARIANTS[variant](), tmp_path)
    f, params, report = jax_model(tmp_path)
    assert not report.missing and not report.unexpected
    assert ("lm_head.kernel" in params) == (not model.config.tie_word_embeddings)
    assert ("final_logits_bias" in params) == (FAMILY_OF[variant] != "m2m_100")
    ids, mask = sources(left=left)
    dec, dec_mask = targets()
    ref = hf_logits(model, ids, mask, dec, dec_mask)
    ours = np.asarray(jax.jit(f.apply)(params, ids, mask, dec, dec_mask))
    real = dec_mask == 1
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)
    assert np.abs(ref[real]).max() > 0.5 and ref[real].std(axis=0).mean() > 0.05  # not trivial


def test_m2m100_positions_are_padding_aware_as_transformers_computes_them():
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding as Ref

    from jaxsft.models.bart import PaddedSinusoidalPositions, fairseq_sinusoidal_table

    # float32 as torch computes it; torch's exp may round a frequency 1 ulp apart from numpy's, which moves the
    # angle of position 1000 by ~1e-5 (NLLB's d_model 1024: 6e-5 at most)
    for dim, pad in ((32, 1), (16, 0), (12, 3)):
        np.testing.assert_allclose(fairseq_sinusoidal_table(1026, dim, pad),
                                   Ref.get_embedding(1026, dim, pad).numpy(), atol=5e-5, rtol=0)
    ids = np.asarray([[5, 6, PAD, 7, PAD], [PAD, PAD, 8, 9, 10]], np.int32)
    ref = Ref(8, 32, PAD)  # its table grows past 8 + 2 rows, as ours does
    positions = PaddedSinusoidalPositions(tf.M2M100Config(d_model=32, max_position_embeddings=8, pad_token_id=PAD),
                                          jnp.float32, None)
    for cached in (0, 70):
        expect = ref(torch.tensor(ids, dtype=torch.long), cache_length=cached).numpy()
        ours = positions.vectors(jnp.asarray(ids), cached + jnp.arange(5), cached + 5)
        np.testing.assert_allclose(np.asarray(ours), expect, atol=2e-5, rtol=0)


@pytest.mark.parametrize("variant", ["bart", "mbart", "m2m_100"])
def test_cached_decoding_matches_teacher_forcing(variant, tmp_path):
    saved(VARIANTS[variant](), tmp_path)
    f, params, _ = jax_model(tmp_path)
    ids, mask = sources(lengths=(11, 6, 3), seed=2)
    steps, batch = 9, ids.shape[0]
    dec = np.random.RandomState(3).randint(3, LANG, (batch, steps)).astype(np.int32)
    full = np.asarray(jax.jit(f.apply)(params, ids, mask, dec))
    cross = f.method(params, "cross_kv", f.method(params, "encode", ids, mask))
    cache = f.method(params, "init_cache", batch, steps + 3)
    step = jax.jit(lambda params, cache, tokens, i: f.method(params, "decode", tokens, cross, mask, cache=cache,
                                                             cache_index=i))
    logits, cache = step(params, cache, dec[:, :2], jnp.int32(0))
    np.testing.assert_allclose(np.asarray(logits), full[:, :2], atol=1e-4, rtol=0)
    for j in range(2, steps):
        logits, cache = step(params, cache, dec[:, j:j + 1], jnp.int32(j))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, j], atol=1e-4, rtol=0, err_msg=f"step {j}")
    assert step._cache_size() == 2


@pytest.mark.parametrize("variant,beams,forced", [
    ("bart", 1, None), ("bart", 3, None), ("mbart", 1, LANG), ("mbart", 3, LANG), ("m2m_100", 1, LANG),
    ("m2m_100", 4, LANG), ("bart-scaled-relu-untied", 2, LANG)])
def test_greedy_and_beam_search_equal_transformers_generate_with_the_forced_bos(variant, beams, forced, tmp_path):
    model = saved(VARIANTS[variant](), tmp_path)
    f, params, _ = jax_model(tmp_path)
    config = base_config()
    config.decode.num_beams, config.decode.max_new_tokens, config.decode.forced_bos_token_id = beams, 12, forced
    hf_config = tf.AutoConfig.from_pretrained(tmp_path)
    settings = decoding.seq2seq_settings(pipeline.generation_config(tmp_path, hf_config), config.decode,
                                         fallback_pad=PAD, fallback_eos=EOS)
    assert settings.decoder_start_token_id == EOS and settings.forced_bos_token_id == forced
    fn = decoding.make_seq2seq_generate_fn(f, settings, jnp.float32)
    ids, mask = sources(lengths=(13, 9, 4, 6), seed=7)
    rows = [list(r[m == 1]) for r, m in zip(ids, mask)]
    ours = decoding.seq2seq_generate(fn, params, rows, batch_size=4, pad_id=PAD, buckets=[16])
    kwargs = {} if forced is None else {"forced_bos_token_id": forced}
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                             num_beams=beams, max_new_tokens=12, do_sample=False, **kwargs)
    eos = set(settings.eos_token_ids)
    for o, r in zip(ours, ref.tolist()):
        assert decoding.cut_at_eos(o, eos) == decoding.cut_at_eos(r[1:], eos)
        if forced is not None:
            assert o[0] == r[1] == forced
    assert any(decoding.cut_at_eos(o, eos) for o in ours)  # (random tiny models like repeating one token)
    if forced is not None:  # the forcing is what put LANG first
        unforced = decoding.seq2seq_generate(decoding.make_seq2seq_generate_fn(
            f, dataclasses.replace(settings, forced_bos_token_id=None), jnp.float32), params, rows, batch_size=4,
            pad_id=PAD, buckets=[16])
        assert all(row[0] != forced for row in unforced)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_round_trip_loads_in_transformers_with_equal_logits(variant, tmp_path):
    from jaxsft.models.registry import family_for

    saved(VARIANTS[variant](), tmp_path / "src")
    f, params, _ = jax_model(tmp_path / "src")
    params = {k: v + 0.01 * jnp.sin(jnp.arange(v.size).reshape(v.shape)) for k, v in params.items()}
    out = tmp_path / "export"
    hf_io.write_safetensors(to_hf_weights(params), out)
    hf_config = tf.AutoConfig.from_pretrained(tmp_path / "src")
    hf_config.architectures = [family_for(hf_config).hf_architecture(hf_config, "seq2seq")]
    hf_config.save_pretrained(out)
    theirs, info = tf.AutoModelForSeq2SeqLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(theirs).__name__ == hf_config.architectures[0]
    ids, mask = sources(seed=5, left=True)
    dec, _ = targets(seed=6)
    ref = hf_logits(theirs.eval(), ids, mask, dec)
    np.testing.assert_allclose(np.asarray(jax.jit(f.apply)(params, ids, mask, dec)), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["bart", "m2m_100"])
def test_dropout_and_layerdrop_only_with_an_rng_and_bfloat16_compute_runs(variant):
    from flax import nnx

    from jaxsft.models import flatten_state

    cfg = VARIANTS[variant]()
    cfg.encoder_layerdrop = cfg.decoder_layerdrop = 0.5
    ids, mask = sources()
    dec = np.random.RandomState(4).randint(3, LANG, (3, 5)).astype(np.int32)
    model = build_model(cfg, "seq2seq", jnp.float32, 0)
    f, params = Functional(model), flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    apply = jax.jit(f.apply)
    eval_logits = np.asarray(apply(params, ids, mask, dec))
    np.testing.assert_array_equal(np.asarray(apply(params, ids, mask, dec)), eval_logits)
    train = [np.asarray(apply(params, ids, mask, dec, rng=jax.random.PRNGKey(k))) for k in range(2)]
    assert np.abs(train[0] - eval_logits).max() > 1e-3 and np.abs(train[0] - train[1]).max() > 1e-3
    model16 = build_model(cfg, "seq2seq", jnp.bfloat16, 0)
    logits16 = jax.jit(Functional(model16).apply)(params, ids, mask, dec)
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits16), eval_logits, atol=0.05 * np.abs(eval_logits).max(), rtol=0)


def test_lora_targets_the_hf_module_names():
    from flax import nnx

    from jaxsft.models import flatten_state

    config = base_config()
    config.task = "seq2seq"
    config.lora.rank = 4
    targets_ = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    config.lora.target_modules = targets_
    for variant in ("bart", "mbart", "m2m_100"):
        cfg = VARIANTS[variant]()
        model, trainable = pipeline.build(cfg, config)
        params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        adapted = {k.split(".lora_")[0] for k in params if ".lora_" in k}
        hf_names = {n for n, m in hf_model(cfg).named_modules()
                    if n.rsplit(".", 1)[-1] in targets_ and isinstance(m, torch.nn.Linear)}
        assert adapted == hf_names and len(adapted) == 2 * 6 + 2 * 10
        assert all(trainable(k) == (".lora_" in k) for k in params)


@pytest.mark.parametrize("variant", ["bart-scaled-relu-untied", "mbart", "m2m_100"])
def test_every_matrix_has_a_sharding_rule_and_norms_are_replicated(variant):
    from flax import nnx

    from jaxsft import parallel
    from jaxsft.models import flatten_state

    cfg = VARIANTS[variant]()
    model = nnx.eval_shape(lambda: build_model(cfg, "seq2seq", jnp.float32, 0))
    shapes = {k: v.shape for k, v in flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
    sizes = {"data": 1, "fsdp": 2, "tensor": 2}
    for name, shape in shapes.items():
        spec = tuple(parallel.spec_for(name, shape, parallel.rules_for(cfg), sizes))
        if len(shape) >= 2 and name != "final_logits_bias":
            assert "fsdp" in spec or "tensor" in spec, (name, shape, spec)
        elif not name.endswith("bias"):
            assert spec == (), (name, spec)


def test_base_model_checkpoints_load_and_exports_name_the_family_class():
    from jaxsft.models import bart

    model = hf_model(VARIANTS["mbart"]())
    weights = {k.removeprefix("model."): v.numpy() for k, v in model.state_dict().items() if k.startswith("model.")}
    weights["final_logits_bias"] = model.final_logits_bias.numpy()
    _, report = load_weights(build_model(model.config, "seq2seq", jnp.float32, 0), weights, "test")
    assert not report.missing and not report.unexpected
    assert {bart.hf_architecture(VARIANTS[v](), "seq2seq") for v in ("bart", "mbart", "m2m_100")} == {
        "BartForConditionalGeneration", "MBartForConditionalGeneration", "M2M100ForConditionalGeneration"}


# ---- NLLB-style multilingual tokenizer and the translate_nllb config end to end --------------------------------

LANGUAGES = ["eng_Latn", "deu_Latn", "fra_Latn"]


def nllb_tokenizer():
    """A real NllbTokenizer (BPE, prefix language codes) over the words of LEXICON, one token per word."""
    words = sorted(set(LEXICON) | set(LEXICON.values()))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in ["▁"] + sorted({c for w in words for c in w}):
        vocab.setdefault(piece, len(vocab))
    merges = []
    for w in words:
        piece = "▁"
        for c in w:
            merges.append((piece, c))
            piece += c
            vocab.setdefault(piece, len(vocab))
    return tf.NllbTokenizer(vocab=vocab, merges=merges, extra_special_tokens=LANGUAGES, src_lang="eng_Latn")


def make_tiny_nllb(out):
    tok = nllb_tokenizer()
    torch.manual_seed(0)
    cfg = tf.M2M100Config(vocab_size=len(tok), d_model=64, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                          decoder_ffn_dim=128, max_position_embeddings=128, encoder_layerdrop=0.0,
                          decoder_layerdrop=0.0, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id)
    model = tf.M2M100ForConditionalGeneration(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_language_codes_lead_sources_and_targets_and_force_the_target_bos(tmp_path):
    from jaxsft.errors import UserError
    from jaxsft.tasks import seq2seq

    tok = nllb_tokenizer()
    config = base_config()
    config.data.src_lang, config.data.tgt_lang = "eng_Latn", "deu_Latn"
    seq2seq.set_languages(tok, config)
    eng, deu = tok.convert_tokens_to_ids(["eng_Latn", "deu_Latn"])
    assert tok("the dog")["input_ids"][0] == eng and tok(text_target="der hund")["input_ids"][0] == deu
    assert seq2seq.generation_overrides(tok, config) == {"forced_bos_token_id": deu}
    config.decode.forced_bos_token_id = 7  # the explicit key wins
    config.model.decoder_start_token_id = 2
    assert seq2seq.generation_overrides(tok, config) == {"forced_bos_token_id": 7, "decoder_start_token_id": 2}
    config.data.tgt_lang = "xxx_Latn"
    with pytest.raises(UserError, match="not a language code"):
        seq2seq.set_languages(tok, config)


@pytest.mark.slow  # ~90 s (300 steps: a pre-norm tiny model learns slowly)
def test_nllb_config_run_evaluate_export_generate_equal_transformers(tmp_path):
    from test_sft import cli, last_json

    model = make_tiny_nllb(tmp_path / "nllb")
    train = write_parallel(tmp_path, "train", parallel_rows(240, seed=0))
    evals = write_parallel(tmp_path, "val", parallel_rows(8, seed=1))
    w = tmp_path / "w"
    cli("run", "--config", "configs/translate_nllb.py", "--workdir", w, f"--config.model.name_or_path={model}",
        f"--config.data.train={train}", f"--config.data.eval={evals}", "--config.max_steps=300",
        "--config.learning_rate=3e-3", "--config.lr_scheduler_type=constant", "--config.batch_size=16",
        "--config.eval_every_steps=300", "--config.label_smoothing=0", "--config.decode.num_beams=2",
        "--config.decode.max_new_tokens=16", "--config.log_every_steps=50", "--config.max_length=32")
    events = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in events if "eval_bleu" in e][-1]
    hyp = tmp_path / "hyp.txt"
    out = last_json(cli("evaluate", "--workdir", w, "--predictions", hyp).stdout)
    assert out["eval_bleu"] == last["eval_bleu"]
    hyps = hyp.read_text().splitlines()
    sources_ = (tmp_path / "val.en").read_text().splitlines()
    assert len(hyps) == len(sources_) == 8 and sum(len(h.split()) for h in hyps) >= 8  # it translates something
    hf = tmp_path / "hf"
    cli("export", "--workdir", w, "--output", hf)
    tok = tf.AutoTokenizer.from_pretrained(hf)
    assert (tok.src_lang, tok.tgt_lang) == ("eng_Latn", "deu_Latn")
    theirs = tf.AutoModelForSeq2SeqLM.from_pretrained(hf).eval()
    assert theirs.generation_config.forced_bos_token_id == tok.convert_tokens_to_ids("deu_Latn")
    for s, h in zip(sources_, hyps):
        with torch.no_grad():  # the exported generation_config.json forces deu_Latn first, as jaxsft did
            ref = theirs.generate(**tok([s], return_tensors="pt"), num_beams=2, max_new_tokens=16, do_sample=False)
        assert ref[0, 1].item() == tok.convert_tokens_to_ids("deu_Latn")
        assert tok.decode(ref[0], skip_special_tokens=True).strip() == h.strip()
    gen = [json.loads(line) for line in cli("generate", "--workdir", w, "--prompt", sources_[0], "--num_beams", "2",
                                            "--max_new_tokens", "16").stdout.splitlines() if line.startswith("{")]
    assert gen[0]["completion"].strip() == hyps[0].strip()
    assert ROOT.joinpath("configs/translate_nllb.py").read_text().startswith("# COMMAND: python -m jaxsft.run")
