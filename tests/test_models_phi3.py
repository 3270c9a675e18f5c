"""Phi-3 (Phi-3-mini/medium, Phi-3.5-mini, Phi-4-mini) against transformers' PyTorch classes: logits with left /
right padding, the longrope short / long choice and its attention factor, partial rotary, sliding window, KV-cache
decoding, greedy generation, classification, export round trip, NEFTune, scanned layers, fused-projection LoRA
targets (PEFT loads the adapters), sharding rules, and the SFT CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_models_decoder as dec
import test_models_gemma as gem
from conftest import ROOT, alpaca_rows, llm_tokenizer, write_jsonl
from decoder_checks import check_export_and_generate_cli_equal_transformers as check_generate_cli
from decoder_checks import check_neftune_matches_transformers_hook as check_neftune
from test_generation import PROMPTS, hf_greedy, load_jax
from test_models_decoder import SMALL, hf_model, padded_batch, positions_of
from test_sft import cli, last_json

from jaxsft import decoding
from jaxsft.models import Functional, build_model, layers, load_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402

PHI3 = dict(SMALL, num_attention_heads=2, num_key_value_heads=1)  # head_dim 16: 0.75 of it rotates 12 dims


def longrope(original: int, **extra) -> dict:
    """Phi-3.5 / Phi-4-mini style RoPE settings for PHI3's 12 rotary dims (6 frequencies)."""
    return dict(original_max_position_embeddings=original, partial_rotary_factor=0.75,
                rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                              "long_factor": [1.5, 2.5, 4.0, 6.0, 9.0, 16.0], **extra})


VARIANTS = {
    "phi3": lambda: tf.Phi3Config(**PHI3),  # Phi-3-mini-4k: default RoPE, untied
    # Phi-4-mini-like: partial rotary 0.75, longrope, tied head; original 4 < every test batch: long factors
    "phi3-longrope-tied": lambda: tf.Phi3Config(tie_word_embeddings=True, **longrope(4), **PHI3),
    "phi3-window": lambda: tf.Phi3Config(sliding_window=4, resid_pdrop=0.1, **PHI3),  # Phi-3-mini-4k's window
}


@pytest.fixture
def variants(monkeypatch):
    """The Phi-3 variants added to test_models_decoder's table, so its family tests run on them unchanged."""
    for name, make in VARIANTS.items():
        monkeypatch.setitem(dec.VARIANTS, name, make)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal_lm_logits_match_transformers_with_right_and_left_padding(variant, variants):
    dec.test_causal_lm_logits_match_transformers_with_right_and_left_padding(variant)


def test_packed_row_gives_each_example_its_own_logits(variants):
    dec.test_packed_row_gives_each_example_its_own_logits("phi3")


@pytest.mark.parametrize("variant", ["phi3", "phi3-longrope-tied", "phi3-window"])
def test_kv_cache_decoding_matches_full_forward_and_compiles_once(variant, variants):
    dec.test_kv_cache_decoding_matches_full_forward_and_compiles_once(variant)


@pytest.mark.parametrize("variant", ["phi3", "phi3-longrope-tied"])
def test_sequence_classification_matches_transformers(variant, variants):
    dec.test_sequence_classification_matches_transformers(variant)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_round_trip_loads_in_transformers_with_equal_logits(variant, variants, tmp_path):
    dec.test_export_round_trip_loads_in_transformers_with_equal_logits(variant, tmp_path)


def test_dropout_only_with_an_rng_and_bfloat16_compute_runs(variants):
    dec.test_dropout_only_with_an_rng_and_bfloat16_compute_runs("phi3-window")


@pytest.mark.parametrize("attention_factor", [None, 1.3])
def test_longrope_takes_short_factors_up_to_the_original_length_and_long_ones_past_it(attention_factor):
    """transformers picks the factors from max(position_ids) + 1 against original_max_position_embeddings (8 here),
    one choice per call, and scales cos / sin by the attention factor at every length."""
    extra = {} if attention_factor is None else {"attention_factor": attention_factor}
    cfg = tf.Phi3Config(**longrope(8, **extra), **PHI3)
    theirs = hf_model(cfg)
    f, params, _ = dec.jax_model(theirs)
    apply = jax.jit(f.apply)
    from jaxsft.models import phi3

    short, long, original, scale = phi3.rope_settings(cfg)
    expected = np.sqrt(1 + np.log(64 / 8) / np.log(8)) if attention_factor is None else attention_factor
    assert original == 8 and scale == pytest.approx(expected) and len(short) == len(long) == 6
    for lengths in ((8, 5, 3), (9, 5, 3), (13, 9, 4)):  # max position + 1: 8 (short), 9 and 13 (long)
        for side in ("right", "left"):
            ids, mask = padded_batch(side, lengths=lengths, seed=6)
            ref = dec.hf_logits(theirs, ids, mask, positions_of(mask))
            real = mask == 1
            np.testing.assert_allclose(np.asarray(apply(params, ids, mask))[real], ref[real], atol=1e-4, rtol=0,
                                       err_msg=f"{lengths} {side}")
    ids, mask = padded_batch("right", lengths=(8, 5, 3), seed=6)
    first8 = np.asarray(apply(params, ids, mask))
    longer = np.asarray(apply(params, *padded_batch("right", lengths=(9, 5, 3), seed=6)))
    assert np.abs(longer[1:, :5] - first8[1:, :5]).max() > 1e-3  # one longer row switches the whole batch


def test_phi3_specifics_are_in_the_model():
    """Fused projections under transformers' names, partial rotary, the tied head, the window in every layer."""
    from flax import nnx

    from jaxsft.models import flatten_state, phi3

    cfg = VARIANTS["phi3-longrope-tied"]()
    model = build_model(cfg, "causal_lm", jnp.float32, 0)
    assert isinstance(model, phi3.Phi3ForCausalLM) and model.lm_head is None
    names = set(flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    assert {"model.layers.0.self_attn.qkv_proj.kernel", "model.layers.0.mlp.gate_up_proj.kernel"} <= names
    assert not any(("q_proj" in n or ".up_proj" in n or "bias" in n) for n in names)
    assert model.model.layers[0].self_attn.qkv_proj.kernel.shape == (32, (2 + 2 * 1) * 16)
    assert phi3.rotary_dim(cfg) == 12 and phi3.rotary_dim(VARIANTS["phi3"]()) == 16
    assert [layer.window for layer in build_model(VARIANTS["phi3-window"](), "causal_lm", jnp.float32, 0)
            .model.layers] == [4, 4]
    assert [phi3.hf_architecture(cfg, t) for t in ("causal_lm", "classification")] == [
        "Phi3ForCausalLM", "Phi3ForSequenceClassification"]
    legacy = tf.Phi3Config(rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
                           original_max_position_embeddings=16, **PHI3)  # Phi-3-*-128k's first spelling
    assert phi3.rope_settings(legacy)[1] is not None
    bad = VARIANTS["phi3"]()
    bad.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="unsupported rope type 'dynamic'"):
        build_model(bad, "causal_lm", jnp.float32, 0)


def test_partial_rotary_passes_the_unrotated_dims_through():
    x = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
    rope = layers.rotary_tables(jnp.arange(3)[None], (1.0, 0.1))  # 2 frequencies: rotates dims 0..3
    out = layers.apply_rotary(x, rope)
    np.testing.assert_array_equal(np.asarray(out[..., 4:]), np.asarray(x[..., 4:]))
    full = layers.apply_rotary(x[..., :4], rope)
    np.testing.assert_allclose(np.asarray(out[..., :4]), np.asarray(full), atol=0, rtol=0)


def test_residual_dropout_needs_an_rng_and_embedding_dropout_is_not_applied():
    """resid_pdrop drops the attention / MLP outputs while training; embd_pdrop, which transformers' Phi3Model
    never applies, changes nothing."""
    cfg = tf.Phi3Config(resid_pdrop=0.3, **PHI3)
    ids, mask = padded_batch("right")
    model = build_model(cfg, "causal_lm", jnp.float32, 0)
    key = jax.random.key(1)
    eval_logits = np.asarray(model(ids, mask))
    assert np.abs(np.asarray(model(ids, mask, rng=key)) - eval_logits).max() > 1e-3
    cfg = tf.Phi3Config(embd_pdrop=0.5, **PHI3)
    model = build_model(cfg, "causal_lm", jnp.float32, 0)
    np.testing.assert_array_equal(np.asarray(model(ids, mask, rng=key)), np.asarray(model(ids, mask)))


def test_neftune_noise_is_added_to_the_embeddings_as_transformers_hooks_it(monkeypatch):
    check_neftune(VARIANTS["phi3-longrope-tied"](), monkeypatch)


def test_scanned_layers_equal_unscanned_and_transformers():
    cfg = VARIANTS["phi3-longrope-tied"]()
    theirs = hf_model(cfg)
    weights = {k: v.numpy() for k, v in theirs.state_dict().items()}
    ids, mask = padded_batch("left")
    out = {}
    for scan in (False, True):
        model = build_model(cfg, "causal_lm", jnp.float32, 0, {"scan_layers": scan, "remat": "dots"})
        params, report = load_weights(model, weights, "test")
        assert not report.missing and not report.unexpected
        out[scan] = np.asarray(jax.jit(Functional(model).apply)(params, ids, mask))
    np.testing.assert_allclose(out[True], out[False], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[False][mask == 1], dec.hf_logits(theirs, ids, mask, positions_of(mask))[mask == 1],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["phi3", "phi3-longrope-tied"])
def test_every_matrix_has_a_sharding_rule_and_norms_are_replicated(variant, monkeypatch):
    monkeypatch.setitem(gem.VARIANTS, variant, VARIANTS[variant])
    gem.test_every_matrix_has_a_sharding_rule_and_norms_are_replicated(variant)


def test_lora_targets_the_fused_hf_module_names():
    from flax import nnx

    from jaxsft import config as config_lib
    from jaxsft import pipeline
    from jaxsft.models import flatten_state

    config = config_lib.load_config_file(str(ROOT / "configs" / "sft_phi3.py"))
    assert list(config.lora.target_modules) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    config.lora.rank = 4
    model, trainable = pipeline.build(VARIANTS["phi3"](), config)
    params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    adapted = {k.split(".lora_")[0] for k in params if ".lora_" in k}
    assert len(adapted) == 2 * 4 and "model.layers.0.self_attn.qkv_proj" in adapted
    assert "model.layers.1.mlp.gate_up_proj" in adapted
    assert all(trainable(k) == (".lora_" in k) for k in params)


def test_config_starts_with_its_command_and_names_a_phi3():
    from jaxsft import config as config_lib

    path = ROOT / "configs" / "sft_phi3.py"
    assert path.read_text().splitlines()[0].startswith("# COMMAND: python -m jaxsft.run --config configs/sft_phi3.py")
    c = config_lib.load_config_file(str(path))
    assert c.task == "causal_lm" and "Phi-" in c.model.name_or_path and c.max_steps == -1
    config_lib.check_values(c)


# ---- tiny checkpoints with a tokenizer: generation and the CLI ----------------------------------------------------

def make_tiny_phi3(out: Path, std: float = 0.02, **overrides) -> Path:
    """A tiny random Phi3ForCausalLM checkpoint (safetensors) with conftest's llm_tokenizer and a generation
    config; partial rotary 0.75 (head_dim 16) as Phi-4-mini, longrope settings by `overrides`."""
    tok = llm_tokenizer()
    torch.manual_seed(0)
    cfg = dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.bos_token_id, initializer_range=std, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               partial_rotary_factor=0.75)
    model = tf.Phi3ForCausalLM(tf.Phi3Config(**{**cfg, **overrides}))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


LONGROPE_6 = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
              "long_factor": [1.5, 2.0, 3.0, 5.0, 8.0, 12.0]}
GENERATION = {
    "default": {},
    # Phi-3.5 / Phi-4-mini style: the prompts' batch is longer than 8 positions, so every step takes long factors
    "longrope-tied": {"original_max_position_embeddings": 8, "rope_scaling": LONGROPE_6, "tie_word_embeddings": True},
    "window": {"sliding_window": 6},
    # the prompts (longest 14 tokens) and 20 new tokens stay within 64 positions: short factors throughout
    "longrope-short": {"original_max_position_embeddings": 64, "rope_scaling": LONGROPE_6},
}


@pytest.mark.parametrize("kind", list(GENERATION))
def test_greedy_generation_equals_transformers(kind, tmp_path):
    folder = make_tiny_phi3(tmp_path / kind, std=0.1, **GENERATION[kind])
    tok = tf.AutoTokenizer.from_pretrained(folder)
    functional, params = load_jax(folder)
    fn = decoding.make_generate_fn(functional, decoding.Sampling(max_new_tokens=20), (tok.eos_token_id,),
                                   tok.pad_token_id, jnp.float32)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ours = decoding.generate(fn, params, ids, batch_size=4, pad_id=tok.pad_token_id, max_prompt=64)
    theirs = hf_greedy(folder, PROMPTS, 20)
    eos = (tok.eos_token_id,)
    assert [decoding.cut_at_eos(o, eos) for o in ours] == [decoding.cut_at_eos(t, eos) for t in theirs]
    assert len({t for row in ours for t in row}) >= 5, f"degenerate generations: {ours}"
    assert fn._cache_size() == 1


def test_longrope_decoding_equals_transformers_up_to_the_original_length(tmp_path):
    """The known difference (phi3.py's docstring): past original_max_position_embeddings (16 here) mid-generation,
    transformers re-encodes the whole sequence with long factors, our cache keeps its short-factor entries. Every
    token picked from at most 16 positions (the longest prompt has 14: the first 3 new ones) is transformers'."""
    folder = make_tiny_phi3(tmp_path / "crossing", std=0.1, original_max_position_embeddings=16,
                            rope_scaling=LONGROPE_6)
    tok = tf.AutoTokenizer.from_pretrained(folder)
    functional, params = load_jax(folder)
    fn = decoding.make_generate_fn(functional, decoding.Sampling(max_new_tokens=8), (), tok.pad_token_id,
                                   jnp.float32)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    assert max(len(i) for i in ids) == 14
    ours = decoding.generate(fn, params, ids, batch_size=4, pad_id=tok.pad_token_id, max_prompt=64)
    theirs = hf_greedy(folder, PROMPTS, 8)
    assert [o[:3] for o in ours] == [t[:3] for t in theirs]


@pytest.mark.slow  # a short run, evaluate, generate, export and transformers' generate: ~40 s idle
def test_sft_phi3_config_trains_generates_and_exports(tmp_path):
    model = make_tiny_phi3(tmp_path / "phi3", original_max_position_embeddings=64, rope_scaling=LONGROPE_6,
                           tie_word_embeddings=True)
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(96, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", alpaca_rows(16, seed=1))
    w, hf = tmp_path / "w", tmp_path / "hf"
    final = last_json(cli("run", "--config", "configs/sft_phi3.py", "--workdir", w,
                          f"--config.model.name_or_path={model}", f"--config.data.train={tmp_path / 'train.jsonl'}",
                          f"--config.data.eval={tmp_path / 'eval.jsonl'}", "--config.max_steps=30",
                          "--config.learning_rate=1e-2", "--config.max_length=128", "--config.batch_size=8",
                          "--config.gradient_accumulation_steps=2", "--config.warmup_steps=0",
                          "--config.eval_every_steps=15", "--config.log_every_steps=5", "--config.dtype=float32",
                          "--config.neftune_noise_alpha=5").stdout)
    events = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    train = [e["loss"] for e in events if "loss" in e]
    assert final["step"] == 30 and all(np.isfinite(train)) and train[-1] < 0.5 * train[0]
    evaluated = last_json(cli("evaluate", "--workdir", w).stdout)
    assert np.isfinite(evaluated["eval_loss"])
    check_generate_cli(w, hf, tmp_path, "Phi3ForCausalLM", 6, 10)


@pytest.mark.slow  # a short LoRA run and both exports: ~30 s idle
def test_lora_on_the_fused_projections_exports_adapters_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    model = make_tiny_phi3(tmp_path / "phi3")
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(64, seed=0))
    w, merged, adapters = tmp_path / "w", tmp_path / "merged", tmp_path / "adapters"
    cli("run", "--config", "configs/sft_phi3.py", "--workdir", w, f"--config.model.name_or_path={model}",
        f"--config.data.train={tmp_path / 'train.jsonl'}", "--config.data.eval_fraction=0.1", "--config.max_steps=8",
        "--config.learning_rate=1e-2", "--config.max_length=128", "--config.batch_size=8", "--config.dtype=float32",
        "--config.gradient_accumulation_steps=1", "--config.warmup_steps=0", "--config.lora.rank=4")
    cli("export", "--workdir", w, "--output", merged)
    cli("export", "--workdir", w, "--output", adapters, "--adapters_only")
    cfg = json.loads((adapters / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    base = tf.AutoModelForCausalLM.from_pretrained(model).eval()
    tuned = tf.AutoModelForCausalLM.from_pretrained(merged).eval()
    with_peft = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(model), adapters).eval()
    ids = torch.tensor([[101, 2000, 2001, 2002, 2003, 2004]])
    with torch.no_grad():
        a, b = tuned(input_ids=ids).logits, with_peft(input_ids=ids).logits
        assert (a - base(input_ids=ids).logits).abs().max() > 1e-4  # the adapters changed the model
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
