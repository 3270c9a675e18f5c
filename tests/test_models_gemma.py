"""Gemma (1, 2 and 3 text) against transformers' PyTorch classes: logits with left / right padding, packed rows,
KV-cache decoding, greedy generation (multi-EOS generation_config), classification, export round trip, NEFTune
where transformers puts it, bf16 embedding scale, scanned layers, LoRA targets, and the SFT CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_models_decoder as dec
from conftest import ROOT, alpaca_rows, llm_tokenizer, write_jsonl
from decoder_checks import check_export_and_generate_cli_equal_transformers as check_generate_cli
from decoder_checks import check_neftune_matches_transformers_hook as check_neftune
from test_generation import PROMPTS, hf_greedy, load_jax
from test_models_decoder import SMALL, hf_model, padded_batch, positions_of
from test_sft import cli, last_json

from jaxsft import decoding
from jaxsft.errors import UserError
from jaxsft.models import Functional, build_model, load_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402

GEMMA = dict(SMALL, head_dim=16)  # 2 layers, hidden 32, 4 heads / 2 kv heads of 16 (head_dim != hidden / heads)
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
VARIANTS = {
    "gemma": lambda: tf.GemmaConfig(**GEMMA),
    "gemma-untied-bias": lambda: tf.GemmaConfig(tie_word_embeddings=False, attention_bias=True, **GEMMA),
    "gemma2": lambda: tf.Gemma2Config(sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                      final_logit_softcapping=3.0, **GEMMA),
    "gemma2-nocap": lambda: tf.Gemma2Config(sliding_window=4, attn_logit_softcapping=None,
                                            final_logit_softcapping=None, query_pre_attn_scalar=16, **GEMMA),
    "gemma3": lambda: tf.Gemma3TextConfig(sliding_window=4, query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                                          layer_types=["sliding_attention", "full_attention"],
                                          rope_parameters=GEMMA3_ROPE, **GEMMA),
}


@pytest.fixture
def variants(monkeypatch):
    """The Gemma variants added to test_models_decoder's table, so its family tests run on them unchanged."""
    for name, make in VARIANTS.items():
        monkeypatch.setitem(dec.VARIANTS, name, make)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal_lm_logits_match_transformers_with_right_and_left_padding(variant, variants):
    dec.test_causal_lm_logits_match_transformers_with_right_and_left_padding(variant)


@pytest.mark.parametrize("variant", ["gemma", "gemma2"])
def test_packed_row_gives_each_example_its_own_logits(variant, variants):
    dec.test_packed_row_gives_each_example_its_own_logits(variant)


@pytest.mark.parametrize("variant", ["gemma", "gemma2", "gemma3"])
def test_kv_cache_decoding_matches_full_forward_and_compiles_once(variant, variants):
    dec.test_kv_cache_decoding_matches_full_forward_and_compiles_once(variant)


@pytest.mark.parametrize("variant", ["gemma", "gemma2", "gemma3"])
def test_sequence_classification_matches_transformers(variant, variants):
    dec.test_sequence_classification_matches_transformers(variant)


@pytest.mark.parametrize("variant", ["gemma", "gemma-untied-bias", "gemma2", "gemma3"])
def test_export_round_trip_loads_in_transformers_with_equal_logits(variant, variants, tmp_path):
    dec.test_export_round_trip_loads_in_transformers_with_equal_logits(variant, tmp_path)


@pytest.mark.parametrize("variant", ["gemma", "gemma2"])
def test_dropout_only_with_an_rng_and_bfloat16_compute_runs(variant, variants):
    dec.test_dropout_only_with_an_rng_and_bfloat16_compute_runs(variant)


def test_gemma_specifics_are_in_the_model():
    """Not Llama by another name: the (1 + w) norms, sqrt(d) embedding scale, tanh GeGLU, tied head, soft-caps."""
    from jaxsft.models import gemma

    cfg = VARIANTS["gemma2"]()
    model = build_model(cfg, "causal_lm", jnp.float32, 0)
    assert isinstance(model, gemma.GemmaForCausalLM) and model.lm_head is None and model.head_kernel() is None
    assert float(model.model.norm.scale[...].sum()) == 0.0  # (1 + 0): HF's zero init
    assert model.model.embed_tokens.normalizer == pytest.approx(32 ** 0.5)
    assert model.final_logit_softcapping == 3.0 and model.model.layers[0].self_attn.softcap == 2.0
    assert [layer.window for layer in model.model.layers] == [4, None]  # sliding, global
    logits = np.asarray(model(*padded_batch("right")))
    assert np.abs(logits).max() <= 3.0  # soft-capped
    legacy = tf.GemmaConfig(**GEMMA)
    legacy.hidden_act = "gelu"  # old config.json spelling; transformers means the tanh approximation
    assert gemma.mlp_activation(legacy) == "gelu_pytorch_tanh"
    assert build_model(VARIANTS["gemma"](), "causal_lm", jnp.float32, 0).head_kernel() is not None  # chunked loss ok
    assert [gemma.hf_architecture(VARIANTS[v](), t) for v in ("gemma", "gemma2", "gemma3")
            for t in ("causal_lm", "classification")] == [
        "GemmaForCausalLM", "GemmaForSequenceClassification", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification",
        "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"]


def test_embedding_scale_is_rounded_to_the_compute_dtype_as_transformers_does():
    from flax import nnx

    from jaxsft.models import unflatten
    from jaxsft.models.gemma import ScaledEmbed

    emb = ScaledEmbed(10, 3072, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), std=0.02)
    ids = jnp.arange(10)[None]
    table = emb.embedding[...].astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(emb(ids).astype(jnp.float32)),
                                  np.asarray((table * jnp.bfloat16(55.5)).astype(jnp.float32))[None])
    # and transformers in bfloat16 gives the same numbers for a whole small model's embeddings
    cfg = VARIANTS["gemma"]()
    theirs = hf_model(cfg).to(torch.bfloat16)
    ours = build_model(cfg, "causal_lm", jnp.bfloat16, 0)
    params, _ = load_weights(ours, {k: v.float().numpy() for k, v in theirs.state_dict().items()}, "test")
    ids = np.arange(3, 20, dtype=np.int32)[None]
    mine = nnx.merge(nnx.graphdef(ours), unflatten(params)).model.embed_tokens(jnp.asarray(ids))
    with torch.no_grad():
        ref = theirs.model.embed_tokens(torch.tensor(ids, dtype=torch.long)).float().numpy()
    np.testing.assert_array_equal(np.asarray(mine.astype(jnp.float32)), ref)


def test_neftune_noise_is_added_where_transformers_hooks_it(monkeypatch):
    """transformers' neftune_post_forward_hook sits on get_input_embeddings(): Gemma's scaled embedding module, so
    the noise comes after the sqrt(d) scaling; ours equals that forward (and not the unscaled placement)."""
    check_neftune(VARIANTS["gemma2"](), monkeypatch)


def test_scanned_layers_equal_unscanned_and_mixed_layers_refuse_them():
    cfg = VARIANTS["gemma3"]()
    cfg.layer_types = ["full_attention", "full_attention"]
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
    with pytest.raises(UserError, match="scan_layers"):
        build_model(VARIANTS["gemma2"](), "causal_lm", jnp.float32, 0, {"scan_layers": True})


@pytest.mark.parametrize("variant", ["gemma-untied-bias", "gemma2", "gemma3"])
def test_every_matrix_has_a_sharding_rule_and_norms_are_replicated(variant):
    from flax import nnx

    from jaxsft import parallel
    from jaxsft.models import flatten_state

    cfg = VARIANTS[variant]()
    for task in ("causal_lm", "classification"):
        model = nnx.eval_shape(lambda task=task: build_model(cfg, task, jnp.float32, 0))
        shapes = {k: v.shape for k, v in flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
        sizes = {"data": 1, "fsdp": 2, "tensor": 2}
        for name, shape in shapes.items():
            spec = tuple(parallel.spec_for(name, shape, parallel.rules_for(cfg), sizes))
            if len(shape) >= 2:
                assert "fsdp" in spec or "tensor" in spec, (name, shape, spec)
            elif not name.endswith("bias"):
                assert spec == (), (name, spec)


def test_lora_targets_the_hf_module_names(tmp_path):
    from flax import nnx

    from jaxsft import config as config_lib
    from jaxsft import pipeline
    from jaxsft.models import flatten_state

    config = config_lib.load_config_file(str(ROOT / "configs" / "sft_gemma.py"))
    config.lora.rank = 4
    config.lora.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model, trainable = pipeline.build(VARIANTS["gemma2"](), config)
    params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    adapted = {k.split(".lora_")[0] for k in params if ".lora_" in k}
    assert len(adapted) == 2 * 7 and "model.layers.0.self_attn.q_proj" in adapted
    assert "model.layers.1.mlp.down_proj" in adapted
    assert all(trainable(k) == (".lora_" in k) for k in params)


def test_bidirectional_gemma_is_refused():
    cfg = VARIANTS["gemma3"]()
    cfg.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        build_model(cfg, "causal_lm", jnp.float32, 0)


def test_config_starts_with_its_command_and_names_a_gemma():
    from jaxsft import config as config_lib

    path = ROOT / "configs" / "sft_gemma.py"
    assert path.read_text().splitlines()[0].startswith("# COMMAND: python -m jaxsft.run --config configs/sft_gemma.py")
    c = config_lib.load_config_file(str(path))
    assert c.task == "causal_lm" and "gemma" in c.model.name_or_path and c.max_steps == -1
    config_lib.check_values(c)


# ---- tiny checkpoints with a tokenizer: generation and the CLI ----------------------------------------------------

def make_tiny_gemma(out: Path, kind: str = "gemma", std: float = 0.02, **overrides) -> Path:
    """A tiny random Gemma / Gemma2 / Gemma3 *ForCausalLM checkpoint (safetensors) with conftest's llm_tokenizer
    and a generation config (conftest.make_tiny_decoder for Gemma)."""
    tok = llm_tokenizer()
    torch.manual_seed(0)
    common = dict(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id, initializer_range=std, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512)
    if kind == "gemma":
        model = tf.GemmaForCausalLM(tf.GemmaConfig(**{**common, **overrides}))
    elif kind == "gemma2":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**{**common, "sliding_window": 8, "query_pre_attn_scalar": 16,
                                                        **overrides}))
    elif kind == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**{**common, "sliding_window": 8, "query_pre_attn_scalar": 16,
                                                            "layer_types": ["sliding_attention", "full_attention"],
                                                            **overrides}))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # HF's init leaves the (1 + w) norms at 1: perturb them so they are exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def until_any(tokens, eos):
    """The ids up to and including the first of `eos`."""
    out = []
    for t in tokens:
        out.append(t)
        if t in eos:
            break
    return out


# weights large enough for varied greedy tokens (Gemma 1's tied, sqrt(d)-scaled embeddings repeat the last token
# at 0.1), small enough that Gemma 2's final soft-cap (30) does not flatten the top logits
GENERATION_STD = {"gemma": 0.2, "gemma2": 0.1, "gemma3": 0.1}


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3"])
def test_greedy_generation_equals_transformers_with_the_generation_configs_eos_set(kind, tmp_path):
    """Greedy tokens equal transformers' `generate` on left-padded prompts, both stopping at every EOS id of
    generation_config.json (Gemma-it lists two: <eos> and <end_of_turn>); the second one is taken from a token the
    model generates mid-row, so it does cut a row short."""
    folder = make_tiny_gemma(tmp_path / kind, kind, std=GENERATION_STD[kind])
    tok = tf.AutoTokenizer.from_pretrained(folder)
    first = hf_greedy(folder, PROMPTS, 20)
    row = next(r for r in first if tok.eos_token_id not in r[:8])
    second = next(t for t in row[4:] if t not in (tok.eos_token_id, tok.pad_token_id))
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen_path.write_text(json.dumps({**gen, "eos_token_id": [tok.eos_token_id, second]}))
    eos = decoding.eos_ids_for(folder, tok)
    assert eos == (tok.eos_token_id, second)
    functional, params = load_jax(folder)
    fn = decoding.make_generate_fn(functional, decoding.Sampling(max_new_tokens=20), eos, tok.pad_token_id,
                                   jnp.float32)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    ours = decoding.generate(fn, params, ids, batch_size=4, pad_id=tok.pad_token_id, max_prompt=64)
    theirs = hf_greedy(folder, PROMPTS, 20)
    assert [until_any(o, eos) for o in ours] == [until_any(t, eos) for t in theirs]
    assert any(second in until_any(o, eos) for o in ours)  # the second EOS stopped a row
    assert len({t for row in first for t in row}) >= 5, f"degenerate generations: {first}"
    assert fn._cache_size() == 1


@pytest.mark.slow  # a short run, evaluate, generate, export and transformers' generate: ~40 s idle
@pytest.mark.parametrize("kind", ["gemma", "gemma2"])
def test_sft_gemma_config_trains_generates_and_exports(kind, tmp_path):
    model = make_tiny_gemma(tmp_path / kind, kind)
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(96, seed=0))
    write_jsonl(tmp_path / "eval.jsonl", alpaca_rows(16, seed=1))
    w, hf = tmp_path / "w", tmp_path / "hf"
    final = last_json(cli("run", "--config", "configs/sft_gemma.py", "--workdir", w,
                          f"--config.model.name_or_path={model}", f"--config.data.train={tmp_path / 'train.jsonl'}",
                          f"--config.data.eval={tmp_path / 'eval.jsonl'}", "--config.max_steps=30",
                          "--config.learning_rate=1e-2", "--config.max_length=128", "--config.batch_size=8",
                          "--config.gradient_accumulation_steps=2", "--config.warmup_steps=0",
                          "--config.eval_every_steps=15", "--config.log_every_steps=5",
                          "--config.neftune_noise_alpha=5").stdout)
    events = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    train = [e["loss"] for e in events if "loss" in e]
    assert final["step"] == 30 and all(np.isfinite(train)) and train[-1] < 0.5 * train[0]
    check_generate_cli(w, hf, tmp_path, {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}[kind], 6, 10)
