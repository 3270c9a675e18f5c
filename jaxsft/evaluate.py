"""Evaluate a run's checkpoint (or an HF folder) and print its metrics as one JSON object, last on stdout.

    python -m jaxsft.evaluate --workdir W [--config.data.eval=FILE] [--predictions FILE]
    python -m jaxsft.evaluate --model HF_DIR --config.data.eval=FILE [--config configs/X.py] [--predictions FILE]
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from jaxsft import cli, fs
from jaxsft.config import split_config_args
from jaxsft.defaults import base_config
from jaxsft.errors import UserError, run_cli

log = logging.getLogger("jaxsft")


def _hf_folder_model(config, folder: str, mesh):
    """An HF classification folder: labels from its id2label unless data.label_names says otherwise. Its params
    are loaded straight into their shardings on `mesh`."""
    from jaxsft import hf_io, parallel, pipeline
    from jaxsft.models import Functional, build_model, compute_dtype, load_sharded, report_load

    path = hf_io.resolve(folder)
    hf_config = pipeline.load_hf_config(path, "--model")
    tokenizer = pipeline.load_tokenizer(path, "--model")
    config.model.name_or_path = str(folder)
    if config.task == "classification":
        config.model.num_labels = config.model.num_labels or hf_config.num_labels
        if not config.data.label_names and config.model.num_labels > 1:
            id2label = {int(k): v for k, v in hf_config.id2label.items()}
            config.data.label_names = [id2label[i] for i in range(config.model.num_labels)]
        hf_config.num_labels = config.model.num_labels
    model, params, report = load_sharded(
        lambda: build_model(hf_config, config.task, compute_dtype(config.dtype), config.seed),
        hf_io.WeightReader(path), str(folder), mesh, parallel.rules_for(hf_config))
    report_load(report, type(model).__name__, str(folder))
    return Functional(model), params, tokenizer, hf_config, path


def main(argv: list[str]) -> int:
    p = cli.parser("jaxsft.evaluate", __doc__)
    p.add_argument("--workdir", help="a jaxsft run folder")
    p.add_argument("--model", help="an HF folder or hub id to evaluate instead of a workdir")
    p.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    p.add_argument("--predictions", help="write one JSON line per example here (with --multihost: process 0 does)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="causal_lm predictions: greedy tokens per prompt")
    cli.add_multihost(p)
    path, _, rest = split_config_args(argv)
    args = p.parse_args(rest)
    if bool(args.workdir) == bool(args.model):
        raise UserError("give exactly one of --workdir W or --model DIR")
    if args.workdir:
        config, _ = cli.config_from_args(argv, workdir_config=fs.path(args.workdir) / "config.json")
    else:  # an HF folder: the config file if given, else the defaults; overrides on top
        config, _ = cli.config_from_args(argv, base=None if path else base_config())
    cli.start_multihost(args.multihost)  # every process evaluates (the passes are collective); process 0 reports

    from jaxsft import compile_cache, parallel, pipeline

    compile_cache.enable(config)
    task = pipeline.task_module(config)
    mesh = parallel.make_mesh(config.mesh)
    if args.workdir:
        functional, template, hf_config, tokenizer = pipeline.workdir_model(args.workdir, config)
        folder = pipeline.workdir_hf(args.workdir)
        _, ds = pipeline.load_splits(config, need_train=False)
        if ds is None:
            raise UserError("no evaluation data: set --config.data.eval=FILE")
        features = task.featurize(ds, tokenizer, config, "data.eval", config.data.eval, need_labels=False)
        params, step = pipeline.restore_params(args.workdir, config, template, mesh, args.checkpoint,
                                               functional.trainable)
    else:
        functional, params, tokenizer, hf_config, folder = _hf_folder_model(config, args.model, mesh)
        _, ds = pipeline.load_splits(config, need_train=False)
        if ds is None:
            raise UserError("no evaluation data: set --config.data.eval=FILE")
        features = task.featurize(ds, tokenizer, config, "data.eval", config.data.eval, need_labels=False)
        step = None
    eval_step = pipeline.make_eval_step(functional, task, mesh)
    outputs = pipeline.predict(eval_step, params, features, config, mesh, task, tokenizer.pad_token_id)
    result = {"step": step, **task.compute_metrics(outputs, features, config),
              "num_examples": getattr(features, "num_examples", len(features))}
    hyps = None
    translation = config.task == "seq2seq" or config.data.format == "translation"
    hypotheses = pipeline.hypothesis_fn(task, functional, config, folder, hf_config, tokenizer, mesh)
    if hypotheses is not None:  # translation / decode.eval_samples: decode and score (when the data has targets)
        hyps = hypotheses(params, features)
        if not translation or config.data.target_field in ds.column_names:
            result.update(task.generation_metrics(hyps, features, config))
    if args.predictions:
        if hyps is not None and translation:  # one hypothesis per line, eval-set order (sacrebleu-ready)
            if cli.is_main():
                Path(args.predictions).write_text("".join(line + "\n" for line in task.prediction_lines(hyps)))
        else:  # causal_lm decodes on every process (collective); one writes
            rows = generated_rows(functional, params, features, config, tokenizer, args, hf_config) \
                if config.task == "causal_lm" else task.prediction_rows(outputs, features, config)
            if cli.is_main():
                with open(args.predictions, "w") as f:
                    for row in rows:
                        f.write(json.dumps(row) + "\n")
        log.info("wrote %d predictions to %s", len(features), args.predictions)
    cli.all_done("evaluate")
    cli.emit(json.dumps(result))
    return 0


def generated_rows(functional, params, features, config, tokenizer, args, hf_config) -> list[dict]:
    """causal_lm: greedy completions of every eval prompt beside its reference."""
    from jaxsft import pipeline
    from jaxsft.tasks import causal_lm

    folder = pipeline.workdir_hf(args.workdir) if args.workdir else Path(args.model)
    complete = pipeline.prompt_completer(pipeline.decoding_functional(functional, hf_config, config), config, folder,
                                         tokenizer, args.max_new_tokens,
                                         config.eval_batch_size or config.batch_size)
    texts = complete(params, [causal_lm.encode_prompt(tokenizer, config, p) for p in features.prompts])
    return [{"prompt": p, "completion": c, "reference": r}
            for p, c, r in zip(features.prompts, texts, features.references)]


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
