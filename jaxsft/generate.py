"""Generate completions with a run's checkpoint (or an HF folder): one JSON line per prompt on stdout.

    python -m jaxsft.generate --workdir W --prompt "..." [--prompts FILE] [--max_new_tokens N] [--do_sample]
        [--temperature T] [--top_k K] [--top_p P] [--seed S] [--template] [--checkpoint best|latest]
    python -m jaxsft.generate --model HF_DIR --prompt "..."

Without `--template` a prompt is tokenized exactly as `tokenizer(prompt)` does; with it, it is first wrapped the
way the training data was formatted (the chat template's user turn, or the instruction template). Greedy unless
`--do_sample`. Generation stops at any EOS id of the checkpoint's generation_config.json.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from jaxsft import cli, fs
from jaxsft.config import split_config_args
from jaxsft.errors import UserError, run_cli

log = logging.getLogger("jaxsft")


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise UserError(f"--prompts {path}: no such file")
        prompts += [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompts: give --prompt TEXT or --prompts FILE (one prompt per line)")
    return prompts


def load(args, argv):
    """(config, functional, params, tokenizer, folder with generation_config.json)."""
    from jaxsft import hf_io, parallel, pipeline
    from jaxsft.defaults import base_config
    from jaxsft.models import Functional, report_load

    if args.workdir:
        config, _ = cli.config_from_args(argv, workdir_config=fs.path(args.workdir) / "config.json")
        if config.task not in ("causal_lm", "seq2seq"):
            raise UserError(f"--workdir {args.workdir}: task {config.task!r} does not generate text "
                            "(causal_lm and seq2seq do)")
        mesh = parallel.make_mesh(config.mesh)
        config.dtype = pipeline.decode_dtype(config)  # decoding computes in decode.dtype (default float32)
        functional, template, _, tokenizer = pipeline.workdir_model(args.workdir, config)
        params, step = pipeline.restore_params(args.workdir, config, template, mesh, args.checkpoint,
                                               functional.trainable)
        log.info("generating with step %d of %s", step, args.workdir)
        return config, functional, params, tokenizer, pipeline.workdir_hf(args.workdir)
    config, _ = cli.config_from_args(argv, base=base_config())
    folder = hf_io.resolve(args.model)
    hf_config = pipeline.load_hf_config(folder, "--model")
    config.model.name_or_path = args.model
    config.task = "seq2seq" if getattr(hf_config, "is_encoder_decoder", False) else "causal_lm"
    tokenizer = pipeline.load_tokenizer(folder, "--model")
    mesh = parallel.make_mesh(config.mesh)
    config.dtype = pipeline.decode_dtype(config)
    model, params, _, report = pipeline.load_pretrained(hf_config, config, folder, mesh, str(args.model))
    report_load(report, type(model).__name__, str(args.model))
    return config, Functional(model), params, tokenizer, folder


def encode(tokenizer, config, text: str, template: bool) -> list[int]:
    if not template:
        return list(tokenizer(text)["input_ids"])
    from jaxsft.tasks import causal_lm

    return causal_lm.encode_prompt(tokenizer, config, causal_lm.render_prompt(tokenizer, config, text))


def main(argv: list[str]) -> int:
    p = cli.parser("jaxsft.generate", __doc__)
    p.add_argument("--workdir", help="a jaxsft causal_lm run folder")
    p.add_argument("--model", help="an HF folder or hub id instead of a workdir")
    p.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a file with one prompt per line")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--do_sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_beams", type=int, help="seq2seq: beam search width (default: generation_config's)")
    p.add_argument("--template", action="store_true", help="wrap prompts as the training data was formatted")
    cli.add_multihost(p)
    _, _, rest = split_config_args(argv)
    args = p.parse_args(rest)
    if bool(args.workdir) == bool(args.model):
        raise UserError("give exactly one of --workdir W or --model DIR")
    if args.max_new_tokens <= 0 or args.batch_size <= 0:
        raise UserError("--max_new_tokens and --batch_size must be > 0")
    if args.do_sample and not (args.temperature > 0 and 0 < args.top_p <= 1 and args.top_k >= 0):
        raise UserError("sampling needs --temperature > 0, 0 < --top_p <= 1 and --top_k >= 0")
    prompts = read_prompts(args)
    cli.start_multihost(args.multihost)  # every process decodes every prompt (collective); process 0 prints

    from jaxsft import decoding
    from jaxsft.models import compute_dtype

    config, functional, params, tokenizer, folder = load(args, argv)
    from jaxsft import compile_cache

    compile_cache.enable(config)
    if config.task == "seq2seq":
        return translate(args, prompts, config, functional, params, tokenizer, folder)
    eos = decoding.eos_ids_for(folder, tokenizer)
    sampling = decoding.Sampling(args.max_new_tokens, args.do_sample, args.temperature, args.top_k, args.top_p)
    fn = decoding.make_generate_fn(functional, sampling, eos, tokenizer.pad_token_id, compute_dtype(config.dtype))
    ids = [encode(tokenizer, config, t, args.template) for t in prompts]
    for text, x in zip(prompts, ids):
        if not x:
            raise UserError(f"prompt {text!r} encodes to no tokens; nothing to continue")
    outs = decoding.generate(fn, params, ids, batch_size=args.batch_size, pad_id=tokenizer.pad_token_id,
                             max_prompt=config.max_length, seed=args.seed)
    for text, toks in zip(prompts, outs):
        completion = tokenizer.decode(decoding.cut_at_eos(toks, eos),
                                      skip_special_tokens=True)
        cli.emit(json.dumps({"prompt": text, "completion": completion}, ensure_ascii=False))
    return 0


def translate(args, prompts, config, functional, params, tokenizer, folder) -> int:
    """Encoder-decoder checkpoints: source text in, translation out (greedy or beam search)."""
    from jaxsft import decoding, pipeline

    if args.do_sample:
        raise UserError("--do_sample is not supported for seq2seq models (greedy or --num_beams N)")
    config.decode.max_new_tokens = args.max_new_tokens
    if args.num_beams:
        config.decode.num_beams = args.num_beams
    hf_config = pipeline.load_hf_config(folder, "--model")
    fn, settings = pipeline.seq2seq_generator(functional, config, folder, hf_config, tokenizer)
    prefix = config.data.source_prefix if args.template else ""
    ids = [list(tokenizer(prefix + t, truncation=True, max_length=config.max_length)["input_ids"]) for t in prompts]
    outs = decoding.seq2seq_generate(fn, params, ids, batch_size=args.batch_size, pad_id=tokenizer.pad_token_id,
                                     buckets=pipeline.buckets(config))
    for text, toks in zip(prompts, outs):
        completion = tokenizer.decode(decoding.cut_at_eos(toks, set(settings.eos_token_ids)),
                                      skip_special_tokens=True)
        cli.emit(json.dumps({"prompt": text, "completion": completion}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
