"""Config files (ml_collections `get_config()`), `--config.key=value` overrides, and the resolved config."""

from __future__ import annotations

import ast
import functools
import importlib.util
import io
import json
import logging
import math
import re
import tokenize
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

from jaxsft import defaults
from jaxsft.errors import UserError, first_line

log = logging.getLogger("jaxsft")
NONE_WORDS = ("none", "null")  # `--config.KEY=None` on a placeholder key (default None): None


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
    try:
        config = module.get_config()
    except Exception as e:
        raise UserError(f"--config: {path}: get_config() failed: {type(e).__name__}: "
                        f"{first_line(e)}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"--config: {path}: get_config() returned {type(config).__name__} {_short(config)}, not an "
                        "ml_collections.ConfigDict (start from jaxsft.defaults.base_config())")
    return config


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@functools.lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    return _flat(defaults.base_config().to_dict())


def _declared_type(dotted: str) -> type | None:
    """The type defaults.py gives a key (a placeholder's declared type), or None for a key it does not have."""
    node = defaults.base_config()
    *groups, name = dotted.split(".")
    for g in groups:
        if not isinstance(node, ml_collections.ConfigDict) or g not in node:
            return None
        node = node[g]
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        return None
    return node.get_type(name)


def _optional(node: ml_collections.ConfigDict, name: str, dotted: str) -> bool:
    """A key that may be None: None now, a placeholder in defaults.py, or (a config file's own key) a placeholder
    there."""
    if node[name] is None:
        return True
    if dotted in _defaults():
        return _defaults()[dotted] is None
    return isinstance(node._fields.get(name), config_dict.FieldReference)  # noqa: SLF001


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
                if not text.endswith(("]", ")")):
                    raise UserError(f"config.{key}: cannot parse list {text!r}") from None
                value = [v.strip().strip("'\"") for v in text[1:-1].split(",") if v.strip()]  # [a, b]: unquoted
            if not isinstance(value, (list, tuple)):
                value = [value]  # `(32)` is 32
        else:
            value = [v.strip() for v in text.split(",") if v.strip()]
        value = list(_items(key, value, text))
        return tuple(value) if isinstance(current, tuple) else value
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


def _items(key: str, value: list | tuple, text: str | None = None) -> list:
    """A list key's items converted to / checked against defaults.ITEMS (`--config.data.buckets=32,64` → ints);
    without the command-line `text` (a config file's list), items must have the type already."""
    kinds = defaults.ITEMS.get(key)
    if kinds is None:
        return list(value)
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            ok = None
        elif float in kinds and str not in kinds:  # "0.7" → 0.7 (numbers, ints included)
            try:
                ok = float(item)
            except (ValueError, OverflowError):
                ok = None
        elif int in kinds and str not in kinds and (text is not None or isinstance(item, int)):  # "32" → 32
            try:
                ok = int(item) if isinstance(item, str) or float(item) == int(item) else None
            except (ValueError, OverflowError):
                ok = None
        elif isinstance(item, kinds):
            ok = item
        else:
            ok = None
        if ok is None:
            want = " or ".join({"str": "a string", "int": "an integer", "float": "a number"}[k.__name__]
                               for k in kinds)
            raise UserError(f"config.{key}: item {item!r} is not {want}"
                            + (f" (from {text!r})" if text is not None else ""))
        out.append(ok)
    return out


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets `config.<dotted>` from its command-line text; an unknown key is an error naming it. `None` (or `null`)
    sets a placeholder key (default None) back to None; list items get their type (defaults.ITEMS)."""
    parts = dotted.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise UserError(f"unknown config key: config.{'.'.join(parts[: i + 1])}")
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise UserError(f"config.{dotted} is a group of keys, not a value")
    if text.strip().lower() in NONE_WORDS and _optional(node, parts[-1], dotted):
        with node.unlocked():
            node[parts[-1]] = None
        return
    if current is None:  # a typed placeholder (or a None in a workdir's config.json): parse as its declared type
        declared = node.get_type(parts[-1])
        if declared not in (bool, int, float, str, list, tuple):
            declared = _declared_type(dotted)
        if declared in (bool, int, float, str, list, tuple):
            current = declared()
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
             "mesh.", "decode.", "model.remat", "model.attention", "chunked_loss_size", "precompile",
             "compilation_cache", "early_stopping_patience", "early_stopping_threshold", "report_to",
             "wandb_project")


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


def _interval(spec: str) -> tuple[float, bool, float, bool]:
    m = re.fullmatch(r"([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])", spec)
    return float(m[2]), m[1] == "[", float(m[3]), m[4] == "]"


def allowed(spec: str) -> str:
    """An interval as the error line says it: `[1, inf)` → `>= 1`, `(0, inf)` → `> 0`, else `in [0, 1)`."""
    lo, lo_in, hi, _ = _interval(spec)
    if math.isinf(hi):
        bound = int(lo) if lo == int(lo) else lo
        return f">= {bound}" if lo_in else f"> {bound}"
    return f"in {spec}"


def _within(value: float, spec: str) -> bool:
    lo, lo_in, hi, hi_in = _interval(spec)
    return (lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)


_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _type_ok(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, kind)


def check_values(config: ml_collections.ConfigDict) -> None:
    """Every key holds a value with a meaning, checked before a run loads or writes anything: the keys of
    defaults.py (no more, no fewer), their types, defaults.RANGES, defaults.ITEMS, and the rules between keys. The
    first bad value raises a one-line UserError naming the key, the value and what is allowed."""
    have, base = _flat(config.to_dict()), _defaults()
    missing = [k for k in base if k not in have]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"config.{missing[0]} is missing{more}: a config file starts from "
                        "jaxsft.defaults.base_config()")
    unknown = [k for k in have if k not in base]
    if unknown:
        raise UserError(f"unknown config key: config.{unknown[0]} (python -m jaxsft.run --list-keys lists them)")
    for key, default in base.items():
        value, kind = have[key], type(default) if default is not None else _declared_type(key)
        if value is None:
            if default is not None:
                raise UserError(f"config.{key} is None; it needs {_TYPE_WORDS.get(kind, 'a value')} "
                                f"(default {default!r})")
            continue
        if kind in _TYPE_WORDS and not _type_ok(value, kind):
            raise UserError(f"config.{key} must be {_TYPE_WORDS[kind]}, got {value!r}")
    for key, (spec, note) in defaults.RANGES.items():
        value = have[key]
        if value is not None and not _within(value, spec):
            raise UserError(f"config.{key} must be {allowed(spec)}, got {value!r}" + (f" ({note})" if note else ""))
    if config.max_steps <= 0 and config.num_epochs <= 0:
        raise UserError(f"config.max_steps ({config.max_steps}) and config.num_epochs ({config.num_epochs}) are "
                        "both <= 0: nothing to train")
    if config.data.streaming and config.max_steps <= 0:
        raise UserError(f"config.data.streaming=True needs config.max_steps > 0: a stream has no length, so "
                        f"num_epochs ({config.num_epochs}) cannot count the steps")
    if config.data.streaming and config.data.eval_fraction:
        raise UserError(f"config.data.eval_fraction={config.data.eval_fraction} holds out part of a data set read "
                        "whole; with data.streaming=True set data.eval instead (or data.eval_fraction=0)")
    for key in defaults.ITEMS:
        value = have[key]
        if value is None:
            continue
        _items(key, value)
        seen = set()
        for item in value:
            if item in seen:
                raise UserError(f"config.{key}: {item!r} appears more than once in {list(value)}")
            seen.add(item)
            if isinstance(item, str) and not item.strip():
                raise UserError(f"config.{key}: an empty name in {list(value)}")
    from jaxsft import optim

    if config.model.get("attention", "auto") not in ("auto", "xla"):
        raise UserError(f"config.model.attention must be auto or xla, got {config.model.attention!r}")
    for key, choices in (("lr_scheduler_type", optim.SCHEDULES), ("decay_type", optim.WSD_SHAPES)):
        if config[key] not in choices:
            raise UserError(f"config.{key} must be one of {', '.join(choices)}, got {config[key]!r}")
    bad = [r for r in config.get("report_to", ()) if r not in ("tensorboard", "wandb")]
    if bad:
        raise UserError(f"config.report_to: unknown destination {bad[0]!r} (tensorboard, wandb)")
    if "wandb" in config.get("report_to", ()):
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("config.report_to includes wandb, but the wandb package is not installed: "
                            "pip install 'jaxsft[wandb]' (or wandb)")
    from jaxsft.tasks import causal_lm

    unknown = [m for m in config.decode.get("eval_metrics", ()) if m not in causal_lm.GENERATION_METRICS]
    if unknown:
        raise UserError(f"config.decode.eval_metrics: unknown metric {unknown[0]!r} (one of "
                        f"{', '.join(causal_lm.GENERATION_METRICS)})")
    d = config.data
    if d.loss_on not in causal_lm.LOSS_ON:
        raise UserError(f"config.data.loss_on must be one of {', '.join(causal_lm.LOSS_ON)}, got {d.loss_on!r}")
    if d.train_on_prompt and d.loss_on == "last_turn":
        raise UserError("config.data.train_on_prompt=True trains every token, data.loss_on='last_turn' only the last "
                        "assistant turn: set one (train_on_prompt=True is data.loss_on=all)")
    if not d.train_on_eos and (d.loss_on == "all" or d.train_on_prompt):
        raise UserError("config.data.train_on_eos=False masks the end of the trained turns, but data.loss_on=all "
                        "(or train_on_prompt=True) trains every token")
    if config.task == "classification" and len(d.text_fields) not in (1, 2):
        raise UserError(f"config.data.text_fields: one field, or two for sentence pairs; got {list(d.text_fields)}")
    if (config.task == "classification" and config.model.num_labels != 1 and d.label_names
            and len(d.label_names) < 2):
        raise UserError(f"config.data.label_names: one name ({d.label_names[0]!r}); classification needs at least "
                        "two (model.num_labels=1 for regression)")
    if d.buckets:
        limit, what = config.max_length, f"max_length={config.max_length}"
        if config.task == "seq2seq" and (d.max_target_length or 0) > limit:
            limit, what = d.max_target_length, f"data.max_target_length={d.max_target_length}"
        for b in d.buckets:
            if not 1 <= b <= limit:
                raise UserError(f"config.data.buckets: {b} is outside [1, {limit}] (a padded length: rows are cut at "
                                f"{what}, so no batch is longer)")
    for pattern in config.lora.target_modules:
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"config.lora.target_modules: {pattern!r} is not a regular expression ({e})") from None
    quantize = config.lora.get("quantize") or ""  # .get: workdirs from before the key
    if quantize not in ("", "int8", "nf4"):
        raise UserError(f"config.lora.quantize: {quantize!r} is not one of '' (off), 'int8', 'nf4'")
    if quantize and not config.lora.rank > 0:
        raise UserError(f"config.lora.quantize={quantize} needs config.lora.rank > 0 (QLoRA quantises the frozen base "
                        "under LoRA adapters)")
    if config.lora.get("use_dora") and not config.lora.rank > 0:
        raise UserError("config.lora.use_dora=True needs config.lora.rank > 0 (DoRA is a kind of LoRA)")
    if config.lora.get("use_dora") and config.get("optimizer", "adamw") == "adafactor":
        raise UserError("config.lora.use_dora=True with optimizer=adafactor is not supported (Adafactor scales each "
                        "update by its weight's RMS, and jaxsft stores DoRA's magnitude as m - ||W||); use adamw")


# Position tables (config.json): learned or sinusoidal tables of a fixed size (refused past it); rotary positions
# (past it: a warning, the model extrapolates); T5's relative positions have no limit.
TABLE_POSITIONS = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "gpt2", "marian",
                   "bart", "mbart", "albert")  # BART's learned table has 2 rows more than max_position_embeddings
ROTARY_POSITIONS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral",
                    "qwen3_moe", "olmoe", "modernbert")
PADDING_OFFSET = ("roberta", "xlm-roberta", "camembert")  # positions numbered from pad_token_id + 1


def check_positions(config: ml_collections.ConfigDict, hf_config) -> None:
    """max_length (and seq2seq target / generated lengths) against the model's position table, once the HF config
    is loaded and before anything is written: past a table, a UserError; past a rotary model's trained length, a
    warning."""
    kind = getattr(hf_config, "model_type", None)
    if kind not in TABLE_POSITIONS + ROTARY_POSITIONS:
        return
    field = "n_positions" if kind == "gpt2" else "max_position_embeddings"
    table = getattr(hf_config, field, None)
    if not isinstance(table, int) or isinstance(table, bool) or table <= 0:
        return
    usable, where = table, f"{field} in config.json"
    if kind in PADDING_OFFSET:
        offset = int(getattr(hf_config, "pad_token_id", None) or 0) + 1
        usable, where = table - offset, f"{field}={table} in config.json, less {offset} before the first position"
    lengths = [("max_length", config.max_length)]
    if config.task == "seq2seq":
        lengths += [("data.max_target_length", config.data.max_target_length),
                    ("decode.max_new_tokens", config.decode.max_new_tokens)]
    for key, n in lengths:
        if n is None or n <= usable:
            continue
        line = f"config.{key}={n} exceeds the model's {usable} positions ({where})"
        if kind in ROTARY_POSITIONS:
            log.warning("warning: %s; rotary positions go past the lengths the model was trained on", line)
        else:
            raise UserError(line)


def describe_keys() -> list[str]:
    """`KEY = DEFAULT  # comment (allowed: ...)` for every key, in defaults.py's order; the comment is the one on
    the key's line in defaults.py, with the comment lines right under it."""
    src = Path(defaults.__file__).read_text()
    comment_at = {t.start[0]: t.string.lstrip("#").strip()
                  for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    key_line = re.compile(r"\s*c\.([\w.]+)\s*=")
    comments: dict[str, str] = {}
    order: list[str] = []
    last = None  # the key line (with a comment) right above the comment lines now read
    block: list[str] = []  # comment-only lines read since a key line or a blank line
    first = src[: src.index("def base_config")].count("\n") + 1
    for no, line in enumerate(src[src.index("def base_config"):].splitlines(), first):
        m = key_line.match(line)
        if m:
            own = comment_at.get(no, "")
            if last is not None and block and own:  # under a commented key, above one with its own: continued
                comments[last] += " " + " ".join(block)
            elif block and not own:  # a comment above a key that has none on its line
                own = " ".join(block)
            order.append(m[1])
            comments[m[1]] = own
            last, block = (m[1] if own else None), []
        elif line.strip().startswith("#"):
            block.append(comment_at.get(no, ""))
        else:  # a blank line ends a key's comment; what follows is a section's, or the next key's
            if last is not None and block:
                comments[last] += " " + " ".join(block)
            last, block = None, []
        if line.strip() == "return c":
            break
    base = _defaults()
    keys = [k for k in order if k in base]
    for k in base:  # keys of a group given as one dict (mesh): after the group's line, with its comment
        if k not in keys:
            group = k.rsplit(".", 1)[0]
            at = max((i for i, o in enumerate(keys) if o.startswith(group + ".")), default=None)
            if at is None and group in order:
                at = max((i for i, o in enumerate(keys) if order.index(o) < order.index(group)), default=-1)
            keys.insert(len(keys) if at is None else at + 1, k)
            comments.setdefault(k, comments.get(group, ""))
    width = max(len(f"{k} = {base[k]!r}") for k in keys)
    out = []
    for k in keys:
        text = comments.get(k, "")
        if k in defaults.RANGES:
            text = f"{text} (allowed: {allowed(defaults.RANGES[k][0])})".strip()
        head = f"{k} = {base[k]!r}"
        out.append(f"{head:<{width}}  # {text}" if text else head)
    return out
