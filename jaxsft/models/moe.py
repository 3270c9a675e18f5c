"""Mixture-of-experts decoders (Mixtral `mixtral`, Qwen3-MoE `qwen3_moe`, OLMoE `olmoe`) as transformers computes them.

Built on decoder.py (attention, RoPE, KV cache, masks, remat, NEFTune are the Llama family's); what changes is the
MLP: a sparse MoE block. Per token: router logits = gate(x) (no bias), softmax in float32, the top
`num_experts_per_tok` experts; their weights renormalised to sum 1 (Mixtral always, Qwen3-MoE and OLMoE when
`norm_topk_prob`), and cast back to the compute dtype (Qwen3-MoE, OLMoE; Mixtral keeps float32). The output is the
weighted sum of those experts' gated MLPs, down(act(gate(x)) * up(x)).
Qwen3-MoE adds per-head q/k RMSNorms (as Qwen3); OLMoE q/k RMSNorms over the whole projection (all heads at once).

Experts are stored stacked: one (experts, in, out) kernel per projection (`….experts.gate_proj.kernel`), mapped to
the per-expert tensors transformers saves (`….mlp.experts.<e>.gate_proj.weight`; Mixtral
`….block_sparse_moe.experts.<e>.w1|w3|w2.weight`) by models.hf_stack_parts, both ways. Checkpoints holding
transformers' in-memory fused form (`experts.gate_up_proj`, 3-D) are not read.
Dispatch is grouped, not dense: the (token, expert) pairs are sorted by expert and each expert's rows multiply its
kernel once (`jax.lax.ragged_dot`), so compute grows with top-k, not with the number of experts; no capacity, no
dropped tokens, exact.

Load-balancing loss: when the HF config asks for it (`output_router_logits` and `router_aux_loss_coef`), training
adds `router_aux_loss_coef` x transformers' `load_balancing_loss_func` (padding-aware, over all layers) to the
mean token loss, as *ForCausalLM does with labels (tasks/causal_lm.train_sums).
Not supported (refused in one line): Qwen3-MoE dense layers (`mlp_only_layers`, `decoder_sparse_step` > 1), OLMoE
`clip_qkv`, Mixtral `router_jitter_noise`, scanned layers, the load-balancing loss with `model.remat`.
"""

from __future__ import annotations

import contextvars

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.errors import UserError
from jaxsft.models import decoder
from jaxsft.models.decoder import (  # noqa: F401 - IGNORED_HF_KEYS, normalize_hf_key: the family's HF name rules
    IGNORED_HF_KEYS,
    DecoderAttention,
    DecoderLayer,
    DecoderModel,
    head_dim,
    kv_heads,
    normalize_hf_key,
)
from jaxsft.models.layers import F32, CausalLM, RMSNorm, activation, context_value

MODEL_TYPES = ("mixtral", "qwen3_moe", "olmoe")
ARCHITECTURE_NAMES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
# (name of the MoE block in a layer, names of the expert gate / up / down projections) as transformers saves them
EXPERT_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
                "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
                "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}

# While a forward pass collects them (MoEForCausalLM with router_aux_loss=True): every MoE block's router logits.
_ROUTER_LOGITS: contextvars.ContextVar = contextvars.ContextVar("jaxsft_router_logits", default=None)


def num_experts(cfg) -> int:
    return int(cfg.num_local_experts if cfg.model_type == "mixtral" else cfg.num_experts)


def check_supported(cfg) -> None:
    kind = cfg.model_type
    if kind == "qwen3_moe" and (list(getattr(cfg, "mlp_only_layers", None) or [])
                                or int(getattr(cfg, "decoder_sparse_step", 1) or 1) != 1):
        raise UserError("qwen3_moe: dense MLP layers (config mlp_only_layers / decoder_sparse_step > 1) are not "
                        "supported; jaxsft's Qwen3-MoE has an MoE block in every layer")
    if kind == "olmoe" and getattr(cfg, "clip_qkv", None) is not None:
        raise UserError(f"olmoe: clip_qkv={cfg.clip_qkv} is not supported")
    if kind == "mixtral" and float(getattr(cfg, "router_jitter_noise", 0.0) or 0.0) > 0:
        raise UserError(f"mixtral: router_jitter_noise={cfg.router_jitter_noise} is not supported; set it to 0")


def router_aux_loss_coef(cfg) -> float:
    """The load-balancing loss weight transformers trains with: router_aux_loss_coef when output_router_logits."""
    if not getattr(cfg, "output_router_logits", False):
        return 0.0
    return float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0)


class StackedDense(nnx.Module):
    """One projection of every expert: kernel (experts, in, out), float32 master weights computing in `dtype`."""

    def __init__(self, experts: int, features_in: int, features_out: int, *, dtype, rngs: nnx.Rngs, std: float):
        self.kernel = nnx.Param(nnx.initializers.normal(std)(rngs.params(), (experts, features_in, features_out), F32))
        self.dtype = dtype

    def __call__(self, rows, group_sizes):
        """rows (n, in) sorted by expert, `group_sizes[e]` of them for expert e → (n, out)."""
        return jax.lax.ragged_dot(rows.astype(self.dtype), self.kernel[...].astype(self.dtype), group_sizes)


class Router(nnx.Module):
    """transformers' *TopKRouter weight: kernel (hidden, experts), no bias. Not an nnx.Linear, so LoRA leaves it
    alone, as PEFT does (transformers' router is no nn.Linear either)."""

    def __init__(self, features_in: int, experts: int, *, dtype, rngs: nnx.Rngs, std: float):
        self.kernel = nnx.Param(nnx.initializers.normal(std)(rngs.params(), (features_in, experts), F32))
        self.dtype = dtype

    def __call__(self, x):
        return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)


@jax.custom_vjp
def permute_rows(x, order, inverse):
    """x[order] for a permutation `order` whose inverse is `inverse`; its gradient is the gather g[inverse], not
    the scatter-add JAX would transpose x[order] into (which in bf16 would also add in half precision)."""
    return x[order]


def _permute_fwd(x, order, inverse):
    return x[order], inverse


def _permute_bwd(inverse, g):
    return g[inverse], None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


class Experts(nnx.Module):
    """Every expert's gated MLP, down(act(gate(x)) * up(x)), applied to the rows routed to it."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        e, d, std = num_experts(cfg), cfg.hidden_size, cfg.initializer_range
        f = cfg.intermediate_size if cfg.model_type != "qwen3_moe" else cfg.moe_intermediate_size
        self.names = EXPERT_NAMES[cfg.model_type][1]
        gate, up, down = self.names
        setattr(self, gate, StackedDense(e, d, f, dtype=dtype, rngs=rngs, std=std))
        setattr(self, up, StackedDense(e, d, f, dtype=dtype, rngs=rngs, std=std))
        setattr(self, down, StackedDense(e, f, d, dtype=dtype, rngs=rngs, std=std))
        self.num_experts, self.act = e, activation(cfg.hidden_act)

    def __call__(self, x, index, weight):
        """x (n, d); index, weight (n, k): each token's experts and their weights → (n, d), in x's dtype."""
        n, k = index.shape
        gate, up, down = (getattr(self, name) for name in self.names)
        flat = index.reshape(-1)
        order = jnp.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        inverse = jnp.argsort(order)
        sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
        rows = permute_rows(jnp.repeat(x, k, axis=0), order, inverse)
        h = self.act(gate(rows, sizes)) * up(rows, sizes)
        y = permute_rows(down(h, sizes), inverse, order).reshape(n, k, -1)  # back to (token, slot) order
        return (y * weight[..., None].astype(y.dtype)).sum(axis=1).astype(x.dtype)


class SparseMoE(nnx.Module):
    """transformers' *SparseMoeBlock: the router (`gate`, no bias) and the experts."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        self.gate = Router(cfg.hidden_size, num_experts(cfg), dtype=dtype, rngs=rngs, std=cfg.initializer_range)
        self.experts = Experts(cfg, dtype, rngs)
        self.top_k = int(cfg.num_experts_per_tok)
        kind = cfg.model_type
        self.renormalize = kind == "mixtral" or bool(getattr(cfg, "norm_topk_prob", False))
        self.weights_in_compute_dtype = kind != "mixtral"  # Qwen3-MoE / OLMoE cast them to the logits' dtype

    def __call__(self, x):
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        logits = self.gate(flat)
        sink = _ROUTER_LOGITS.get()
        if sink is not None:
            sink.append(logits)
        weight, index = jax.lax.top_k(jax.nn.softmax(logits.astype(F32), axis=-1), self.top_k)
        if self.renormalize:
            weight = weight / weight.sum(axis=-1, keepdims=True)
        if self.weights_in_compute_dtype:
            weight = weight.astype(logits.dtype)
        return self.experts(flat, index, weight).reshape(b, t, d)


class HeadsRMSNorm(RMSNorm):
    """OLMoE's q/k norm: one RMSNorm over all heads of a projection, applied to its (…, heads, head_dim) view."""

    def __call__(self, x):
        return super().__call__(x.reshape(*x.shape[:-2], -1)).reshape(x.shape)


class MoEAttention(DecoderAttention):
    """The decoder's attention with Qwen3-MoE's per-head or OLMoE's whole-projection q/k RMSNorms."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        super().__init__(cfg, dtype, rngs)
        eps = cfg.rms_norm_eps
        if cfg.model_type == "qwen3_moe":
            self.q_norm = nnx.data(RMSNorm(self.head_dim, eps=eps))  # None (static) before
            self.k_norm = nnx.data(RMSNorm(self.head_dim, eps=eps))
        elif cfg.model_type == "olmoe":
            self.q_norm = nnx.data(HeadsRMSNorm(self.num_heads * self.head_dim, eps=eps))
            self.k_norm = nnx.data(HeadsRMSNorm(self.num_kv_heads * self.head_dim, eps=eps))


class MoELayer(DecoderLayer):
    """x + attn(norm(x)), then + moe(norm(x)); the MoE block under transformers' name (Mixtral: block_sparse_moe)."""

    def __init__(self, cfg, window: int | None, dtype, rngs: nnx.Rngs):
        self.self_attn = MoEAttention(cfg, dtype, rngs)
        self.moe_name = EXPERT_NAMES[cfg.model_type][0]
        setattr(self, self.moe_name, SparseMoE(cfg, dtype, rngs))
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.window = window

    def __call__(self, x, rope, mask, rng, cache=None, layer=0, cache_index=None):
        h, kv = self.self_attn(self.input_layernorm(x), rope, mask, rng, cache, layer, cache_index)
        x = x + h
        return x + getattr(self, self.moe_name)(self.post_attention_layernorm(x)), kv


class MoEModel(DecoderModel):
    """HF's MixtralModel / Qwen3MoeModel / OlmoeModel: DecoderModel with MoE layers."""

    layer_class = MoELayer

    def __init__(self, cfg, dtype, rngs: nnx.Rngs, **options):
        check_supported(cfg)
        super().__init__(cfg, dtype, rngs, **options)


def load_balancing_loss(router_logits: list, num_experts: int, top_k: int, attention_mask=None):
    """transformers' `load_balancing_loss_func`: num_experts x sum over experts of (share of top-k picks) x (mean
    router probability), both over every layer's real tokens (attention_mask (batch, T); None: all tokens)."""
    logits = jnp.stack([x.astype(F32) for x in router_logits])  # (layers, tokens, experts)
    n = logits.shape[1]
    weight = jnp.ones((n,), F32) if attention_mask is None else attention_mask.reshape(-1).astype(F32)
    probs = jax.nn.softmax(logits, axis=-1)
    _, picked = jax.lax.top_k(probs, top_k)
    picks = jax.nn.one_hot(picked, num_experts, dtype=F32).sum(axis=2)  # (layers, tokens, experts), no gradient
    rows = jnp.maximum(weight.sum(), 1.0) * logits.shape[0]  # a batch without tokens: 0, not transformers' NaN
    tokens_per_expert = jnp.einsum("lne,n->e", picks, weight) / rows
    prob_per_expert = jnp.einsum("lne,n->e", probs, weight) / rows
    return jnp.sum(tokens_per_expert * prob_per_expert) * num_experts


class MoEForCausalLM(CausalLM):
    """HF's MixtralForCausalLM / Qwen3MoeForCausalLM / OlmoeForCausalLM."""

    base_prefix, embedding_name = "model", "embed_tokens"

    def __init__(self, cfg, dtype=jnp.float32, *, rngs: nnx.Rngs, **options):
        super().__init__(MoEModel(cfg, dtype, rngs, **options), cfg, dtype, rngs,
                         kv_heads=kv_heads(cfg), head_dim=head_dim(cfg),
                         tied=bool(getattr(cfg, "tie_word_embeddings", False)))
        self.router_aux_loss_coef = router_aux_loss_coef(cfg)
        self.num_experts, self.top_k = num_experts(cfg), int(cfg.num_experts_per_tok)

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, rng=None, cache=None,
                 cache_index=None, hidden_only: bool = False, router_aux_loss: bool = False):
        """CausalLM's outputs; `router_aux_loss` (teacher forcing): (those outputs, the load-balancing loss)."""
        if not router_aux_loss:
            return super().__call__(input_ids, attention_mask, positions=positions, segment_ids=segment_ids, rng=rng,
                                    cache=cache, cache_index=cache_index, hidden_only=hidden_only)
        if self.model.remat != "none":
            raise UserError("the MoE load-balancing loss (output_router_logits in the checkpoint's config) cannot "
                            "be collected from rematerialised layers; set model.remat=none")
        sink: list = []
        with context_value(_ROUTER_LOGITS, sink):
            out = super().__call__(input_ids, attention_mask, positions=positions, segment_ids=segment_ids, rng=rng,
                                   hidden_only=hidden_only)
        if attention_mask is None and segment_ids is not None:
            attention_mask = segment_ids > 0
        return out, load_balancing_loss(sink, self.num_experts, self.top_k, attention_mask)


# Model options this family takes from the config (models.build_model passes them on); no scan_layers.
OPTIONS = ("remat", "neftune_noise_alpha")


def causal_lm(cfg, dtype, rngs: nnx.Rngs, **options) -> nnx.Module:
    return MoEForCausalLM(cfg, dtype, rngs=rngs, **options)


def hf_architecture(cfg, task: str) -> str:
    """The transformers class name an export of this family and task loads as."""
    return ARCHITECTURE_NAMES[cfg.model_type]


# Sharding: the experts' leading axis over 'expert', each expert's kernel as the decoder's MLP (fsdp on one large
# dimension, tensor on the hidden units); the router is small and follows 'fsdp' on its input. Then the decoder's
# table (attention, embeddings, heads).
PARTITION_RULES = (
    (r"experts\.(gate_proj|up_proj|w1|w3)\.kernel$", P("expert", "fsdp", "tensor")),
    (r"experts\.(down_proj|w2)\.kernel$", P("expert", "tensor", "fsdp")),
    (r"(mlp|block_sparse_moe)\.gate\.kernel$", P("fsdp")),
) + decoder.PARTITION_RULES
