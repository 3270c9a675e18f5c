"""JAX's persistent compilation cache, on by default: a rerun (or another run of the same shapes) loads its
compiled steps from disk instead of compiling them again (the default job: 35 s of compilation → 9 s on 2 cores).

`config.compilation_cache` names the folder (default `$XDG_CACHE_HOME/jaxsft/xla`, else `~/.cache/jaxsft/xla`);
"" turns it off. Entries are keyed by the program, the compiler options, the backend and the jax/jaxlib version, so
an upgrade or another device never reads a stale one. Several processes may share the folder: JAX writes each
entry to a temporary file and renames it into place."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger("jaxsft")


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxsft", "xla")


def enable(config) -> str | None:
    """Points JAX at the config's cache folder (created if need be); returns it, or None when off. A folder that
    cannot be created turns the cache off with a warning: a run never fails for its cache. An explicit
    JAX_COMPILATION_CACHE_DIR in the environment wins."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    folder = config.get("compilation_cache", "default")
    if folder in (None, ""):
        return None
    if folder == "default":
        folder = default_dir()
    folder = os.path.expanduser(str(folder))
    if "://" not in folder:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("warning: compilation cache %s cannot be created (%s); compiling without it", folder,
                        e.strerror or type(e).__name__)
            return None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # small steps compile in ~1 s on CPU
    return folder
