"""Config files (ml_collections `get_config()`), `--config.key=value` overrides, and the resolved config."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from typing import Any

import ml_collections

from jaxsft.errors import UserError


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Imports a config file and returns its `get_config()`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config: file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"jaxsft_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"--config: syntax error in {path} line {e.lineno}: {e.msg}") from e
    except Exception as e:
        raise UserError(f"--config: {path} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise UserError(f"--config: {path} has no get_config()")
    return module.get_config()


def _parse_value(key: str, text: str, current: Any) -> Any:
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"config.{key}: expected a boolean, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise UserError(f"config.{key}: expected an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise UserError(f"config.{key}: expected a number, got {text!r}") from None
    if isinstance(current, (list, tuple)):
        text = text.strip()
        if text.startswith(("[", "(")):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise UserError(f"config.{key}: cannot parse list {text!r}") from None
        else:
            value = [v.strip() for v in text.split(",") if v.strip()]
        return type(current)(value) if isinstance(current, tuple) else list(value)
    if isinstance(current, str):
        return text
    if current is None:  # untyped (None) field: a Python literal if it is one, else the string
        if text.lower() in ("none", "null"):
            return None
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    raise UserError(f"config.{key}: cannot override a {type(current).__name__} field from the command line")


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets `config.<dotted>` from its command-line text; an unknown key is an error naming it."""
    parts = dotted.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise UserError(f"unknown config key: config.{'.'.join(parts[: i + 1])}")
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if current is None:  # a typed placeholder: parse as its declared type
        declared = node.get_type(parts[-1])
        if declared in (bool, int, float, str, list, tuple):
            current = declared()
    if isinstance(current, ml_collections.ConfigDict):
        raise UserError(f"config.{dotted} is a group of keys, not a value")
    value = _parse_value(dotted, text, current)
    try:
        with node.unlocked():
            node[parts[-1]] = value
    except TypeError as e:
        raise UserError(f"config.{dotted}: wrong type for {text!r}: {e}") from None


def split_config_args(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """Pulls `--config PATH` and `--config.key=value` (or `--config.key value`) out of argv."""
    path, overrides, rest = None, [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                path = arg.split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise UserError("--config needs a file path")
                path, i = argv[i + 1], i + 1
        elif arg.startswith("--config."):
            key = arg[len("--config."):]
            if "=" in key:
                key, value = key.split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise UserError(f"--config.{key} needs a value")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return path, overrides, rest


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def from_json_file(path: Path) -> ml_collections.ConfigDict:
    try:
        from jaxsft import fs

        data = json.loads(fs.path(path).read_text())  # a local or gs:// workdir's config.json
    except FileNotFoundError:
        raise UserError(f"{path} not found: is this a jaxsft workdir?") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    return ml_collections.ConfigDict(data)


# Keys a resumed run may change: how long to train, how often to log / evaluate / save, how many checkpoints to
# keep, the hardware layout, and evaluation-only settings. Every other key defines the run (task, model, data and
# its fields, label set, tokenizer, max_length, batch size, optimizer, seed, LoRA, dtype).
RESUMABLE = ("max_steps", "num_epochs", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
             "keep_checkpoints", "checkpoint_metric", "checkpoint_mode", "eval_batch_size",
             "gradient_accumulation_steps", "skip_nonfinite_updates", "data.buckets", "data.num_buckets",
             "data.tfds_data_dir",
             "mesh.", "decode.", "model.remat", "chunked_loss_size", "precompile")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def run_changes(saved: dict, config: ml_collections.ConfigDict, *, unresolved: bool = False
                ) -> tuple[list[str], list[str]]:
    """(defining changes, allowed changes) of `config` against a workdir's saved config.json, as
    `key: old → new`. Keys only one side has (another jaxsft version) are skipped; with `unresolved`, so are keys
    the config leaves unset (None) for the run to infer (labels, num_labels), which are compared once resolved."""
    old, new = _flat(saved), _flat(json.loads(to_json(config)))
    defining, allowed = [], []
    for key in sorted(old.keys() & new.keys()):
        if old[key] == new[key] or (unresolved and new[key] is None):
            continue
        (allowed if _resumable(key) else defining).append(f"{key}: {old[key]!r} → {new[key]!r}")
    return defining, allowed
