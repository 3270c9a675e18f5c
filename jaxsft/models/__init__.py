"""Build a family's NNX model from an HF config, fill it with checkpoint weights, and map names both ways.

Parameters travel through the trainer, the optimizer and Orbax as one flat dict `{dotted.path: array}`;
`Functional.apply` turns such a dict back into the NNX module inside jit.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.errors import UserError
from jaxsft.models.registry import builder, family_for

log = logging.getLogger("jaxsft")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"config.dtype: {name!r} is not one of {', '.join(DTYPES)}") from None


def flatten_state(tree, prefix: tuple = ()) -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        path = prefix + (str(k),)
        if isinstance(v, dict):
            out.update(flatten_state(v, path))
        else:
            out[".".join(path)] = v
    return out


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


class Functional:
    """The NNX graph of a model, applied to a flat parameter dict (pure, so it can live under jit)."""

    def __init__(self, model: nnx.Module):
        self.graphdef, _ = nnx.split(model)
        self.trainable = None  # LoRA: predicate over param paths that train (None: all)
        self.lora_scales = {".".join(map(str, p)): m.lora_scale for p, m in nnx.iter_modules(model)
                            if hasattr(m, "lora_scale")}

    def apply(self, params: dict, *args, **kwargs):
        from jaxsft.models import lora

        with lora.dropout_key(kwargs.get("rng")):
            return nnx.merge(self.graphdef, unflatten(params))(*args, **kwargs)

    def method(self, params: dict, name: str, *args, **kwargs):
        """Calls another method of the model (e.g. `init_cache`) on these params."""
        return getattr(nnx.merge(self.graphdef, unflatten(params)), name)(*args, **kwargs)


# Scanned layers (model.scan_layers): one parameter per layer stack, its leading axis the layer index; its path has no
# index after `layers` (`model.layers.self_attn.q_proj.kernel`), the per-layer HF names do (`model.layers.3.…`).
_STACKED = re.compile(r"^((?:.*\.)?layers)\.(?!\d+(?:\.|$))(.+)$")


def stacked_parts(path: str) -> tuple[str, str] | None:
    """(prefix, rest) of a stacked (scanned) layer parameter path; None for any other path."""
    m = _STACKED.match(path)
    return (m.group(1), m.group(2)) if m else None


def unstack_path(path: str, index: int) -> str:
    prefix, rest = stacked_parts(path)
    return f"{prefix}.{index}.{rest}"


def hf_name(path: str) -> tuple[str, bool]:
    """Our dotted parameter path → (PyTorch name, transpose?) under the standard PT↔Flax rule."""
    head, _, leaf = path.rpartition(".")
    if leaf == "kernel":
        return f"{head}.weight", True
    if leaf in ("scale", "embedding"):
        return f"{head}.weight", False
    return path, False


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)  # ours, newly initialised
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, unused


MODEL_OPTION_DEFAULTS = {"remat": "none", "scan_layers": False}


def build_model(hf_config, task: str, dtype, seed: int, options: dict | None = None) -> nnx.Module:
    """A randomly initialised model of the checkpoint's family with the head `task` needs. `options`
    (config.model.remat, .scan_layers): passed on when set away from their defaults, to the families that take
    them (a family's OPTIONS); elsewhere a non-default one is refused."""
    family = family_for(hf_config)
    set_options = {k: v for k, v in (options or {}).items() if v is not None and v != MODEL_OPTION_DEFAULTS.get(k)}
    unsupported = sorted(set(set_options) - set(getattr(family, "OPTIONS", ())))
    if unsupported:
        raise UserError(f"config.model.{unsupported[0]}={set_options[unsupported[0]]!r} is not available for "
                        f"{family.__name__.rsplit('.', 1)[-1]} models (only for llama, mistral, qwen2, qwen3)")
    return builder(family, task)(hf_config, dtype, nnx.Rngs(seed), **set_options)


def load_weights(model: nnx.Module, weights: dict[str, np.ndarray], source: str) -> tuple[dict, LoadReport]:
    """Fills the model's flat params from PyTorch-named weights; returns (params, report)."""
    family_prefix = getattr(model, "base_prefix", "")
    family = family_for_model(model)
    ckpt = {family.normalize_hf_key(k, family_prefix): v for k, v in weights.items()}
    params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    report = LoadReport()
    used = set()
    fallbacks = getattr(family, "WEIGHT_FALLBACKS", {})  # weights transformers ties on load when absent

    def one(path: str, shape: tuple):
        name, transpose = hf_name(path)
        source_name = name if name in ckpt else fallbacks.get(name)
        if source_name not in ckpt:
            report.missing.append(name)
            return None
        if source_name != name:
            log.info("%s: %s is not in the checkpoint; tied to %s as transformers does", source, name, source_name)
        arr = np.asarray(ckpt[source_name])
        arr = arr.T if transpose else arr
        if arr.shape != shape:
            raise UserError(f"{source}: weight {name} has shape {tuple(np.asarray(ckpt[source_name]).shape)}, "
                            f"but its config.json implies {shape[::-1] if transpose else shape}"
                            " (do config.json and the weights come from the same checkpoint?)")
        used.add(source_name)
        return arr

    for path, init in params.items():
        if stacked_parts(path) is None:
            arr = one(path, tuple(init.shape))
        else:  # a scanned layer stack: one HF weight per layer index, stacked on axis 0
            per_layer = [one(unstack_path(path, i), tuple(init.shape[1:])) for i in range(init.shape[0])]
            arr = None if any(a is None for a in per_layer) else np.stack(per_layer)
        if arr is not None:
            params[path] = jnp.asarray(arr, dtype=init.dtype)
    report.unexpected = sorted(k for k in ckpt if k not in used and not k.endswith(family.IGNORED_HF_KEYS))
    if len(used) == 0:
        raise UserError(f"{source}: none of the checkpoint's weights match a {type(model).__name__} "
                        f"(first names: {', '.join(list(ckpt)[:3])})")
    return params, report


def family_for_model(model: nnx.Module):
    import importlib

    return importlib.import_module(type(model).__module__)


def to_hf_weights(params: dict, dtype=np.float32) -> dict[str, np.ndarray]:
    """Flat params → PyTorch-named, PyTorch-layout numpy arrays (for export)."""
    out = {}
    for path, value in params.items():
        arr = np.asarray(jax.device_get(value)).astype(dtype)
        items = [(path, arr)] if stacked_parts(path) is None else \
            [(unstack_path(path, i), arr[i]) for i in range(arr.shape[0])]
        for p, a in items:
            name, transpose = hf_name(p)
            out[name] = np.ascontiguousarray(a.T if transpose else a)
    return out


def report_load(report: LoadReport, model_class: str, source: str) -> None:
    if report.missing:
        log.info("Some weights of %s were not initialized from the model checkpoint at %s and are newly "
                 "initialized: %s\nYou should probably TRAIN this model on a down-stream task.",
                 model_class, source, report.missing)
    if report.unexpected:
        log.info("Some weights of the checkpoint at %s were not used when initializing %s: %s",
                 source, model_class, report.unexpected[:20] + (["..."] if len(report.unexpected) > 20 else []))
