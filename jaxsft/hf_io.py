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

from jaxsft.errors import UserError, first_line

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
        if not any((Path(local) / f).is_file() for f in WEIGHT_FILES if not f.startswith("pytorch_model")):
            # older repositories (e.g. microsoft/deberta-v3-base) have only torch .bin weights: fetched only then
            local = snapshot_download(name_or_path, allow_patterns=["pytorch_model.bin*"])
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
    files = _safetensors_files(folder)
    if files is not None:
        from safetensors.numpy import load_file

        out = {}
        for f in files:
            out.update(load_file(f))
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


def _safetensors_files(folder: Path) -> list[Path] | None:
    """The files of a safetensors checkpoint (one file or the shards of an index); None for other formats."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    for shard in shards:
        if not (folder / shard).is_file():
            raise UserError(f"{folder}: shard {shard} named in {index.name} is missing")
    return [folder / shard for shard in shards]


class WeightReader:
    """A checkpoint's weights by PyTorch name: shapes from the file headers, any slice read on demand, so a process
    reads only the pieces its devices keep. safetensors files (one or sharded) are read in slices; HF Flax msgpack
    and torch .bin files cannot be, so those are read whole once (the one exception to sharded loading)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        files = _safetensors_files(self.folder)
        self._whole: dict[str, np.ndarray] | None = None
        self._files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        if files is None:
            self._whole = read_weights(self.folder)
            self.shapes = {k: tuple(np.shape(v)) for k, v in self._whole.items()}
            return
        for path in files:
            try:
                with safe_open(path, framework="numpy") as f:
                    for name in f.keys():
                        self._files[name] = path
                        self.shapes[name] = tuple(f.get_slice(name).get_shape())
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: one line naming the file
                raise safetensors_error(path, e) from None

    def read(self, name: str, index: tuple | None = None) -> np.ndarray:
        """The tensor `name`, or only `index` (a tuple of slices) of it."""
        if self._whole is not None:
            arr = self._whole[name]
            return np.asarray(arr if index is None else arr[index])
        from safetensors import safe_open

        # Opened per read: the file stays memory-mapped while open, and touched pages count as this process's memory.
        try:
            with safe_open(self._files[name], framework="numpy") as f:
                if index is None or len(self.shapes[name]) == 0:
                    return f.get_tensor(name)
                return f.get_slice(name)[tuple(index)]
        except Exception as e:  # noqa: BLE001 - a file truncated after its header: one line naming it
            raise safetensors_error(self._files[name], e) from None


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def readable(path: Path) -> None:
    """The mode other files get (0666 less the umask): safetensors writes 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def safetensors_error(path: Path, e: Exception) -> UserError:
    return UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {first_line(e)[:200]}); "
                     "the download or copy may be cut short: fetch or export it again")


def write_safetensors(weights: dict[str, np.ndarray], folder: Path, filename: str = "model.safetensors") -> None:
    """Writes `model.safetensors` (PyTorch names and layout) with the metadata transformers expects."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, folder / filename, metadata={"format": "pt"})
    readable(folder / filename)


_SIZE_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "TB": 10**12}


def parse_size(size: str | int) -> int:
    """`"5GB"`, `"200KB"`, `"2GiB"` (the units transformers reads max_shard_size in) or a byte count → bytes."""
    text = str(size).strip().upper()
    if text.isdigit():
        return int(text)
    for unit, factor in _SIZE_UNITS.items():
        if text.endswith(unit):
            try:
                value = float(text[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * factor)
    raise UserError(f"--max_shard_size {size!r}: give a size such as 5GB, 500MB or 200KB")


def write_safetensors_sharded(tensors: dict[str, tuple[tuple, np.dtype]], fetch, folder: Path,
                              max_shard_size: str | int = "5GB", write: bool = True) -> list[str]:
    """Writes the tensors as transformers' save_pretrained does: one `model.safetensors` when they fit in
    `max_shard_size`, else `model-0000i-of-0000N.safetensors` shards + `model.safetensors.index.json`.
    `tensors` gives each name's (shape, dtype) in order; `fetch(name)` brings one tensor to this host only when
    its shard is written, so the host holds about one shard. Every process of a multi-process export calls this
    (fetching is collective); only the one with `write` writes. Returns the files written."""
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.numpy import save_file

    sizes = {k: int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for k, (shape, dtype) in tensors.items()}
    split = split_state_dict_into_shards_factory(sizes, get_storage_size=lambda n: n, max_shard_size=parse_size(
        max_shard_size), filename_pattern="model{suffix}.safetensors")
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    for filename, names in split.filename_to_tensors.items():
        shard = {name: np.ascontiguousarray(fetch(name)) for name in names}
        if write:
            save_file(shard, folder / filename, metadata={"format": "pt"})
            readable(folder / filename)
        del shard
    if write and split.is_sharded:
        total_parameters = sum(int(np.prod(shape, dtype=np.int64)) for shape, _ in tensors.values())
        index = {"metadata": {"total_parameters": total_parameters, **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors) + (["model.safetensors.index.json"] if split.is_sharded else [])


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copies the tokenizer (and chat template) files that exist in `src` into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)
            copied.append(name)
    return copied
