"""LoRA: low-rank adapters on chosen linear layers; the base weights stay frozen and carry no optimizer state.

`inject(model, lora_config)` turns every matching projection (an `nnx.Linear` or GPT-2's `Conv1D`, chosen by
regexes over the module path such as `model.layers.3.self_attn.q_proj`) into its LoRA variant, which adds
two parameters `lora_A.kernel` (in, r) and `lora_B.kernel` (r, out): y = base(x) + B(A(dropout(x))) * alpha / r.
Under the PT↔Flax name rule these are PEFT's own names (`…q_proj.lora_A.weight`, shape (r, in)), so the
adapters-only export is the flat dict renamed. Initialisation follows PEFT: A Kaiming-uniform, B zero.

LoRA dropout needs a key inside the layer: `Functional.apply(..., rng=key)` publishes the step's key through
`dropout_key`, and each adapted layer folds in its own index.

DoRA (`lora.use_dora`, PEFT's `LoraConfig(use_dora=True)`): each adapted layer also has a magnitude vector m, one
value per output feature, and computes y = m / ||W + s·B·A|| · (x W + s·B(A(x))) + bias, the norm taken per output
feature and held constant in the backward pass (stop_gradient, as PEFT detaches it); with dropout in training,
PEFT's code path: base(x) + (g - 1) · (drop(x) W) + g · s·B(A(drop(x))), g = m / ||…||. m starts at ||W|| (B = 0),
which needs the base weight's values, and `inject` often runs on a model that has only its shapes (the weights are
loaded straight into their shardings): so the param stored is `lora_magnitude_delta` = m - ||W|| (zeros at the
start), and m = ||W|| + delta is rebuilt from the frozen base weight wherever it is needed (forward, merge, PEFT
export: `magnitudes`). Its gradient is m's, and AdamW's step does not depend on a param's offset (no weight decay
on vectors), so training follows PEFT's m step for step.

QLoRA (`lora.quantize` "int8" | "nf4"): the frozen base kernel of every adapted layer is stored quantised, as two
frozen params replacing it: `<kernel|weight>_qcodes` and `<kernel|weight>_qscale`. int8: symmetric absmax per output
feature, codes (in, out) int8, scales (1, out) float32. nf4: the QLoRA paper's NormalFloat4 codebook (bitsandbytes'
16 values) over blocks of 64 consecutive input-axis weights of one output feature (bitsandbytes' order on the
(out, in) PyTorch weight), codes (in/2, out) uint8 holding two 4-bit codes (the first in the high nibble), absmax
(in/64, out) float32. The layer dequantises in its forward (float32, then the compute dtype); merge, export and
DoRA's norms use the dequantised kernel. Embeddings, norms, the LM head and layers without adapters stay float.
"""

from __future__ import annotations

import contextvars
import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.errors import UserError
from jaxsft.models import layers

_KEY: contextvars.ContextVar = contextvars.ContextVar("jaxsft_lora_key", default=None)
ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_magnitude_delta")
MAGNITUDE = "lora_magnitude_delta"  # DoRA: m - ||W||, one value per output feature (see the module docstring)


def dropout_key(rng):
    """The step's key for LoRA dropout inside the `with` block (Functional.apply publishes it)."""
    return layers.context_value(_KEY, rng)


class _LoRAMixin:
    def _lora(self, x, y):
        rng = _KEY.get()
        dropped = rng is not None and self.lora_dropout > 0
        if dropped:
            x = layers.dropout(x, self.lora_dropout, jax.random.fold_in(rng, 7919 + self.lora_index))
        if not hasattr(self, MAGNITUDE):
            return y + self.lora_B(self.lora_A(x)) * jnp.asarray(self.lora_scale, y.dtype)
        # DoRA, as PEFT's DoraLinearLayer.forward: the base output without its bias (with dropout in training: of
        # the dropped-out input), rescaled by g - 1, plus the adapter's output rescaled by g
        g = dora_factor(self._base_weight(), self.lora_A.kernel[...], self.lora_B.kernel[...],
                        getattr(self, MAGNITUDE)[...], self.lora_scale).astype(y.dtype)
        if dropped:
            base = self._base_matmul(x)
        else:
            bias = self.bias[...] if self.bias is not None else None
            base = y if bias is None else y - bias.astype(y.dtype)
        return y + ((g - 1) * base + g * self.lora_B(self.lora_A(x)) * jnp.asarray(self.lora_scale, y.dtype))


def dora_factor(w, a, b, delta, scale):
    """m / ||W + scale·A@B|| per output feature (float32), the norm a constant for the gradient; `w` (in, out),
    `a` (in, r), `b` (r, out), `delta` = m - ||W|| (out,)."""
    f32 = jnp.float32
    w = jax.lax.stop_gradient(w.astype(f32))
    ab = jax.lax.stop_gradient(a.astype(f32) @ b.astype(f32))
    norm = jax.lax.stop_gradient(jnp.linalg.norm(w + scale * ab, axis=0))
    return (jnp.linalg.norm(w, axis=0) + delta.astype(f32)) / norm


class LoRALinear(_LoRAMixin, nnx.Linear):
    def __call__(self, x, out_sharding=None):
        if not hasattr(self, "quant_base"):
            return self._lora(x, super().__call__(x))
        y = self._base_matmul(x)  # QLoRA: nnx.Linear's x @ kernel + bias on the dequantised kernel
        return self._lora(x, y if self.bias is None else y + self.bias[...].astype(y.dtype))

    def _base_weight(self):
        return _dequantized(self) if hasattr(self, "quant_base") else self.kernel[...]

    def _base_matmul(self, x):
        """x @ kernel as nnx.Linear computes it, without the bias."""
        x, kernel = self.promote_dtype((x, self._base_weight()), dtype=self.dtype)
        kwargs = {} if self.preferred_element_type is None else {"preferred_element_type": self.preferred_element_type}
        return self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision, **kwargs)


def _lora_class(base: type) -> type:
    if issubclass(base, nnx.Linear):
        return LoRALinear
    if base is layers.__dict__.get("Conv1D"):
        return _conv1d_lora()
    raise UserError(f"lora.target_modules matched a {base.__name__}; LoRA adapts linear layers only")


_CONV = {}


def _conv1d_lora():
    if "cls" not in _CONV:
        class LoRAConv1D(_LoRAMixin, layers.Conv1D):
            def __call__(self, x):
                if not hasattr(self, "quant_base"):
                    return self._lora(x, super().__call__(x))
                return self._lora(x, self._base_matmul(x) + self.bias[...].astype(self.dtype))

            def _base_weight(self):
                return _dequantized(self) if hasattr(self, "quant_base") else self.weight[...]

            def _base_matmul(self, x):
                return x.astype(self.dtype) @ self._base_weight().astype(self.dtype)

        _CONV["cls"] = LoRAConv1D
    return _CONV["cls"]


def _in_out(module) -> tuple[int, int]:
    if isinstance(module, nnx.Linear):
        return module.in_features, module.out_features
    w = module.weight.get_value()  # an array, or its shape only (a model loaded straight into shardings)
    return int(w.shape[0]), int(w.shape[1])


def _replace(root, path, module, cls) -> None:
    """Swaps `module` (at `path` under `root`) for an instance of `cls` sharing its attributes and variables."""
    new = object.__new__(cls)
    vars(new).update(vars(module))
    parent = root
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def inject(model: nnx.Module, lora_config, seed: int = 0) -> list[str]:
    """Adds adapters to the matching linear layers in place; returns their module paths."""
    rank = int(lora_config.rank)
    patterns = [re.compile(p) for p in lora_config.target_modules]
    if not patterns:
        raise UserError("lora.target_modules is empty")
    rngs = nnx.Rngs(seed + 1)
    dora = bool(lora_config.get("use_dora", False))  # .get: workdirs from before the key
    quant = lora_config.get("quantize") or ""  # .get: workdirs from before the key
    if quant not in QUANTIZE:
        raise UserError(f"config.lora.quantize: {quant!r} is not one of '', 'int8', 'nf4'")
    base = getattr(model, "base_prefix", "")
    adapted = []
    for path, module in list(nnx.iter_modules(model)):
        name = ".".join(str(p) for p in path)
        leaf = name.rsplit(".", 1)[-1]
        if not name or not any(p.fullmatch(leaf) or p.fullmatch(name) for p in patterns):
            continue
        if not (isinstance(module, nnx.Linear) or type(module).__name__ == "Conv1D"):
            continue
        if dora and base and not name.startswith(base + ".") and not isinstance(model, layers.CausalLM):
            raise UserError(f"lora.use_dora: lora.target_modules matched {name}, the new task head, which trains "
                            "in full; DoRA adapts frozen layers only: leave it out of lora.target_modules")
        d_in, d_out = _in_out(module)
        dtype = getattr(module, "dtype", None) or jnp.float32
        bound = 1.0 / math.sqrt(d_in)  # PEFT: kaiming_uniform_(a=sqrt(5)) on (r, in)
        module.lora_A = nnx.Linear(d_in, rank, use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                                   kernel_init=lambda k, shape, dt, b=bound: jax.random.uniform(k, shape, dt, -b, b))
        module.lora_B = nnx.Linear(rank, d_out, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                                   kernel_init=nnx.initializers.zeros, rngs=rngs)
        module.lora_scale = float(lora_config.alpha) / rank
        module.lora_dropout = float(lora_config.dropout)
        module.lora_index = len(adapted)
        if dora:  # m = ||W|| + delta: delta 0 is PEFT's start, m = ||W + s·B·A|| with B = 0
            setattr(module, MAGNITUDE, nnx.Param(jnp.zeros((d_out,), jnp.float32)))
        if quant:
            _quantize_module(module, quant, name)
        _replace(model, path, module, _lora_class(type(module)))
        adapted.append(name)
    if not adapted:
        linear = sorted({".".join(map(str, p)).rsplit(".", 1)[-1] for p, m in nnx.iter_modules(model)
                         if isinstance(m, nnx.Linear) or type(m).__name__ == "Conv1D"})
        raise UserError(f"lora.target_modules {list(lora_config.target_modules)} match no linear layer of this "
                        f"model; its linear layers are named {', '.join(linear)}")
    return adapted


_ADAPTER = re.compile(rf"^(.*)\.(?:lora_([AB])\.kernel|{MAGNITUDE})$")


def adapter_spec(path: str, base_rule) -> P | None:
    """Sharding rule of an adapter (None: not an adapter): lora_A (in, r) shards its input like the adapted
    layer's kernel, lora_B (r, out) and DoRA's magnitude (out,) its output, so x @ A @ B splits like x @ W.
    `base_rule(name)` is the family's rule for a parameter name (None: replicated)."""
    q = _QUANT.match(path)
    if q is not None:  # QLoRA codes / scales (2-D, output features last): split over the kernel's output axis
        spec = tuple(base_rule(f"{q[1]}.{q[2]}") or ()) + (None, None)
        return P(None, spec[1])
    m = _ADAPTER.match(path)
    if m is None:
        return None
    spec = base_rule(f"{m[1]}.kernel") or base_rule(f"{m[1]}.weight")  # nnx.Linear, or GPT-2's Conv1D
    spec = tuple(spec or ()) + (None, None)
    return P(spec[0]) if m[2] == "A" else P(spec[1]) if m[2] is None else P(None, spec[1])


def is_adapter(path: str) -> bool:
    return any(m in f".{path}" for m in ADAPTER_MARKERS)


def trainable_predicate(model: nnx.Module, task: str):
    """With LoRA, adapters train; so does a newly added task head outside the base model (e.g. a classifier)."""
    base = getattr(model, "base_prefix", "")

    def pred(path: str) -> bool:
        return is_adapter(path) or (task == "classification" and not path.startswith(base + "."))

    return pred


class Merged(Mapping):
    """`params` with every adapter folded into its base weight (W + A @ B * scale; DoRA: that times m / ||that||
    per output feature, as PEFT merges) and the adapter params left out,
    each merged weight made only when it is read: export reads one tensor at a time, so no host or device ever
    holds more than one merged weight. A base weight that is a jax.Array is merged on its devices, in its sharding
    (spread over processes too: then every process must read it, as export's gather does); numpy on the host."""

    def __init__(self, params: dict, scales: dict[str, float]):
        self.quantized = quantized_kernels(params)  # QLoRA: {kernel name: (codes, scales)}, dequantised when read
        self.base = {k: v for k, v in params.items() if not is_adapter(k) and not _QUANT.match(k)}
        self.base.update({k: jax.ShapeDtypeStruct(kernel_shape(c), np.float32) for k, (c, _) in self.quantized.items()})
        self.adapted = {}
        for module, scale in scales.items():
            key = f"{module}.kernel" if f"{module}.kernel" in self.base else f"{module}.weight"
            self.adapted[key] = (params[f"{module}.lora_A.kernel"], params[f"{module}.lora_B.kernel"], scale,
                                 params.get(f"{module}.{MAGNITUDE}"))

    def __getitem__(self, key: str):
        w = self.base[key] if key not in self.quantized else dequantize(*self.quantized[key])
        if key not in self.adapted:
            return w
        a, b, scale, delta = self.adapted[key]
        if isinstance(w, jax.Array):
            if delta is None:
                return jax.device_put(_merge_on_devices(w, a, b, np.float32(scale)), w.sharding)
            return jax.device_put(_merge_on_devices(w, a, b, np.float32(scale), delta), w.sharding)
        a, b = (np.asarray(jax.device_get(x), np.float32) for x in (a, b))
        w = np.asarray(w, np.float32)
        merged = w + (a @ b) * scale
        if delta is None:
            return merged
        m = np.linalg.norm(w, axis=0) + np.asarray(jax.device_get(delta), np.float32)
        return merged * (m / np.linalg.norm(merged, axis=0))

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def merge(params: dict, scales: dict[str, float]) -> Merged:
    """Folds adapters into the base weights for export (W += A @ B * scale, adapters dropped), lazily: `Merged`."""
    return Merged(params, scales)


@jax.jit
def _merge_on_devices(w, a, b, scale, delta=None):
    f32 = jnp.float32
    merged = w.astype(f32) + (a.astype(f32) @ b.astype(f32)) * scale
    if delta is None:
        return merged
    m = jnp.linalg.norm(w.astype(f32), axis=0) + delta.astype(f32)
    return merged * (m / jnp.linalg.norm(merged, axis=0))


def magnitudes(params: dict) -> dict[str, object]:
    """DoRA: {adapted module path: its magnitude vector m = ||W|| + delta} (float32, (out,)), PEFT's
    `lora_magnitude_vector`: jax.Arrays where the base weight is one (computed on its devices), else numpy."""
    out = {}
    for key, delta in params.items():
        if not key.endswith(f".{MAGNITUDE}"):
            continue
        module = key[: -len(MAGNITUDE) - 1]
        quant = quantized_kernels(params)
        kernel = next(k for k in (f"{module}.kernel", f"{module}.weight") if k in params or k in quant)
        w = dequantize(*quant[kernel]) if kernel in quant else params[kernel]
        if isinstance(w, jax.Array):
            out[module] = _magnitude_on_devices(w, delta)
        else:
            out[module] = np.linalg.norm(np.asarray(w, np.float32), axis=0) + np.asarray(jax.device_get(delta),
                                                                                          np.float32)
    return out


@jax.jit
def _magnitude_on_devices(w, delta):
    return jnp.linalg.norm(w.astype(jnp.float32), axis=0) + delta.astype(jnp.float32)


def magnitude_delta(w, m) -> np.ndarray:
    """The stored DoRA param for magnitude vector `m` (e.g. PEFT's) on base weight `w` (in, out): m - ||W||."""
    return np.asarray(m, np.float32) - np.linalg.norm(np.asarray(w, np.float32), axis=0)


def adapter_scales(model: nnx.Module) -> dict[str, float]:
    return {".".join(map(str, p)): m.lora_scale for p, m in nnx.iter_modules(model) if hasattr(m, "lora_scale")}


# ---- QLoRA: the frozen base kernels of adapted layers, quantised (see the module docstring) -------------------------

QUANTIZE = ("", "int8", "nf4")
NF4_BLOCK = 64
# bitsandbytes' NF4 codebook (functional.get_4bit_type("nf4")), the QLoRA paper's NormalFloat4 values
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
_QUANT = re.compile(r"^(.*)\.(kernel|weight)_q(codes|scale)$")


def quantize(w, kind: str):
    """(codes, scales) of a float kernel `w` (in, out): int8 per output feature, or nf4 per 64-weight block."""
    f32 = jnp.float32
    w = jnp.asarray(w).astype(f32)
    if kind == "int8":
        amax = jnp.max(jnp.abs(w), axis=0, keepdims=True)  # (1, out)
        scale = jnp.where(amax > 0, amax / 127, 1.0).astype(f32)
        return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale
    d_in, d_out = w.shape
    blocks = w.reshape(d_in // NF4_BLOCK, NF4_BLOCK, d_out)
    amax = jnp.max(jnp.abs(blocks), axis=1)  # (in/64, out)
    x = (blocks / jnp.where(amax > 0, amax, 1.0)[:, None]).reshape(d_in, d_out)
    mids = (NF4[1:] + NF4[:-1]) / 2  # nearest codebook value: how many midpoints lie below x
    idx = sum((x > jnp.float32(m)).astype(jnp.uint8) for m in mids).reshape(d_in // 2, 2, d_out)
    return (idx[:, 0] << 4) | idx[:, 1], amax


def dequantize(codes, scale):
    """The float32 kernel (in, out) of `quantize`'s (codes, scales); the kind follows from the codes' dtype."""
    xp = np if isinstance(codes, np.ndarray) else jnp
    if codes.dtype == np.int8:
        return codes.astype(np.float32) * scale
    d_out = codes.shape[-1]
    idx = xp.stack([codes >> 4, codes & 15], axis=1).reshape(-1, NF4_BLOCK, d_out)
    return (xp.asarray(NF4)[idx] * scale[:, None]).reshape(-1, d_out)


def kernel_shape(codes) -> tuple[int, int]:
    return (codes.shape[0] * (2 if codes.dtype == np.uint8 else 1), codes.shape[1])


def _dequantized(module):
    base = module.quant_base
    return dequantize(getattr(module, f"{base}_qcodes")[...], getattr(module, f"{base}_qscale")[...])


def _quantize_module(module, kind: str, name: str) -> None:
    """Replaces the module's float base kernel with its quantised codes and scales (values when it has values,
    shapes when it has only shapes: the loaded weights are quantised later by `quantize_params`)."""
    base = "kernel" if isinstance(module, nnx.Linear) else "weight"
    w = getattr(module, base).get_value()
    if kind == "nf4" and w.shape[0] % NF4_BLOCK:
        raise UserError(f"lora.quantize=nf4: {name} has {w.shape[0]} input features, not a multiple of {NF4_BLOCK} "
                        "(the NF4 block size); use lora.quantize=int8 or leave it out of lora.target_modules")
    codes, scale = (jax.eval_shape(lambda v: quantize(v, kind), w) if isinstance(w, jax.ShapeDtypeStruct)
                    else quantize(w, kind))
    delattr(module, base)
    setattr(module, f"{base}_qcodes", nnx.Param(codes))
    setattr(module, f"{base}_qscale", nnx.Param(scale))
    module.quant_base = base


def quantized_kernels(params) -> dict[str, tuple]:
    """{float kernel name: (codes, scales)} of the quantised kernels in flat `params`."""
    return {f"{m[1]}.{m[2]}": (params[f"{m[1]}.{m[2]}_qcodes"], params[f"{m[1]}.{m[2]}_qscale"])
            for m in map(_QUANT.match, params) if m is not None and m[3] == "codes"}


def quantize_params(params: dict, model: nnx.Module) -> dict:
    """Flat `params` whose float base kernels the (injected, quantising) `model` holds quantised: each replaced by
    its codes and scales, computed where it lies (on its devices), the float array freed at once."""
    out = dict(params)
    for path, module in nnx.iter_modules(model):
        if not hasattr(module, "quant_base"):
            continue
        prefix = f"{'.'.join(map(str, path))}.{module.quant_base}"
        w = out.pop(prefix)
        kind = "int8" if getattr(module, f"{module.quant_base}_qcodes").get_value().dtype == np.int8 else "nf4"
        out[f"{prefix}_qcodes"], out[f"{prefix}_qscale"] = _quantize_jit(w, kind)
        if isinstance(w, jax.Array):
            w.delete()  # no float copy of the base kernel stays behind
        del w
    return out


_quantize_jit = jax.jit(quantize, static_argnums=1)
