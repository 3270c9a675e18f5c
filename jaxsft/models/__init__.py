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
        # MoE families (moe.py): the weight of transformers' router load-balancing loss in training (0: none)
        self.router_aux_loss_coef = float(getattr(model, "router_aux_loss_coef", 0.0) or 0.0)

    def apply(self, params: dict, *args, **kwargs):
        from jaxsft.models import lora

        with lora.dropout_key(kwargs.get("rng")):
            return nnx.merge(self.graphdef, unflatten(params))(*args, **kwargs)

    def method(self, params: dict, name: str, *args, **kwargs):
        """Calls another method of the model (e.g. `init_cache`) on these params."""
        return getattr(nnx.merge(self.graphdef, unflatten(params)), name)(*args, **kwargs)


# Scanned layers (model.scan_layers): one parameter per layer stack, its leading axis the layer index; its path has no
# index after `layers` (`model.layers.self_attn.q_proj.kernel`), the per-layer HF names do (`model.layers.3.…`).
_STACKED = re.compile(r"^((?:.*\.)?layers?)\.(?!\d+(?:\.|$))(.+)$")


def stacked_parts(path: str) -> tuple[str, str] | None:
    """(prefix, rest) of a stacked (scanned) layer parameter path; None for any other path."""
    m = _STACKED.match(path)
    return (m.group(1), m.group(2)) if m else None


# Stacked experts (moe.py): one parameter holds every expert's weight on a leading axis; its path has no index after
# `experts` (`model.layers.0.mlp.experts.gate_proj.kernel`), the per-expert HF names do (`….experts.5.gate_proj.…`).
# Only the HF weight map unstacks them (for sharding and weight decay they are an ordinary 3-D parameter).
_EXPERTS = re.compile(r"^(.*\.experts)\.(?!\d+(?:\.|$))(.+)$")


def hf_stack_parts(path: str) -> tuple[str, str] | None:
    """(prefix, rest) of a parameter that holds one HF tensor per index of its leading axis (scanned layers,
    stacked experts); None for any other path."""
    m = _STACKED.match(path) or _EXPERTS.match(path)
    return (m.group(1), m.group(2)) if m else None


def unstack_path(path: str, index: int) -> str:
    prefix, rest = hf_stack_parts(path)
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


MODEL_OPTION_DEFAULTS = {"remat": "none", "scan_layers": False, "neftune_noise_alpha": 0.0}
OPTION_KEYS = {"remat": "model.remat", "scan_layers": "model.scan_layers", "neftune_noise_alpha": "neftune_noise_alpha"}


def build_model(hf_config, task: str, dtype, seed: int, options: dict | None = None) -> nnx.Module:
    """A randomly initialised model of the checkpoint's family with the head `task` needs. `options`
    (config.model.remat, .scan_layers, config.neftune_noise_alpha): passed on when set away from their defaults,
    to the families that take them (a family's OPTIONS); elsewhere a non-default one is refused."""
    family = family_for(hf_config)
    set_options = {k: v for k, v in (options or {}).items() if v is not None and v != MODEL_OPTION_DEFAULTS.get(k)}
    unsupported = sorted(set(set_options) - set(getattr(family, "OPTIONS", ())))
    if unsupported:
        from jaxsft.models.registry import FAMILIES

        able = sorted(t for t, f in FAMILIES.items() if unsupported[0] in getattr(f, "OPTIONS", ()))
        key = OPTION_KEYS.get(unsupported[0], f"model.{unsupported[0]}")
        raise UserError(f"config.{key}={set_options[unsupported[0]]!r} is not available for "
                        f"{family.__name__.rsplit('.', 1)[-1]} models (only for {', '.join(able)})")
    return builder(family, task)(hf_config, dtype, nnx.Rngs(seed), **set_options)


def _match(shapes: dict[str, tuple], ckpt_shapes: dict[str, tuple], family, model_class: str, source: str):
    """Which checkpoint tensors fill which params: ({path: (names, transpose)}, report) where `names` holds one
    PyTorch name, or one per layer for a scanned stack; params absent from the checkpoint are left out (and
    reported missing). Checks every shape against config.json's."""
    report = LoadReport()
    used = set()
    fallbacks = getattr(family, "WEIGHT_FALLBACKS", {})  # weights transformers ties on load when absent
    plan = {}

    def one(path: str, shape: tuple):
        name, transpose = hf_name(path)
        source_name = name if name in ckpt_shapes else fallbacks.get(name)
        if source_name not in ckpt_shapes:
            report.missing.append(name)
            return None
        if source_name != name:
            log.info("%s: %s is not in the checkpoint; tied to %s as transformers does", source, name, source_name)
        found = tuple(ckpt_shapes[source_name])
        if (found[::-1] if transpose else found) != shape:
            raise UserError(f"{source}: weight {name} has shape {found}, "
                            f"but its config.json implies {shape[::-1] if transpose else shape}"
                            " (do config.json and the weights come from the same checkpoint?)")
        used.add(source_name)
        return source_name, transpose

    for path, shape in shapes.items():
        shape = tuple(shape)
        if hf_stack_parts(path) is None:
            found = [one(path, shape)]
        else:  # a scanned layer stack: one HF weight per layer index, stacked on axis 0
            found = [one(unstack_path(path, i), shape[1:]) for i in range(shape[0])]
        if all(f is not None for f in found):
            plan[path] = ([f[0] for f in found], found[0][1])
    report.unexpected = sorted(k for k in ckpt_shapes if k not in used and not k.endswith(family.IGNORED_HF_KEYS))
    if len(used) == 0:
        raise UserError(f"{source}: none of the checkpoint's weights match a {model_class} "
                        f"(first names: {', '.join(list(ckpt_shapes)[:3])})")
    return plan, report


def _assemble(names: list[str], transpose: bool, stacked: bool, read, index: tuple) -> np.ndarray:
    """`index` (a tuple of slices, in our layout) of one param, read from its checkpoint tensor(s) by
    `read(name, index in PyTorch layout)`."""
    def one(name, idx):
        arr = read(name, tuple(idx)[::-1] if transpose else tuple(idx))
        return arr.T if transpose else arr

    if not stacked:
        return one(names[0], index)
    return np.stack([one(names[i], index[1:]) for i in range(len(names))[index[0]]])


def load_weights(model: nnx.Module, weights: dict[str, np.ndarray], source: str) -> tuple[dict, LoadReport]:
    """Fills the model's flat params from PyTorch-named weights; returns (params, report)."""
    family = family_for_model(model)
    ckpt = {family.normalize_hf_key(k, getattr(model, "base_prefix", "")): v for k, v in weights.items()}
    params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    plan, report = _match({k: v.shape for k, v in params.items()}, {k: np.shape(v) for k, v in ckpt.items()},
                          family, type(model).__name__, source)
    for path, (names, transpose) in plan.items():
        full = (slice(None),) * params[path].ndim
        arr = _assemble(names, transpose, hf_stack_parts(path) is not None,
                        lambda name, idx: np.asarray(ckpt[name])[idx], full)
        params[path] = jnp.asarray(arr, dtype=params[path].dtype)
    return params, report


def load_sharded(build, reader, source: str, mesh, rules=None) -> tuple[nnx.Module, dict, LoadReport]:
    """(abstract model, params, report) for the model `build()` makes, its params global arrays placed straight
    into their shardings (by `rules` on `mesh`; None: replicated): each process reads from `reader`
    (hf_io.WeightReader) only the slices its own devices keep, and nothing builds the whole model in memory.
    Params the checkpoint lacks (new heads) get the values an eager `build()` gives them."""
    from jaxsft import parallel

    model = nnx.eval_shape(build)
    family = family_for_model(model)
    prefix = getattr(model, "base_prefix", "")
    original = {family.normalize_hf_key(k, prefix): k for k in reader.shapes}
    shapes = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    plan, report = _match({k: v.shape for k, v in shapes.items()}, {k: reader.shapes[original[k]] for k in original},
                          family, type(model).__name__, source)
    if rules is None:
        shardings = {k: parallel.replicated(mesh) for k in shapes}
    else:
        shardings = parallel.param_shardings(shapes, rules, mesh)

    def read(name, index):
        return reader.read(original[name], index)

    params = {}
    for path, (names, transpose) in plan.items():
        dtype = np.dtype(shapes[path].dtype)
        reader_of = _slice_reader(names, transpose, hf_stack_parts(path) is not None, read, dtype)
        params[path] = jax.make_array_from_callback(tuple(shapes[path].shape), shardings[path], reader_of, dtype=dtype)
    missing = [k for k in shapes if k not in plan]
    if missing:
        params.update(_init_params(build, {k: shardings[k] for k in missing}))
    return model, {k: params[k] for k in shapes}, report


def init_sharded(build, mesh, rules=None) -> tuple[nnx.Module, dict]:
    """(abstract model, params) of a freshly initialised `build()` (model.from_scratch), each param computed on
    its devices in its sharding (by `rules` on `mesh`; None: replicated): no host holds the whole model, and the
    values equal an eager `build()`'s bit for bit."""
    from jaxsft import parallel

    model = nnx.eval_shape(build)
    shapes = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    if rules is None:
        shardings = {k: parallel.replicated(mesh) for k in shapes}
    else:
        shardings = parallel.param_shardings(shapes, rules, mesh)
    return model, _init_params(build, shardings)


def _slice_reader(names, transpose: bool, stacked: bool, read, dtype):
    """The make_array_from_callback callback of one param: its slice, cast per slice to the param's dtype."""
    pieces: dict = {}  # a partly replicated param asks for the same slice once per device: read it once

    def piece(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in pieces:
            pieces[key] = np.asarray(_assemble(names, transpose, stacked, read, index)).astype(dtype, copy=False)
        return pieces[key]

    return piece


def _init_params(build, shardings: dict) -> dict:
    """The params named in `shardings` as `build()` initialises them, computed in place on their devices (XLA
    drops the rest of the model). Without XLA's algebraic simplifier the values are bit-identical to an eager
    build's (it would fold e.g. `normal() * std` differently from the op-by-op eager run)."""
    def init():
        flat = flatten_state(nnx.to_pure_dict(nnx.state(build(), nnx.Param)))
        return {k: flat[k] for k in shardings}

    lowered = jax.jit(init, out_shardings=shardings).lower()
    try:
        compiled = lowered.compile(compiler_options={"xla_disable_hlo_passes": "algsimp"})
    except Exception as e:  # noqa: BLE001 - a backend that needs the pass: values may differ in the last bit
        log.info("initialising new parameters with XLA's algebraic simplifier (%s)", type(e).__name__)
        compiled = lowered.compile()
    return compiled()


def family_for_model(model: nnx.Module):
    import importlib

    return importlib.import_module(type(model).__module__)


def hf_layout(params: dict) -> dict[str, tuple[str, int | None, bool]]:
    """PyTorch name → (our param path, layer index in a scanned stack or None, transpose?) of every exported
    tensor, in the params' order."""
    out = {}
    for path, value in params.items():
        layers = [None] if hf_stack_parts(path) is None else range(value.shape[0])
        for i in layers:
            name, transpose = hf_name(path if i is None else unstack_path(path, i))
            out[name] = (path, i, transpose)
    return out


def hf_tensor(params: dict, entry: tuple[str, int | None, bool], dtype=np.float32) -> np.ndarray:
    """One exported tensor (an `hf_layout` entry) fetched to this host in PyTorch layout; in a multi-process run
    every process must call it (the pieces are gathered from all of them)."""
    from jaxsft import parallel

    path, layer, transpose = entry
    value = params[path] if layer is None else params[path][layer]  # a scanned stack: one layer's slice only
    arr = (parallel.to_host(value) if isinstance(value, jax.Array) else np.asarray(value)).astype(dtype)
    return np.ascontiguousarray(arr.T if transpose else arr)


def to_hf_weights(params: dict, dtype=np.float32) -> dict[str, np.ndarray]:
    """Flat params → PyTorch-named, PyTorch-layout numpy arrays (for export)."""
    return {name: hf_tensor(params, entry, dtype) for name, entry in hf_layout(params).items()}


def report_load(report: LoadReport, model_class: str, source: str) -> None:
    if report.missing:
        log.info("%s: new weights, randomly initialised (not in the checkpoint %s): %s", model_class, source,
                 ", ".join(report.missing))
    if report.unexpected:
        log.info("Some weights of the checkpoint at %s were not used when initializing %s: %s",
                 source, model_class, report.unexpected[:20] + (["..."] if len(report.unexpected) > 20 else []))
