"""Export a run's checkpoint as an HF folder (safetensors + config + tokenizer) that transformers loads.

    python -m jaxsft.export --workdir W --output DIR [--checkpoint best|latest] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from jaxsft import cli
from jaxsft.errors import UserError, run_cli

log = logging.getLogger("jaxsft")


def main(argv: list[str]) -> int:
    p = cli.parser("jaxsft.export", __doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    p.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = p.parse_args(argv)
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output {out} exists and is not an empty folder; choose a new one")
    config, _ = cli.config_from_args([], workdir_config=Path(args.workdir) / "config.json")

    import ml_dtypes

    from jaxsft import hf_io, parallel, pipeline
    from jaxsft.models import to_hf_weights
    from jaxsft.models.registry import family_for

    mesh = parallel.make_mesh(config.mesh)
    _, template, hf_config, tokenizer = pipeline.workdir_model(Path(args.workdir), config)
    params, step = pipeline.restore_params(Path(args.workdir), config, template, mesh, args.checkpoint)
    dtype = np.float32 if args.dtype == "float32" else ml_dtypes.bfloat16
    hf_config.architectures = [family_for(hf_config).hf_architecture(hf_config, config.task)]
    out.mkdir(parents=True, exist_ok=True)
    hf_io.write_safetensors(to_hf_weights(params, dtype), out)
    hf_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("exported step %d of %s to %s (%s)", step, args.workdir, out, hf_config.architectures[0])
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
