"""Hugging Face checkpoint files: resolve a folder or hub id, read any weight format, write safetensors.

Every reader returns one flat `{pytorch_name: np.ndarray}` dict in PyTorch layout, so a model family keeps a
single name mapping for import and export. HF Flax msgpack trees are converted with the standard PT↔Flax rule.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from jaxsft.errors import UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "flax_model.msgpack",
                "flax_model.msgpack.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "source.spm", "target.spm",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


def resolve(name_or_path: str) -> Path:
    """A local folder as is; otherwise a hub id downloaded (config, tokenizer, weights) into the HF cache."""
    p = Path(os.path.expanduser(name_or_path))
    if p.is_dir():
        return p
    if p.exists():
        raise UserError(f"model.name_or_path: {name_or_path} is a file, not a checkpoint folder")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or not name_or_path
    if looks_local:
        raise UserError(f"model.name_or_path: folder not found: {name_or_path}")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "flax_model.msgpack*",
                                                                "*.txt", "*.model", "*.spm", "*.jinja"])
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise UserError(f"model.name_or_path: cannot get {name_or_path!r} from the Hugging Face hub "
                        f"({type(e).__name__}; offline or unknown id?) and no such local folder exists") from None
    return Path(local)


def _flax_to_pt(tree: dict) -> dict[str, np.ndarray]:
    """Flattens an HF Flax param tree and renames/transposes leaves to PyTorch names and layout."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            path = prefix + [str(k)]
            if isinstance(v, dict):
                walk(v, path)
                continue
            arr = np.asarray(v)
            leaf = path[-1]
            if leaf == "kernel":
                arr = arr.T if arr.ndim == 2 else np.transpose(arr, tuple(range(arr.ndim))[::-1])
                path[-1] = "weight"
            elif leaf in ("scale", "embedding"):
                path[-1] = "weight"
            out[".".join(path)] = arr

    walk(tree, [])
    return out


def _read_msgpack(path: Path) -> dict:
    from flax.serialization import msgpack_restore

    return msgpack_restore(path.read_bytes())


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """Reads the checkpoint's weights (safetensors, sharded safetensors, HF Flax msgpack, or torch .bin)."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        return dict(load_file(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        from safetensors.numpy import load_file

        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise UserError(f"{folder}: shard {shard} named in {index.name} is missing")
            out.update(load_file(folder / shard))
        return out
    if (folder / "flax_model.msgpack").is_file():
        return _flax_to_pt(_read_msgpack(folder / "flax_model.msgpack"))
    flax_index = folder / "flax_model.msgpack.index.json"
    if flax_index.is_file():
        tree: dict = {}
        for shard in sorted(set(json.loads(flax_index.read_text())["weight_map"].values())):
            _deep_merge(tree, _read_msgpack(folder / shard))
        return _flax_to_pt(tree)
    bins = [folder / "pytorch_model.bin"] if (folder / "pytorch_model.bin").is_file() else []
    if (folder / "pytorch_model.bin.index.json").is_file():
        idx = json.loads((folder / "pytorch_model.bin.index.json").read_text())
        bins = [folder / s for s in sorted(set(idx["weight_map"].values()))]
    if bins:
        try:
            import torch
        except ImportError:
            raise UserError(f"{folder} has only pytorch_model.bin weights; install torch to read them, "
                            "or convert the checkpoint to safetensors") from None
        out = {}
        for b in bins:
            sd = torch.load(b, map_location="cpu", weights_only=True)
            out.update({k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()})
        return out
    raise UserError(f"no weights in {folder} (looked for {', '.join(WEIGHT_FILES)})")


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def write_safetensors(weights: dict[str, np.ndarray], folder: Path, filename: str = "model.safetensors") -> None:
    """Writes `model.safetensors` (PyTorch names and layout) with the metadata transformers expects."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, folder / filename, metadata={"format": "pt"})


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copies the tokenizer (and chat template) files that exist in `src` into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)
            copied.append(name)
    return copied
