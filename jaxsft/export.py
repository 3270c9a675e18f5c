"""Export a run's checkpoint as an HF folder (safetensors + config + tokenizer) that transformers loads.

    python -m jaxsft.export --workdir W --output DIR [--checkpoint best|latest] [--dtype float32|bfloat16]
                            [--adapters_only] [--max_shard_size 5GB]

A LoRA run is exported with its adapters merged into the base weights, or with `--adapters_only` as a PEFT
adapter folder (adapter_config.json + adapter_model.safetensors) for `peft.PeftModel.from_pretrained(base, DIR)`.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

from jaxsft import cli, fs
from jaxsft.errors import UserError, run_cli
from jaxsft.models import lora

log = logging.getLogger("jaxsft")


def main(argv: list[str]) -> int:
    p = cli.parser("jaxsft.export", __doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--output", required=True, help="folder to write (must not exist or be empty); with --multihost "
                   "process 0 alone writes it")
    p.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--adapters_only", action="store_true", help="LoRA runs: write the adapters in PEFT's format")
    p.add_argument("--max_shard_size", default="5GB", help="larger models are written as sharded safetensors "
                   "(model-0000i-of-0000N.safetensors + index), as transformers' save_pretrained does")
    cli.add_multihost(p)
    args = p.parse_args(argv)
    out = Path(args.output)
    config, _ = cli.config_from_args([], workdir_config=fs.path(args.workdir) / "config.json")

    from jaxsft import hf_io

    hf_io.parse_size(args.max_shard_size)  # bad input fails before the checkpoint is read
    cli.start_multihost(args.multihost)
    cli.check_on_main(lambda: check_output(out))  # only process 0 writes: its folder is the one that counts

    import ml_dtypes

    from jaxsft import parallel, pipeline
    from jaxsft.models.registry import family_for

    writer = cli.is_main()
    mesh = parallel.fitting_mesh(config.mesh)  # restored sharded, then fetched to the host tensor by tensor
    functional, template, hf_config, tokenizer = pipeline.workdir_model(args.workdir, config)
    params, step = pipeline.restore_params(args.workdir, config, template, mesh, args.checkpoint,
                                           functional.trainable)
    dtype = np.float32 if args.dtype == "float32" else ml_dtypes.bfloat16
    hf_config.architectures = [family_for(hf_config).hf_architecture(hf_config, config.task)]
    if args.adapters_only:
        if not functional.lora_scales:
            raise UserError(f"--adapters_only: the run in {args.workdir} did not train LoRA adapters "
                            "(config.lora.rank is 0)")
        write_peft_adapters(params, functional, config, hf_config, out, dtype, write=writer)
        cli.all_done("export")
        log.info("exported the LoRA adapters of step %d of %s to %s (PEFT format)", step, args.workdir, out)
        return 0
    if functional.lora_scales:
        params = lora.merge(params, functional.lora_scales)
    write_weights(params, out, dtype, args.max_shard_size)  # every process fetches, process 0 writes
    if writer:
        hf_config.save_pretrained(out)
        if config.task == "seq2seq":  # transformers' generate then decodes as jaxsft's (start, forced BOS)
            from jaxsft.tasks import seq2seq

            seq2seq.set_languages(tokenizer, config)
        tokenizer.save_pretrained(out)
        gen = pipeline.workdir_hf(args.workdir) / "generation_config.json"
        if gen.is_file():
            shutil.copy(gen, out / "generation_config.json")
        if config.task == "seq2seq":
            write_generation_overrides(out, hf_config, seq2seq.generation_overrides(tokenizer, config))
    cli.all_done("export")
    log.info("exported step %d of %s to %s (%s)", step, args.workdir, out, hf_config.architectures[0])
    return 0


def write_generation_overrides(out: Path, hf_config, overrides: dict) -> None:
    """The exported generation_config.json with the run's generation settings (tasks/seq2seq.py) set in it."""
    from transformers import GenerationConfig

    if not overrides:
        return
    has_file = (out / "generation_config.json").is_file()
    gen = GenerationConfig.from_pretrained(out) if has_file else GenerationConfig.from_model_config(hf_config)
    if all(getattr(gen, k, None) == v for k, v in overrides.items()):
        return
    for key, value in overrides.items():
        setattr(gen, key, value)
    gen.save_pretrained(out)


def check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output {out} exists and is not an empty folder; choose a new one")


def write_weights(params: dict, out: Path, dtype, max_shard_size: str | int = "5GB") -> list[str]:
    """The params as HF safetensors (sharded past `max_shard_size`), fetched to this host one tensor at a time
    while its shard is written, so no host gathers the whole model; only process 0 writes."""
    import jax

    from jaxsft import hf_io
    from jaxsft.models import hf_layout, hf_tensor

    shapes = getattr(params, "base", params)  # lora.Merged: merged weights have their base's shapes
    layout = hf_layout(shapes)

    def spec(path, layer, transpose):
        shape = tuple(shapes[path].shape)[0 if layer is None else 1:]
        return shape[::-1] if transpose else shape, dtype

    return hf_io.write_safetensors_sharded({name: spec(*entry) for name, entry in layout.items()},
                                           lambda name: hf_tensor(params, layout[name], dtype), out, max_shard_size,
                                           write=jax.process_index() == 0)


def write_peft_adapters(params, functional, config, hf_config, out: Path, dtype, write: bool = True) -> None:
    """adapter_model.safetensors with PEFT's names (`base_model.model.<module>.lora_A.weight`; DoRA's magnitude
    vectors as `<module>.lora_magnitude_vector`, the key PEFT writes) + adapter_config.
    Every process of a multi-process export calls it (the tensors are gathered from all); only `write` writes."""
    from jaxsft import hf_io
    from jaxsft.models import to_hf_weights

    adapters = {k: v for k, v in params.items() if lora.is_adapter(k) and not k.endswith(f".{lora.MAGNITUDE}")}
    dora = {f"{m}.lora_magnitude_vector": v for m, v in lora.magnitudes(params).items()}  # m = ||W|| + delta
    head = {} if config.task != "classification" else {
        k: v for k, v in params.items() if functional.trainable and functional.trainable(k) and not lora.is_adapter(k)}
    weights = {f"base_model.model.{k}": v for k, v in to_hf_weights({**adapters, **dora, **head}, dtype).items()}
    if not write:
        return
    hf_io.write_safetensors(weights, out, filename="adapter_model.safetensors")
    modules = sorted({m.rsplit(".", 1)[-1] for m in functional.lora_scales})
    conv1d = any(f"{m}.weight" in params for m in functional.lora_scales)  # GPT-2's Conv1D: (in, out) weights
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if config.task == "causal_lm" else "SEQ_CLS",
        "base_model_name_or_path": str(config.model.name_or_path), "r": int(config.lora.rank),
        "lora_alpha": float(config.lora.alpha), "lora_dropout": float(config.lora.dropout),
        "target_modules": modules,
        "bias": "none", "fan_in_fan_out": conv1d, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": sorted({k.split(".")[0] for k in head}) or None, "use_dora": bool(dora),
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
