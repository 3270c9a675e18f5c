"""Causal-LM SFT end to end through the CLIs: run (packing) → metrics → evaluate → generate → export; LoRA."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, alpaca_rows, make_tiny_decoder, write_jsonl

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402


def cli(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", f"jaxsft.{module}", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})
    if check and p.returncode != 0:
        raise AssertionError(f"jaxsft.{module} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_data")
    write_jsonl(d / "train.jsonl", alpaca_rows(160, seed=0))
    write_jsonl(d / "eval.jsonl", alpaca_rows(24, seed=1))
    (d / "prompts.txt").write_text("Count to three\nGive the opposite of hot\nReverse the words red green\n")
    return d


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, data):
    """A packed full fine-tune of a tiny Llama, 60 steps."""
    root = tmp_path_factory.mktemp("sft_run")
    model = make_tiny_decoder(root / "llama")
    w = root / "w"
    p = cli("run", "--config", "configs/sft.py", "--workdir", w, f"--config.model.name_or_path={model}",
            f"--config.data.train={data / 'train.jsonl'}", f"--config.data.eval={data / 'eval.jsonl'}",
            "--config.max_steps=60", "--config.learning_rate=1e-2", "--config.max_length=128",
            "--config.batch_size=8", "--config.dtype=float32", "--config.eval_every_steps=30",
            "--config.log_every_steps=10", "--config.warmup_steps=0")
    return model, w, last_json(p.stdout)


def test_sft_run_learns_and_reports_eval_loss_and_perplexity(sft_run):
    _, w, final = sft_run
    events = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if "loss" in e]
    evals = [e for e in events if "eval_loss" in e]
    assert len(evals) == 2 and all(np.isclose(e["eval_perplexity"], np.exp(e["eval_loss"])) for e in evals)
    assert train[-1]["loss"] < 0.3 * train[0]["loss"]  # it learns the tiny task
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[-1]["eval_loss"] < 2.0
    assert "tokens_per_second" in train[0]
    cfg = json.loads((w / "config.json").read_text())
    assert cfg["checkpoint_metric"] == "eval_loss" and cfg["checkpoint_mode"] == "min"
    assert cfg["data"]["format"] == "alpaca" and cfg["data"]["packing"] is True
    assert (w / "hf" / "generation_config.json").is_file()
    assert final["train_step_compilations"] == 1  # packed rows: one shape


def test_evaluate_matches_training_and_writes_generations(sft_run, tmp_path):
    _, w, _ = sft_run
    events = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    best = min((e for e in events if "eval_loss" in e), key=lambda e: e["eval_loss"])
    preds = tmp_path / "preds.jsonl"
    out = last_json(cli("evaluate", "--workdir", w, "--predictions", preds, "--max_new_tokens", "8").stdout)
    assert out["step"] == best["step"] and out["eval_loss"] == best["eval_loss"]
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 24 and set(rows[0]) == {"prompt", "completion", "reference"}
    assert rows[0]["prompt"].startswith("Below is an instruction") and rows[0]["reference"]


def test_generate_cli_equals_transformers_on_the_export(sft_run, data, tmp_path):
    _, w, _ = sft_run
    hf = tmp_path / "hf"
    cli("export", "--workdir", w, "--output", hf)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in hf.iterdir()}
    gen = cli("generate", "--workdir", w, "--prompts", data / "prompts.txt", "--max_new_tokens", "10")
    ours = [json.loads(line) for line in gen.stdout.splitlines() if line.startswith("{")]
    tok = tf.AutoTokenizer.from_pretrained(hf)
    model = tf.AutoModelForCausalLM.from_pretrained(hf).eval()
    prompts = (data / "prompts.txt").read_text().splitlines()
    assert [o["prompt"] for o in ours] == prompts
    for p, o in zip(prompts, ours):
        enc = tok([p], return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            ref = model.generate(**enc, max_new_tokens=10, do_sample=False)
        assert tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() == \
            o["completion"].strip()
    # --template wraps the prompt exactly as training formatted an Alpaca instruction without input
    from jaxsft.tasks.causal_lm import ALPACA_PROMPT_NO_INPUT

    def completions(*args):
        return [json.loads(line)["completion"] for line in cli("generate", "--workdir", w, "--max_new_tokens", "6",
                                                               *args).stdout.splitlines() if line.startswith("{")]

    wrapped = completions("--prompt", "Count to three", "--template")
    assert wrapped == completions("--prompt", ALPACA_PROMPT_NO_INPUT.format(instruction="Count to three"))
    assert wrapped[0].startswith("one two")  # and the model answers as it learned


def test_lora_trains_adapters_only_and_exports_merged_and_peft(data, tmp_path):
    peft = pytest.importorskip("peft")
    model = make_tiny_decoder(tmp_path / "llama")
    w = tmp_path / "w"
    cli("run", "--config", "configs/sft.py", "--workdir", w, f"--config.model.name_or_path={model}",
        f"--config.data.train={data / 'train.jsonl'}", f"--config.data.eval={data / 'eval.jsonl'}",
        "--config.max_steps=12", "--config.learning_rate=1e-2", "--config.max_length=128", "--config.batch_size=8",
        "--config.dtype=float32", "--config.lora.rank=4", "--config.lora.alpha=8", "--config.lora.dropout=0.1",
        "--config.lora.target_modules=q_proj,v_proj,down_proj")
    merged, adapters = tmp_path / "merged", tmp_path / "adapters"
    cli("export", "--workdir", w, "--output", merged)
    cli("export", "--workdir", w, "--output", adapters, "--adapters_only")
    cfg = json.loads((adapters / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == ["down_proj", "q_proj",
                                                                                            "v_proj"]
    base = tf.AutoModelForCausalLM.from_pretrained(model).eval()
    tuned = tf.AutoModelForCausalLM.from_pretrained(merged).eval()
    # frozen: every non-adapted weight of the merged export equals the base checkpoint's
    bs, ts = base.state_dict(), tuned.state_dict()
    changed = sorted(k for k in bs if not torch.equal(bs[k], ts[k]))
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in changed)
    with_peft = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(model), adapters).eval()
    ids = torch.tensor([[101, 2000, 2001, 2002, 2003, 2004]])
    with torch.no_grad():
        a, b = tuned(input_ids=ids).logits, with_peft(input_ids=ids).logits
    assert (a - base(input_ids=ids).logits).abs().max() > 1e-4  # the adapters changed the model
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)


def test_lora_checkpoint_has_no_optimizer_state_for_base_weights(data, tmp_path):
    from jaxsft import config as config_lib
    from jaxsft import optim, pipeline

    model = make_tiny_decoder(tmp_path / "llama")
    config = config_lib.load_config_file(str(ROOT / "configs" / "sft.py"))
    config.model.name_or_path, config.lora.rank = str(model), 4
    hf_config = pipeline.load_hf_config(model, "model")
    m, trainable = pipeline.build(hf_config, config)
    from flax import nnx

    from jaxsft.models import flatten_state

    params = flatten_state(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
    train, frozen = pipeline.split_trainable(params, trainable)
    assert train and all(".lora_" in k for k in train) and not any(".lora_" in k for k in frozen)
    tx, _ = optim.make_optimizer(config, 10)
    import jax

    opt_leaves = sum(x.size for x in jax.tree.leaves(jax.eval_shape(tx.init, train)))
    assert opt_leaves <= 2 * sum(v.size for v in train.values()) + 10
    assert sum(v.size for v in train.values()) < 0.1 * sum(v.size for v in params.values())


def test_messages_without_chat_template_is_one_clear_line(tmp_path):
    model = make_tiny_decoder(tmp_path / "llama")
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "hello"}]}] * 4)
    p = cli("run", "--config", "configs/sft.py", "--workdir", tmp_path / "w", f"--config.model.name_or_path={model}",
            f"--config.data.train={tmp_path / 'chat.jsonl'}", check=False)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "chat template" in last and "data.chat_template" in last
    assert not (tmp_path / "w").exists()


@pytest.mark.slow  # ~30 s
def test_decoder_checkpoint_fine_tunes_for_classification(tmp_path):
    from conftest import synthetic_rows, write_tsv

    model = make_tiny_decoder(tmp_path / "llama")
    write_tsv(tmp_path / "train.tsv", synthetic_rows(64))
    write_tsv(tmp_path / "eval.tsv", synthetic_rows(16, seed=1))
    w = tmp_path / "w"
    cli("run", "--config", "configs/classify.py", "--workdir", w, f"--config.model.name_or_path={model}",
        f"--config.data.train={tmp_path / 'train.tsv'}", f"--config.data.eval={tmp_path / 'eval.tsv'}",
        "--config.num_epochs=1", "--config.batch_size=16")
    out = tmp_path / "hf"
    cli("export", "--workdir", w, "--output", out)
    m = tf.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(m).__name__ == "LlamaForSequenceClassification" and m.config.id2label[1] == "positive"


CHATML = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} [SEP] {% endfor %}"
          "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.mark.slow  # ~40 s
def test_chat_messages_with_config_template_train_generate_and_export(tmp_path):
    model = make_tiny_decoder(tmp_path / "llama")
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("good", "great", "fine", "dull", "awful", "bad") * 4]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    w = tmp_path / "w"
    cli("run", "--config", "configs/sft.py", "--workdir", w, f"--config.model.name_or_path={model}",
        f"--config.data.train={tmp_path / 'chat.jsonl'}", "--config.data.eval_fraction=0.25", "--config.max_steps=3",
        "--config.max_length=64", "--config.batch_size=4", "--config.dtype=float32",
        f"--config.data.chat_template={CHATML}")
    assert json.loads((w / "config.json").read_text())["data"]["format"] == "messages"
    assert any("eval_loss" in json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines())
    out = tmp_path / "hf"
    cli("export", "--workdir", w, "--output", out)
    assert tf.AutoTokenizer.from_pretrained(out).chat_template == CHATML  # the template travels with the model
    gen = [json.loads(line) for line in cli("generate", "--workdir", w, "--prompt", "say good", "--template",
                                            "--max_new_tokens", "3").stdout.splitlines() if line.startswith("{")]
    assert len(gen) == 1 and set(gen[0]) == {"prompt", "completion"}


@pytest.mark.slow  # two short bf16 runs, exports and 16 generations: ~90 s idle
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_output_after_bfloat16_training_equals_transformers_on_the_export(kind, data, tmp_path):
    """configs/sft.py trains in bfloat16; decoding runs in decode.dtype (float32 by default), so `generate` gives
    transformers' greedy tokens on the exported float32 weights (in bf16 the top two logits could round equal)."""
    model = make_tiny_decoder(tmp_path / kind, kind=kind)
    w, hf = tmp_path / "w", tmp_path / "hf"
    cli("run", "--config", "configs/sft.py", "--workdir", w, f"--config.model.name_or_path={model}",
        f"--config.data.train={data / 'train.jsonl'}", "--config.max_steps=20", "--config.learning_rate=1e-2",
        "--config.max_length=128", "--config.batch_size=8", "--config.warmup_steps=0", "--config.eval_every_steps=0")
    assert json.loads((w / "config.json").read_text())["dtype"] == "bfloat16"
    cli("export", "--workdir", w, "--output", hf)
    prompts = [r["instruction"] for r in alpaca_rows(8, seed=5)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    gen = cli("generate", "--workdir", w, "--prompts", tmp_path / "p.txt", "--max_new_tokens", "12")
    ours = [json.loads(line)["completion"] for line in gen.stdout.splitlines() if line.startswith("{")]
    tok = tf.AutoTokenizer.from_pretrained(hf)
    ref_model = tf.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    same = 0
    for p, o in zip(prompts, ours):
        enc = tok([p], return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            ref = ref_model.generate(**enc, max_new_tokens=12, do_sample=False)
        same += tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() == o.strip()
    assert len(ours) == 8 and same == 8, f"{same}/8 greedy completions equal transformers'"
