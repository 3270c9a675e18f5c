"""Llama-style decoder LLMs (Llama 1/2/3, Mistral, Qwen2/2.5, Qwen3): one NNX implementation set by the HF config.

The families differ only in switches read from the config: q/k/v (and o) biases, per-head q/k RMSNorm (Qwen3),
sliding-window layers (Mistral; Qwen2/3 `layer_types`), the RoPE variant (default, linear, llama3) and tied
embeddings. Attribute names mirror transformers' modules, so parameter paths are the HF names (see bert.py).
A sliding window is applied exactly (by slot distance, as transformers' mask does), not ignored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.models.layers import (
    HEAD_RULES,
    CausalLM,
    LastTokenClassifier,
    RMSNorm,
    activation,
    apply_rotary,
    attention,
    decoder_context,
    dense,
    embed,
    neftune,
    packed_mask,
    remat_policy,
    rope_parameters,
    rotary_inv_freq,
    rotary_tables,
    split_batch,
    sub_rng,
    use_packed_attention,
    write_kv,
)

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURE_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_heads(cfg) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def attention_biases(cfg) -> tuple[bool, bool]:
    """(q/k/v projections have a bias, o_proj has a bias) as each family's attention module decides."""
    if cfg.model_type == "qwen2":
        return True, False
    if cfg.model_type == "mistral":
        return False, False
    bias = bool(getattr(cfg, "attention_bias", False))
    return bias, bias


def layer_windows(cfg) -> list[int | None]:
    """Sliding-window size per layer (None: full causal attention)."""
    n, window = cfg.num_hidden_layers, getattr(cfg, "sliding_window", None)
    if cfg.model_type in ("mistral", "phi3", "mixtral", "qwen3_moe"):  # one window for every layer when set
        return [window] * n
    types = getattr(cfg, "layer_types", None)
    if cfg.model_type in ("qwen2", "qwen3") and types:
        return [window if kind == "sliding_attention" else None for kind in types[:n]]
    return [None] * n


class DecoderAttention(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        d, std, hd = cfg.hidden_size, cfg.initializer_range, head_dim(cfg)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, kv_heads(cfg), hd
        qkv_bias, o_bias = attention_biases(cfg)
        self.q_proj = dense(d, self.num_heads * hd, dtype=dtype, rngs=rngs, std=std, use_bias=qkv_bias)
        self.k_proj = dense(d, self.num_kv_heads * hd, dtype=dtype, rngs=rngs, std=std, use_bias=qkv_bias)
        self.v_proj = dense(d, self.num_kv_heads * hd, dtype=dtype, rngs=rngs, std=std, use_bias=qkv_bias)
        self.o_proj = dense(self.num_heads * hd, d, dtype=dtype, rngs=rngs, std=std, use_bias=o_bias)
        per_head_norm = cfg.model_type == "qwen3"
        self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps) if per_head_norm else None
        self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps) if per_head_norm else None
        self.rate = getattr(cfg, "attention_dropout", 0.0)

    def project(self, x):
        """(q, k, v) of x, each (batch, T, heads or kv_heads, head_dim); phi3.py's fused qkv_proj overrides it."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        return q, k, v

    def __call__(self, x, rope, mask, rng, cache=None, layer=0, cache_index=None):
        b, t, _ = x.shape
        q, k, v = self.project(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        kv = None
        if cache is not None:
            k, v = kv = write_kv(cache, layer, k, v, cache_index)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        out = attention(q, k, v, mask, dropout_rate=self.rate, rng=rng,
                        implementation="xla" if cache is not None else None)
        return self.o_proj(out.reshape(b, t, -1)), kv


class DecoderMLP(nnx.Module):
    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_proj = dense(d, f, dtype=dtype, rngs=rngs, std=std, use_bias=bias)
        self.up_proj = dense(d, f, dtype=dtype, rngs=rngs, std=std, use_bias=bias)
        self.down_proj = dense(f, d, dtype=dtype, rngs=rngs, std=std, use_bias=bias)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg, window: int | None, dtype, rngs: nnx.Rngs):
        self.self_attn = DecoderAttention(cfg, dtype, rngs)
        self.mlp = DecoderMLP(cfg, dtype, rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.window = window

    def __call__(self, x, rope, mask, rng, cache=None, layer=0, cache_index=None):
        h, kv = self.self_attn(self.input_layernorm(x), rope, mask, rng, cache, layer, cache_index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def _run_layer(graphdef, state, x, rope, mask, rng):
    """One layer from its (graphdef, state): a pure function of arrays, so jax.checkpoint and lax.scan can wrap it."""
    return nnx.merge(graphdef, state)(x, rope, mask, rng)[0]


class DecoderModel(nnx.Module):
    """The backbone (HF's LlamaModel & co.): embed_tokens → layers → norm.

    `remat` ("none" | "dots" | "full", layers.remat_policy) recomputes each layer's activations in the backward
    pass, saving only what the policy keeps. `scan_layers`: the layers are one module whose parameters carry a
    leading layer axis (stacked after construction, so the random init equals the unscanned one) and run under
    `jax.lax.scan`, so compile time does not grow with depth; parameter paths lose the layer index
    (`model.layers.self_attn.q_proj.kernel`, shape (layers, in, out)) and the HF weight map stacks / unstacks
    per index (models.stacked_parts). Scanning needs the same attention window in every layer.
    """

    layer_class = DecoderLayer  # a family's own layer (same constructor and call signature; phi3.py)

    def __init__(self, cfg, dtype, rngs: nnx.Rngs, *, remat: str = "none", scan_layers: bool = False,
                 neftune_noise_alpha: float = 0.0):
        self.neftune_noise_alpha = float(neftune_noise_alpha or 0.0)
        self.embed_tokens = embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        windows = layer_windows(cfg)
        layers = [self.layer_class(cfg, w, dtype, rngs) for w in windows]
        self.remat, self.scan_layers = remat, bool(scan_layers)
        remat_policy(remat)  # checks the name
        if self.scan_layers:
            if len(set(windows)) > 1:
                from jaxsft.errors import UserError

                raise UserError("model.scan_layers: this checkpoint mixes sliding-window and full-attention layers "
                                "(layer_types); scanned layers need one kind; set model.scan_layers=False")
            graphdef, states = nnx.split(layers[0])[0], [nnx.split(layer)[1] for layer in layers]
            self.layers = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
            self.num_layers, self.window = len(layers), windows[0]
        else:
            self.layers = nnx.List(layers)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.inv_freq = self.rotary_frequencies(cfg)

    def rotary_frequencies(self, cfg):
        """What `rotary` reads (static): the RoPE inverse frequencies; a family with another RoPE overrides both."""
        return rotary_inv_freq(rope_parameters(cfg), head_dim(cfg))

    def rotary(self, positions):
        """The (cos, sin) tables of `positions` for apply_rotary."""
        return rotary_tables(positions, self.inv_freq)

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, rng=None, cache=None,
                 cache_index=None):
        """Final hidden states (batch, T, hidden) and the updated cache (None without one)."""
        positions, mask_for = decoder_context(input_ids, attention_mask, positions, segment_ids, cache_index,
                                              cache is not None)
        rope = self.rotary(positions)
        x, new_cache = split_batch(neftune(self.embed_tokens(input_ids), self.neftune_noise_alpha, rng)), {}
        packed = segment_ids is not None and cache is None and use_packed_attention()

        if packed and attention_mask is not None:
            segment_ids = jnp.where(attention_mask == 0, 0, segment_ids)

        def mask_of(window):  # packed rows on GPU: the layout of cuDNN's packed kernel rides along
            if packed and window is not None and window >= input_ids.shape[1]:  # longer than the row: hides nothing
                window = None
            return packed_mask(segment_ids, mask_for(None)) if packed and window is None else mask_for(window)

        if self.scan_layers:
            x, new_cache = self._scan(x, rope, mask_of(self.window), rng, cache, cache_index)
            return self.norm(x), new_cache
        masks = {w: mask_of(w) for w in {layer.window for layer in self.layers}}
        policy = remat_policy(self.remat)
        for i, layer in enumerate(self.layers):
            if policy is not None and cache is None:
                graphdef, state = nnx.split(layer)
                run = jax.checkpoint(_run_layer, policy=policy, static_argnums=(0,))
                x, kv = run(graphdef, state, x, rope, masks[layer.window], sub_rng(rng, i)), None
            else:
                x, kv = layer(x, rope, masks[layer.window], sub_rng(rng, i), cache, i, cache_index)
            x = split_batch(x)
            if kv is not None:
                new_cache[f"layers.{i}.k"], new_cache[f"layers.{i}.v"] = kv
        return self.norm(x), (new_cache if cache is not None else None)

    def _scan(self, x, rope, mask, rng, cache, cache_index):
        graphdef, state = nnx.split(self.layers)
        n = self.num_layers
        if cache is None:
            policy = remat_policy(self.remat)

            def body(h, xs):
                st, i = xs
                return split_batch(_run_layer(graphdef, st, h, rope, mask, sub_rng(rng, i))), None

            if policy is not None:
                body = jax.checkpoint(body, policy=policy, prevent_cse=False)
            x, _ = jax.lax.scan(body, x, (state, jnp.arange(n, dtype=jnp.int32)))
            return x, None
        # Decoding: the cache keeps its per-layer layout ({"layers.<i>.k": ...}); stacked for the scan and back.
        ks = jnp.stack([cache[f"layers.{i}.k"] for i in range(n)])
        vs = jnp.stack([cache[f"layers.{i}.v"] for i in range(n)])

        def step(h, xs):
            st, ck, cv = xs
            h, (k, v) = nnx.merge(graphdef, st)(h, rope, mask, None, {"layers.0.k": ck, "layers.0.v": cv}, 0,
                                               cache_index)
            return h, (k, v)

        x, (ks, vs) = jax.lax.scan(step, x, (state, ks, vs))
        new_cache = {}
        for i in range(n):
            new_cache[f"layers.{i}.k"], new_cache[f"layers.{i}.v"] = ks[i], vs[i]
        return x, new_cache


class DecoderForCausalLM(CausalLM):
    """HF's LlamaForCausalLM & co."""

    base_prefix, embedding_name = "model", "embed_tokens"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        super().__init__(DecoderModel(cfg, dtype, rngs, **options), cfg, dtype, rngs,
                         kv_heads=kv_heads(cfg), head_dim=head_dim(cfg),
                         tied=bool(getattr(cfg, "tie_word_embeddings", False)))


class DecoderForSequenceClassification(LastTokenClassifier):
    """HF's LlamaForSequenceClassification & co."""

    base_prefix = "model"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        super().__init__(DecoderModel(cfg, dtype, rngs, **options), cfg, dtype, rngs)


# Model options this family takes from the config (models.build_model passes them on).
OPTIONS = ("remat", "scan_layers", "neftune_noise_alpha")


def causal_lm(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    return DecoderForCausalLM(cfg, dtype, rngs=rngs, **options)


def sequence_classification(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    return DecoderForSequenceClassification(cfg, dtype, rngs=rngs, **options)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    head = {"causal_lm": "ForCausalLM", "classification": "ForSequenceClassification"}[task]
    return ARCHITECTURE_NAMES[cfg.model_type] + head


def normalize_hf_key(key: str, base_prefix: str) -> str:
    """Base-model checkpoints (LlamaModel & co.) lack the `model.` prefix."""
    if key.startswith(("embed_tokens.", "layers.", "norm.")):
        return f"{base_prefix}.{key}"
    return key


# lm_head.weight: a tied model has no head of its own (transformers does not report it either).
IGNORED_HF_KEYS = ("rotary_emb.inv_freq", "lm_head.weight")


# Sharding (see parallel.py): regex over flat param names → PartitionSpec; kernels are (in, out). 'fsdp' takes one
# large dimension, 'tensor' the heads / hidden units; norms and unlisted biases are replicated.
PARTITION_RULES = (
    (r"embed_tokens\.embedding$", P("tensor", "fsdp")),
    (r"self_attn\.(q|k|v)_proj\.kernel$", P("fsdp", "tensor")),
    (r"self_attn\.(q|k|v)_proj\.bias$", P("tensor")),
    (r"self_attn\.o_proj\.kernel$", P("tensor", "fsdp")),
    (r"mlp\.(gate|up)_proj\.kernel$", P("fsdp", "tensor")),
    (r"mlp\.(gate|up)_proj\.bias$", P("tensor")),
    (r"mlp\.down_proj\.kernel$", P("tensor", "fsdp")),
) + HEAD_RULES
