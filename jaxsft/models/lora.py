"""LoRA: low-rank adapters on chosen linear layers; the base weights stay frozen and carry no optimizer state.

`inject(model, lora_config)` turns every matching projection (an `nnx.Linear` or GPT-2's `Conv1D`, chosen by
regexes over the module path such as `model.layers.3.self_attn.q_proj`) into its LoRA variant, which adds
two parameters `lora_A.kernel` (in, r) and `lora_B.kernel` (r, out): y = base(x) + B(A(dropout(x))) * alpha / r.
Under the PT↔Flax name rule these are PEFT's own names (`…q_proj.lora_A.weight`, shape (r, in)), so the
adapters-only export is the flat dict renamed. Initialisation follows PEFT: A Kaiming-uniform, B zero.

LoRA dropout needs a key inside the layer: `Functional.apply(..., rng=key)` publishes the step's key through
`dropout_key`, and each adapted layer folds in its own index.
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
ADAPTER_MARKERS = (".lora_A.", ".lora_B.")


def dropout_key(rng):
    """The step's key for LoRA dropout inside the `with` block (Functional.apply publishes it)."""
    return layers.context_value(_KEY, rng)


class _LoRAMixin:
    def _lora(self, x, y):
        rng = _KEY.get()
        if rng is not None and self.lora_dropout > 0:
            x = layers.dropout(x, self.lora_dropout, jax.random.fold_in(rng, 7919 + self.lora_index))
        return y + self.lora_B(self.lora_A(x)) * jnp.asarray(self.lora_scale, y.dtype)


class LoRALinear(_LoRAMixin, nnx.Linear):
    def __call__(self, x, out_sharding=None):
        return self._lora(x, super().__call__(x))


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
                return self._lora(x, super().__call__(x))

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
    adapted = []
    for path, module in list(nnx.iter_modules(model)):
        name = ".".join(str(p) for p in path)
        leaf = name.rsplit(".", 1)[-1]
        if not name or not any(p.fullmatch(leaf) or p.fullmatch(name) for p in patterns):
            continue
        if not (isinstance(module, nnx.Linear) or type(module).__name__ == "Conv1D"):
            continue
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
        _replace(model, path, module, _lora_class(type(module)))
        adapted.append(name)
    if not adapted:
        linear = sorted({".".join(map(str, p)).rsplit(".", 1)[-1] for p, m in nnx.iter_modules(model)
                         if isinstance(m, nnx.Linear) or type(m).__name__ == "Conv1D"})
        raise UserError(f"lora.target_modules {list(lora_config.target_modules)} match no linear layer of this "
                        f"model; its linear layers are named {', '.join(linear)}")
    return adapted


_ADAPTER = re.compile(r"^(.*)\.lora_([AB])\.kernel$")


def adapter_spec(path: str, base_rule) -> P | None:
    """Sharding rule of an adapter (None: not an adapter): lora_A (in, r) shards its input like the adapted
    layer's kernel, lora_B (r, out) its output, so x @ A @ B splits like x @ W. `base_rule(name)` is the
    family's rule for a parameter name (None: replicated)."""
    m = _ADAPTER.match(path)
    if m is None:
        return None
    spec = base_rule(f"{m[1]}.kernel") or base_rule(f"{m[1]}.weight")  # nnx.Linear, or GPT-2's Conv1D
    spec = tuple(spec or ()) + (None, None)
    return P(spec[0]) if m[2] == "A" else P(None, spec[1])


def is_adapter(path: str) -> bool:
    return any(m in f".{path}" for m in ADAPTER_MARKERS)


def trainable_predicate(model: nnx.Module, task: str):
    """With LoRA, adapters train; so does a newly added task head outside the base model (e.g. a classifier)."""
    base = getattr(model, "base_prefix", "")

    def pred(path: str) -> bool:
        return is_adapter(path) or (task == "classification" and not path.startswith(base + "."))

    return pred


class Merged(Mapping):
    """`params` with every adapter folded into its base weight (W + A @ B * scale) and the adapter params left out,
    each merged weight made only when it is read: export reads one tensor at a time, so no host or device ever
    holds more than one merged weight. A base weight that is a jax.Array is merged on its devices, in its sharding
    (spread over processes too: then every process must read it, as export's gather does); numpy on the host."""

    def __init__(self, params: dict, scales: dict[str, float]):
        self.base = {k: v for k, v in params.items() if not is_adapter(k)}  # merged weights keep these shapes
        self.adapted = {}
        for module, scale in scales.items():
            key = f"{module}.kernel" if f"{module}.kernel" in self.base else f"{module}.weight"
            self.adapted[key] = (params[f"{module}.lora_A.kernel"], params[f"{module}.lora_B.kernel"], scale)

    def __getitem__(self, key: str):
        w = self.base[key]
        if key not in self.adapted:
            return w
        a, b, scale = self.adapted[key]
        if isinstance(w, jax.Array):
            return jax.device_put(_merge_on_devices(w, a, b, np.float32(scale)), w.sharding)
        a, b = (np.asarray(jax.device_get(x), np.float32) for x in (a, b))
        return np.asarray(w, np.float32) + (a @ b) * scale

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def merge(params: dict, scales: dict[str, float]) -> Merged:
    """Folds adapters into the base weights for export (W += A @ B * scale, adapters dropped), lazily: `Merged`."""
    return Merged(params, scales)


@jax.jit
def _merge_on_devices(w, a, b, scale):
    f32 = jnp.float32
    return w.astype(f32) + (a.astype(f32) @ b.astype(f32)) * scale


def adapter_scales(model: nnx.Module) -> dict[str, float]:
    return {".".join(map(str, p)): m.lora_scale for p, m in nnx.iter_modules(model) if hasattr(m, "lora_scale")}
