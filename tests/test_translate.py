"""Translation: beam search / greedy against transformers' generate, and the seq2seq CLIs end to end."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_seq2seq, parallel_rows, write_parallel
from test_sft import cli, last_json

from jaxsft import decoding, hf_io, pipeline
from jaxsft.defaults import base_config
from jaxsft.models import Functional, build_model, load_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402

SOURCES = ["a big red dog runs here now", "the cat", "an old man and a young woman eat the small red food now",
           "dog"]


def load_jax(folder):
    hf_config = tf.AutoConfig.from_pretrained(folder)
    model = build_model(hf_config, "seq2seq", jnp.float32, 0)
    params, report = load_weights(model, hf_io.read_weights(folder), str(folder))
    assert not report.missing and not report.unexpected
    return Functional(model), params, hf_config


@pytest.mark.parametrize("kind,beams,extra", [
    ("marian", 1, {}), ("marian", 3, {}), ("t5", 3, {"length_penalty": 0.6}),
    ("t5-relu", 4, {"early_stopping": True}), ("t5", 2, {"early_stopping": "never", "length_penalty": 1.5})])
def test_decoding_equals_transformers_generate(kind, beams, extra, tmp_path):
    folder = make_tiny_seq2seq(tmp_path / kind, kind, std=0.5 if kind == "marian" else 5.0)
    tok = tf.AutoTokenizer.from_pretrained(folder)
    functional, params, hf_config = load_jax(folder)
    config = base_config()
    config.decode.num_beams, config.decode.max_new_tokens = beams, 14
    if "length_penalty" in extra:
        config.decode.length_penalty = extra["length_penalty"]
    gen_cfg = pipeline.generation_config(folder, hf_config)
    if "early_stopping" in extra:
        gen_cfg["early_stopping"] = extra["early_stopping"]
    settings = decoding.seq2seq_settings(gen_cfg, config.decode, fallback_pad=tok.pad_token_id,
                                         fallback_eos=tok.eos_token_id)
    fn = decoding.make_seq2seq_generate_fn(functional, settings, jnp.float32)
    ids = [tok(s)["input_ids"] for s in SOURCES]
    ours = decoding.seq2seq_generate(fn, params, ids, batch_size=4, pad_id=tok.pad_token_id, buckets=[16, 32])
    model = tf.AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    enc = tok(SOURCES, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        ref = model.generate(**enc, num_beams=beams, max_new_tokens=14, do_sample=False, **extra)
    eos = set(settings.eos_token_ids)
    for o, r in zip(ours, ref.tolist()):
        r = [t for t in r[1:]]
        assert decoding.cut_at_eos(o, eos) == decoding.cut_at_eos(r, eos)
        assert tok.decode(o, skip_special_tokens=True) == tok.decode(r, skip_special_tokens=True)
    assert len({t for row in ours for t in row}) >= 5, f"degenerate: {ours}"
    assert fn._cache_size() == 1


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    model = make_tiny_seq2seq(root / "marian")
    train = write_parallel(root, "train", parallel_rows(240, seed=0))
    evals = write_parallel(root, "val", parallel_rows(24, seed=1))
    w = root / "w"
    p = cli("run", "--config", "configs/translate.py", "--workdir", w, f"--config.model.name_or_path={model}",
            f"--config.data.train={train}", f"--config.data.eval={evals}", "--config.max_steps=60",
            "--config.learning_rate=3e-3", "--config.batch_size=16", "--config.eval_every_steps=30",
            "--config.warmup_ratio=0", "--config.label_smoothing=0", "--config.decode.num_beams=2",
            "--config.decode.max_new_tokens=16", "--config.log_every_steps=10")
    return root, model, w, last_json(p.stdout)


def test_translation_run_learns_and_reports_bleu_chrf(mt_run):
    root, _, w, final = mt_run
    events = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if "eval_bleu" in e]
    assert len(evals) == 2
    for e in evals:
        assert {"eval_loss", "eval_chrf", "eval_bleu_signature", "eval_chrf_signature"} <= set(e)
        assert "BLEU" in e["eval_bleu_signature"] or "nrefs" in e["eval_bleu_signature"]
    train = [e for e in events if "loss" in e]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    # (a tiny model this briefly trained does not translate yet; benchmarks/translate_learning_check.py shows BLEU)
    cfg = json.loads((w / "config.json").read_text())
    assert cfg["checkpoint_metric"] == "eval_bleu" and cfg["checkpoint_mode"] == "max"
    assert final["train_step_compilations"] <= 8  # bucketed (source, target) shapes


def test_evaluate_hypotheses_and_export_beam_search_equal_transformers(mt_run, tmp_path):
    root, _, w, _ = mt_run
    events = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    best = max((e for e in events if "eval_bleu" in e), key=lambda e: (e["eval_bleu"], e["step"]))
    hyp = tmp_path / "hyp.txt"
    out = last_json(cli("evaluate", "--workdir", w, "--predictions", hyp).stdout)
    assert out["step"] == best["step"] and out["eval_bleu"] == best["eval_bleu"]
    assert out["eval_bleu_signature"] == best["eval_bleu_signature"]
    hyps = hyp.read_text().splitlines()
    sources = (root / "val.en").read_text().splitlines()
    assert len(hyps) == len(sources) == 24
    hf = tmp_path / "hf"
    cli("export", "--workdir", w, "--output", hf)
    tok = tf.AutoTokenizer.from_pretrained(hf)
    model = tf.AutoModelForSeq2SeqLM.from_pretrained(hf).eval()
    for s, h in list(zip(sources, hyps))[:8]:
        with torch.no_grad():
            ref = model.generate(**tok([s], return_tensors="pt", return_token_type_ids=False), num_beams=2,
                                 max_new_tokens=16, do_sample=False)
        assert tok.decode(ref[0], skip_special_tokens=True).strip() == h.strip()
    gen = [json.loads(line) for line in cli("generate", "--workdir", w, "--prompt", sources[0], "--num_beams", "2",
                                            "--max_new_tokens", "16").stdout.splitlines() if line.startswith("{")]
    assert gen[0]["completion"].strip() == hyps[0].strip()


@pytest.mark.slow  # ~20 s
def test_from_scratch_starts_from_random_weights(tmp_path):
    model = make_tiny_seq2seq(tmp_path / "marian", "marian")  # init_std 0.02: fresh logits are near zero
    train = write_parallel(tmp_path, "train", parallel_rows(32))
    w = tmp_path / "w"
    cli("run", "--config", "configs/translate.py", "--workdir", w, f"--config.model.name_or_path={model}",
        f"--config.data.train={train}", "--config.max_steps=2", "--config.log_every_steps=1",
        "--config.model.from_scratch=True", "--config.label_smoothing=0", "--config.batch_size=8")
    first = next(e for e in map(json.loads, (w / "metrics.jsonl").read_text().splitlines()) if "loss" in e)
    vocab = tf.AutoConfig.from_pretrained(model).vocab_size
    assert abs(first["loss"] - np.log(vocab)) < 1.5  # fresh init: near-uniform predictions


@pytest.mark.slow  # ~30 s
def test_translation_as_sft_on_a_decoder_reports_bleu(tmp_path):
    from conftest import make_tiny_decoder

    model = make_tiny_decoder(tmp_path / "llama")
    train = write_parallel(tmp_path, "train", parallel_rows(64, seed=0))
    evals = write_parallel(tmp_path, "val", parallel_rows(8, seed=1))
    w = tmp_path / "w"
    cli("run", "--config", "configs/translate_llm.py", "--workdir", w, f"--config.model.name_or_path={model}",
        f"--config.data.train={train}", f"--config.data.eval={evals}", "--config.max_steps=4", "--config.batch_size=4",
        "--config.max_length=128", "--config.dtype=float32", "--config.decode.max_new_tokens=8")
    evs = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in evs if "eval_bleu" in e][-1]
    assert {"eval_loss", "eval_chrf", "eval_bleu_signature"} <= set(last)
    cfg = json.loads((w / "config.json").read_text())
    assert cfg["checkpoint_metric"] == "eval_bleu" and cfg["data"]["format"] == "translation"
    hyp = tmp_path / "hyp.txt"
    out = last_json(cli("evaluate", "--workdir", w, "--predictions", hyp).stdout)
    assert out["eval_bleu"] == last["eval_bleu"] and len(hyp.read_text().splitlines()) == 8
