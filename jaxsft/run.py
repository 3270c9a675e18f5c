"""Train: `python -m jaxsft.run --config configs/classify.py --workdir W [--config.key=value ...]`."""

from __future__ import annotations

import json
import sys

from jaxsft import cli
from jaxsft.errors import run_cli

USAGE = ("python -m jaxsft.run --config FILE --workdir W [--config.KEY=VALUE ...] [--force] [--[no-]multihost] "
         "[--verbose]\n       python -m jaxsft.run --list-keys")


def parser():
    p = cli.parser("jaxsft.run", __doc__)
    p.usage = USAGE
    cli.add_config_help(p)
    p.add_argument("--workdir", required=True, help="run folder: config, checkpoints, metrics (resumes if present)")
    p.add_argument("--force", action="store_true", help="resume even though the config changes keys that define "
                   "the run (model, data, labels, max_length, optimizer, seed, LoRA ...); without it such a rerun is "
                   "refused, listing the changes")
    cli.add_multihost(p)
    return p


def main(argv: list[str]) -> int:
    p = parser()
    if cli.help_or_keys(p, argv):
        return 0
    config, rest = cli.config_from_args(argv)
    args = p.parse_args(rest)
    from jaxsft import config as config_lib

    config_lib.check_values(config)  # before anything is loaded, imported (jax) or written
    cli.start_multihost(args.multihost)
    from jaxsft.train import train_and_evaluate  # heavy imports after the arguments are known to be good

    final = train_and_evaluate(config, args.workdir, force=args.force)
    cli.emit(json.dumps(final))
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
