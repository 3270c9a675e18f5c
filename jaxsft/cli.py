"""Argument handling the CLIs share: config file + `--config.key=value` overrides, workdir, --verbose."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxsft import config as config_lib
from jaxsft.errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise UserError(f"{self.prog}: {message}")


def parser(prog: str, description: str) -> Parser:
    p = Parser(prog=prog, description=description)
    p.add_argument("--verbose", action="store_true", help="show tracebacks and library logs")
    return p


def config_from_args(argv: list[str], *, workdir_config: Path | None = None, base=None):
    """(config, other args): `--config FILE`, else a workdir's config.json, else `base`; then `--config.*`."""
    path, overrides, rest = config_lib.split_config_args(argv)
    if path is not None:
        config = config_lib.load_config_file(path)
    elif workdir_config is not None:
        config = config_lib.from_json_file(workdir_config)
    elif base is not None:
        config = base
    else:
        raise UserError("--config FILE is required")
    for key, value in overrides:
        config_lib.apply_override(config, key, value)
    return config, rest
