"""Workdir paths: a local folder (pathlib, exactly as before) or a `gs://` URL (etils.epath over gcsfs); data files
may be `gs://` URLs too (`local_file`: downloaded once per process, then read as local files).

Everything jaxsft writes into or reads from a workdir goes through `path()`; Orbax takes the same `gs://` path
and writes through TensorStore's GCS driver. An object store has no append, no flock and no atomic folder
rename: callers keep append-only files in memory and write them whole (`write_bytes`), and a folder "rename" is
a copy then delete (`rename`). Transformers reads and writes only local folders, so `local_copy` downloads a
remote folder once per process and `upload_folder` sends a local one up.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

from jaxsft.errors import UserError

SCHEMES = ("gs",)
AnyPath = Union[Path, "os.PathLike"]  # a pathlib.Path, or an epath.Path for a remote URL
_downloads: dict[str, Path] = {}

try:  # Orbax writes through TensorStore, not gcsfs: a cached gcsfs listing would miss its new step folders
    import fsspec

    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
except ImportError:
    pass


def is_remote(p) -> bool:
    """A URL (`scheme://...`) rather than a local path."""
    return "://" in (p if isinstance(p, str) else os.fspath(p))


def path(p) -> AnyPath:
    """A local pathlib.Path, or an etils.epath.Path for `gs://` (refused, naming the fix, without gcsfs)."""
    text = p if isinstance(p, str) else os.fspath(p)
    if not is_remote(text):
        return Path(text)
    _check_url(text, "folder", "workdirs")
    from etils import epath

    return p if isinstance(p, epath.Path) else epath.Path(text)


def _check_url(text: str, local: str, what: str) -> None:
    """Refuses a URL of a scheme jaxsft cannot use, or gs:// without gcsfs, naming the fix (`local`: "folder" or
    "file", the local alternative; `what`: what needs gcsfs, e.g. "workdirs")."""
    scheme = text.split("://", 1)[0]
    if scheme not in SCHEMES:
        raise UserError(f"{text}: {scheme}:// is not supported; use a local {local} or gs://bucket/path")
    try:
        import gcsfs  # noqa: F401 - epath's fsspec backend needs it for gs://
    except ImportError:
        raise UserError(f"{text}: gs:// {what} need gcsfs: pip install 'jaxsft[gcs]'") from None


def file_sizes(folder: AnyPath) -> dict[str, int]:
    """{path relative to folder: size in bytes} of every file below `folder` ({} if there is none)."""
    folder = path(folder)
    if not is_remote(folder):
        return {str(q.relative_to(folder)): q.stat().st_size for q in sorted(folder.rglob("*")) if q.is_file()}
    fs, root = _fsspec(folder)
    found = fs.find(root, detail=True) if fs.exists(root) else {}
    return {name[len(root):].lstrip("/"): int(info.get("size") or 0) for name, info in sorted(found.items())
            if info.get("type") == "file" and name.rstrip("/") != root.rstrip("/")}


def rmtree(p: AnyPath) -> None:
    """Removes a folder and all below it; nothing if it does not exist."""
    p = path(p)
    if is_remote(p):
        if p.exists():
            p.rmtree()
        return
    shutil.rmtree(p, ignore_errors=True)


def rename(src: AnyPath, dst: AnyPath) -> None:
    """Moves a folder (local: one atomic rename; remote: a server-side copy of every object, then the originals
    deleted; not gcsfs's own move, whose object-move call not every GCS endpoint answers)."""
    src, dst = path(src), path(dst)
    if not is_remote(src):
        src.rename(dst)
        return
    fs, src_root = _fsspec(src)
    _, dst_root = _fsspec(dst)
    names = list(file_sizes(src))
    if names:
        fs.copy([f"{src_root}/{n}" for n in names], [f"{dst_root}/{n}" for n in names])
    fs.rm(src_root, recursive=True)


def write_bytes(p: AnyPath, data: bytes) -> None:
    """Writes a file whole: locally through a temp file and a rename (a crash leaves the old or the new one); an
    object store replaces the object atomically by itself."""
    p = path(p)
    if is_remote(p):
        p.write_bytes(data)
        return
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)


def local_copy(folder: AnyPath) -> Path:
    """A local folder with `folder`'s files: `folder` itself when local; a remote one is downloaded once per
    process into a temp folder removed at exit."""
    if not is_remote(folder):
        return Path(folder)
    key = os.fspath(folder)
    if key not in _downloads:
        src = path(folder)
        dst = Path(tempfile.mkdtemp(prefix="jaxsft-workdir-"))
        atexit.register(shutil.rmtree, dst, True)
        for rel in file_sizes(src):
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((src / rel).read_bytes())
        _downloads[key] = dst
    return _downloads[key]


def local_file(p, key: str) -> Path:
    """A local path for a data file: `p` itself when local; a `gs://` one is downloaded once per process (into a
    temp folder removed at exit, under its own name so its suffix still tells the format). `key` (e.g. data.train)
    names the config key in every error."""
    text = p if isinstance(p, str) else os.fspath(p)
    if not is_remote(text):
        return Path(text).expanduser()
    if text not in _downloads:
        try:
            _check_url(text, "file", "data files")
        except UserError as e:
            raise UserError(f"{key}: {e}") from None
        src = path(text)
        if not src.exists():
            raise UserError(f"{key}: file not found: {text}")
        if src.is_dir():
            raise UserError(f"{key}: {text} is a directory, not a data file")
        dst = Path(tempfile.mkdtemp(prefix="jaxsft-data-"))
        atexit.register(shutil.rmtree, dst, True)
        with src.open("rb") as fin, open(dst / src.name, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 24)
        _downloads[text] = dst / src.name
    return _downloads[text]


def upload_folder(local: Path, remote: AnyPath) -> None:
    """Copies every file of a local folder to `remote` (same relative names)."""
    remote = path(remote)
    for rel in file_sizes(local):
        (remote / rel).write_bytes((Path(local) / rel).read_bytes())


def _fsspec(p) -> tuple:
    """(fsspec filesystem, path without the scheme) for a remote path."""
    import fsspec

    text = os.fspath(p)
    fs, root = fsspec.core.url_to_fs(text)
    return fs, root.rstrip("/")
