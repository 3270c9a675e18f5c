"""CUDA lowering tier: the real train, eval and decode steps of every family, lowered for CUDA on this CPU host.

`jax.jit(step).trace(*abstract args).lower(lowering_platforms=("cuda",))` runs the GPU lowering rules, cuDNN's
fused-attention checks included (layout, head dim, the bias shape cuDNN takes), with no GPU: a mask cuDNN would
refuse on a GPU raises here the same ValueError. cuDNN's two driver probes (version, compute capability) are
stubbed as an H100/H200 with cuDNN 9.10 would answer. No step is executed.

What is asserted from the lowered text: cuDNN's fused attention is there wherever the dispatch means cuDNN
(at least one forward call per attention layer, a backward call per layer in train steps, the packed-sequence
form for packed SFT rows), the decode steps of decoders stay on XLA (one query per row against a growing
cache), and nothing fell back to XLA silently (layers._fallback records every fallback).
"""

from __future__ import annotations

import re
from unittest import mock

import pytest

pytestmark = pytest.mark.lowering

jax = pytest.importorskip("jax")
tf = pytest.importorskip("transformers")

from jaxsft import aot_steps, defaults, parallel  # noqa: E402
from jaxsft.models import layers  # noqa: E402

DIMS = dict(vocab_size=128)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def encoder(cls, **kw):
    return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, **NO_DROPOUT, **DIMS, **kw)


def decoder(cls, **kw):
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, **DIMS)
    return cls(**{**base, **kw})


def bart_like(cls, **kw):
    return cls(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256, dropout=0.0,
               attention_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0, **DIMS, **kw)


FAMILIES = {  # name: (HF config, task, attention layers of (train/eval, encoder side of decode))
    "bert": (lambda: encoder(tf.BertConfig), "classification"),
    "roberta": (lambda: encoder(tf.RobertaConfig, pad_token_id=1), "classification"),
    "xlm-roberta": (lambda: encoder(tf.XLMRobertaConfig, pad_token_id=1), "classification"),
    "electra": (lambda: encoder(tf.ElectraConfig, embedding_size=32), "classification"),
    "albert": (lambda: encoder(tf.AlbertConfig, embedding_size=32), "classification"),  # one layer, applied twice
    "distilbert": (lambda: tf.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, dropout=0.0,
                                               attention_dropout=0.0, max_position_embeddings=256, **DIMS),
                   "classification"),
    # DeBERTa-v3: the c2p + p2c relative terms reach the kernel as a (B, H, T, T) bias (its gradient: cuDNN's dbias)
    "deberta-v2": (lambda: encoder(tf.DebertaV2Config, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                   position_buckets=32, share_att_key=True, norm_rel_ebd="layer_norm",
                                   position_biased_input=False, type_vocab_size=0), "classification"),
    "modernbert": (lambda: tf.ModernBertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, max_position_embeddings=256, local_attention=16,
                                               global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1,
                                               eos_token_id=2, cls_token_id=1, sep_token_id=2, **DIMS),
                   "classification"),  # layer 0 global, layer 1 sliding-window (a (B, 1, T, T) mask for cuDNN)
    "llama": (lambda: decoder(tf.LlamaConfig), "causal_lm"),
    "mistral": (lambda: decoder(tf.MistralConfig, sliding_window=16), "causal_lm"),
    "qwen2": (lambda: decoder(tf.Qwen2Config), "causal_lm"),
    "qwen3": (lambda: decoder(tf.Qwen3Config, head_dim=16), "causal_lm"),
    "gemma": (lambda: decoder(tf.GemmaConfig, head_dim=16), "causal_lm"),
    # Gemma 2 without its attention soft-cap (which has no fused kernel: test_gemma2_soft_capped_attention_...)
    "gemma2": (lambda: decoder(tf.Gemma2Config, head_dim=16, query_pre_attn_scalar=16, sliding_window=4096,
                               attn_logit_softcapping=None), "causal_lm"),
    "gemma3_text": (lambda: decoder(tf.Gemma3TextConfig, head_dim=16, sliding_window=4096), "causal_lm"),
    # Phi-4-mini-like: fused qkv / gate_up, partial rotary 0.75, longrope (original 32 < the 64-token rows), tied head
    "phi3": (lambda: decoder(tf.Phi3Config, partial_rotary_factor=0.75, original_max_position_embeddings=32,
                             tie_word_embeddings=True, rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 6,
                                                                    "long_factor": [4.0] * 6}), "causal_lm"),
    # MoE (4 experts, top 2; grouped dispatch by jax.lax.ragged_dot); OLMoE with the load-balancing loss in training
    "mixtral": (lambda: decoder(tf.MixtralConfig, num_local_experts=4, num_experts_per_tok=2), "causal_lm"),
    "qwen3_moe": (lambda: decoder(tf.Qwen3MoeConfig, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, norm_topk_prob=True), "causal_lm"),
    "olmoe": (lambda: decoder(tf.OlmoeConfig, num_experts=4, num_experts_per_tok=2, output_router_logits=True),
              "causal_lm"),
    "gpt2": (lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, attn_pdrop=0.0, resid_pdrop=0.0,
                                   embd_pdrop=0.0, **DIMS), "causal_lm"),
    "t5": (lambda: tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
                               decoder_start_token_id=0, **DIMS), "seq2seq"),
    "mt5": (lambda: tf.MT5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
                                 decoder_start_token_id=0, **DIMS), "seq2seq"),
    "marian": (lambda: tf.MarianConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                       decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                       max_position_embeddings=256, decoder_start_token_id=127, pad_token_id=127,
                                       dropout=0.0, **DIMS), "seq2seq"),
    "bart": (lambda: bart_like(tf.BartConfig), "seq2seq"),
    "mbart": (lambda: bart_like(tf.MBartConfig), "seq2seq"),
    "m2m_100": (lambda: bart_like(tf.M2M100Config), "seq2seq"),
}
LAYERS = 2
BATCH, LENGTH, TARGET = 8, 64, 32


def cuda_lowering():
    """Stubs for the driver probes cuDNN's lowering makes (a Hopper GPU, cuDNN 9.10) + the dispatch told that
    the step is built for a GPU."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    stack = [mock.patch.object(fa, "check_cudnn_version", lambda: 91000),
             mock.patch.object(fa, "check_compute_capability", lambda capability: True)]

    class Ctx:
        def __enter__(self):
            for s in stack:
                s.__enter__()
            self.platform = layers.target_platform("gpu")
            self.platform.__enter__()
            layers._WARNED.clear()
            return self

        def __exit__(self, *exc):
            self.platform.__exit__(*exc)
            for s in reversed(stack):
                s.__exit__(*exc)

    return Ctx()


def lower_for_cuda(fn, args) -> str:
    return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


CALL = re.compile(r"custom_call @__cudnn\$(fmha\w+)\(([^)]*)\)")
# a scatter whose combiner adds half-precision values: an embedding gradient summed in bf16 (layers.embedding_lookup)
HALF_SCATTER = re.compile(r'"stablehlo\.scatter"[^\n]*\n\s*\^bb0\(%\w+: tensor<(?:bf16|f16)>')


def cudnn_calls(text: str) -> list[tuple[str, int]]:
    """(cuDNN fused-attention target, number of operands) of every call in the lowered module."""
    return [(m.group(1), len([a for a in m.group(2).split(",") if a.strip()])) for m in CALL.finditer(text)]


def forward_calls(calls):
    return [c for c in calls if not c[0].endswith("Backward")]


def backward_calls(calls):
    return [c for c in calls if c[0].endswith("Backward")]


def packed_calls(calls):  # q, k, v + q/kv segment lengths + q/kv segment offsets: cuDNN's packed (THD) form
    return [c for c in calls if c == ("fmhaSoftmax", 7)]


def config_for(task: str, dtype: str = "bfloat16", **overrides):
    c = defaults.base_config()
    c.task, c.dtype, c.batch_size, c.max_length = task, dtype, BATCH, LENGTH
    if task == "seq2seq":
        c.data.max_target_length = TARGET
    for key, value in overrides.items():
        node, *rest = key.split(".")
        target = c
        for part in [node, *rest][:-1]:
            target = target[part]
        target[[node, *rest][-1]] = value
    return c


def lowered_steps(family: str, dtype: str = "bfloat16", steps=("train", "eval", "decode"), **overrides) -> dict:
    make_hf, task = FAMILIES[family]
    config = config_for(task, dtype, **overrides)
    mesh = parallel.make_mesh(config.mesh)
    out = {"half_scatters": {}}
    with cuda_lowering():
        built = aot_steps.build(config, make_hf(), mesh)
        target = TARGET if task == "seq2seq" else None
        for name in steps:
            if name == "train":
                fn, args = aot_steps.train_step(built, BATCH, LENGTH, target)
            elif name == "eval":
                fn, args = aot_steps.eval_step(built, BATCH, LENGTH, target)
            else:
                if task == "classification":
                    continue
                fn, args = aot_steps.decode_step(built, 4, 16, max_new_tokens=8)
            text = lower_for_cuda(fn, args)
            out[name] = cudnn_calls(text)
            out["half_scatters"][name] = len(HALF_SCATTER.findall(text))
        out["fallbacks"] = sorted(layers._WARNED)
    return out


def attention_layers(task: str) -> int:
    return 3 * LAYERS if task == "seq2seq" else LAYERS  # seq2seq: encoder self + decoder self + cross


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_lowers_for_cuda_with_cudnn_attention_in_bf16(family):
    _, task = FAMILIES[family]
    got = lowered_steps(family)
    n = attention_layers(task)
    assert got["fallbacks"] == [], f"{family}: silent XLA fallback {got['fallbacks']}"
    assert got["half_scatters"]["train"] == 0, f"{family}: an embedding gradient is scatter-added in half precision"
    assert len(forward_calls(got["eval"])) >= n, f"{family} eval: {got['eval']}"
    assert len(forward_calls(got["train"])) >= n, f"{family} train: {got['train']}"
    assert len(backward_calls(got["train"])) >= n, f"{family} train backward: {got['train']}"
    if task == "causal_lm":
        assert got["decode"] == [], "cached decoding is XLA's (one query against a growing cache)"
        if family not in ("gpt2", "mistral"):  # gpt2: no packed path; mistral: window 16 < row 64
            assert len(packed_calls(got["train"])) >= LAYERS, f"{family}: packed rows must use cuDNN's THD form"
    if task == "seq2seq":  # the encoder runs once per source batch in cuDNN; the cached decoder steps in XLA
        assert len(forward_calls(got["decode"])) >= LAYERS, got["decode"]


@pytest.mark.parametrize("family", ["bert", "llama", "t5", "marian"])
def test_float16_lowers_with_cudnn_attention(family):
    _, task = FAMILIES[family]
    got = lowered_steps(family, "float16", steps=("train", "eval"))
    assert got["fallbacks"] == []
    assert len(forward_calls(got["eval"])) >= attention_layers(task)
    assert len(backward_calls(got["train"])) >= attention_layers(task)


@pytest.mark.parametrize("overrides", [
    {"lora.rank": 4},
    {"model.scan_layers": True},
    {"model.remat": "dots"},
    {"model.remat": "full", "model.scan_layers": True},
    {"gradient_accumulation_steps": 2},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_llama_train_variants_keep_cudnn_attention(overrides):
    got = lowered_steps("llama", steps=("train",), **overrides)
    sites = 1 if overrides.get("model.scan_layers") else LAYERS  # a scanned stack lowers its layer body once
    assert got["fallbacks"] == []
    assert len(packed_calls(got["train"])) >= sites
    assert len(backward_calls(got["train"])) >= sites


def test_sliding_window_longer_than_the_row_keeps_the_packed_form():
    got = lowered_steps("mistral", steps=("train",), **{})
    assert packed_calls(got["train"]) == [], "window 16 < row 64: the windowed mask goes as a bias"
    FAMILIES["mistral_long"] = (lambda: decoder(tf.MistralConfig, sliding_window=4096), "causal_lm")
    try:
        got = lowered_steps("mistral_long", steps=("train",))
    finally:
        del FAMILIES["mistral_long"]
    assert len(packed_calls(got["train"])) >= LAYERS and got["fallbacks"] == []


def test_gemma2_soft_capped_attention_lowers_to_xla_and_says_so():
    """tanh soft-capping of the scores (Gemma 2's attn_logit_softcapping) is in no fused kernel jaxsft reaches: the
    explicit XLA attention, one log line saying why, not a silent fallback."""
    FAMILIES["gemma2_softcap"] = (lambda: decoder(tf.Gemma2Config, head_dim=16, sliding_window=4096), "causal_lm")
    try:
        got = lowered_steps("gemma2_softcap", steps=("train", "decode"))
    finally:
        del FAMILIES["gemma2_softcap"]
    assert got["train"] == [] and got["decode"] == []
    assert any("soft-capping" in w for w in got["fallbacks"]), got["fallbacks"]


def test_bert_with_scan_and_lora_keeps_cudnn_attention():
    for overrides in ({"model.scan_layers": True}, {"lora.rank": 4, "lora.target_modules": ["query", "value"]}):
        got = lowered_steps("bert", steps=("train", "eval"), **overrides)
        sites = 1 if overrides.get("model.scan_layers") else LAYERS
        assert got["fallbacks"] == [] and len(forward_calls(got["eval"])) >= sites, overrides
        assert len(backward_calls(got["train"])) >= sites, overrides


def test_bert_padding_mask_reaches_cudnn_as_key_lengths_not_a_bias():
    """The (B, 1, 1, S) padding mask used to reach cuDNN as a bias of that shape, which its layout check refuses
    ("Bias must have same seq length as QKV"): every BERT eval on a GPU in bf16 died at start. Right-padded rows
    now go as key lengths (no bias operand), other rows to XLA."""
    got = lowered_steps("bert", steps=("eval",))
    assert ("fmhaSoftmax", 5) in got["eval"], got["eval"]  # q, k, v, q lengths, kv lengths
    assert not [c for c in got["eval"] if "Bias" in c[0]], got["eval"]


def test_odd_lengths_with_a_bias_take_xla_and_say_so(caplog):
    """cuDNN's backward refuses T % 2 != 0 with a bias; such a call goes to XLA, with one warning."""
    import jax.numpy as jnp

    q = jax.ShapeDtypeStruct((2, 7, 4, 16), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((2, 1, 7, 7), jnp.bool_)

    def f(q, mask):
        return layers.attention(q, q, q, mask)

    with cuda_lowering():
        calls = cudnn_calls(lower_for_cuda(jax.jit(f), (q, mask)))
        assert calls == []
        assert any("odd sequence length" in w for w in layers._WARNED)


def test_left_padded_key_mask_is_exact_through_the_xla_branch():
    """The right-padding test that chooses key lengths for cuDNN, and the XLA branch other rows take, agree with
    the plain masked attention on CPU (the branch a GPU takes for rows that are not right-padded)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 8, 2, 16)), jnp.float32) for _ in range(3))
    keep = np.array([[1] * 8, [1] * 5 + [0] * 3, [0] * 2 + [1] * 6], bool)
    mask = jnp.asarray(keep)[:, None, None, :]
    lengths, right = layers._right_padded_lengths(mask)
    assert lengths.tolist() == [8, 5, 6] and not bool(right)
    assert bool(layers._right_padded_lengths(mask[:2])[1])
    want = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(layers._xla_attention(q, k, v, mask, None, 0.25), want, atol=1e-6)


def test_model_attention_xla_takes_no_fused_kernel():
    """config.model.attention=xla: every attention call in XLA's explicit path (no cuDNN custom call at all), and
    "auto" again restores cuDNN for the next model built in the process."""
    try:
        got = lowered_steps("llama", steps=("train", "eval"), **{"model.attention": "xla"})
        assert got["train"] == [] and got["eval"] == [], got
        again = lowered_steps("llama", steps=("eval",))
        assert len(forward_calls(again["eval"])) >= LAYERS, again
    finally:
        layers.set_attention("auto")
