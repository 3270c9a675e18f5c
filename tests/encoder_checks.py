"""Checks an encoder classifier family's tests share (test_models_modernbert.py, test_models_albert.py): logits of
both stacks on one batch, the export round trip into transformers, LoRA targets against PEFT's, partition-rule
coverage, the config's COMMAND header, and the CLIs end to end (run → evaluate → export → transformers)."""

from __future__ import annotations

import inspect
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import ROOT, synthetic_rows, write_tsv
from flax import nnx

from jaxsft import hf_io
from jaxsft.models import Functional, build_model, flatten_state, load_weights, to_hf_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402


def torch_logits(model, ids, mask, types):
    """transformers' logits; token types only for the classes whose forward takes them."""
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if types is not None and "token_type_ids" in inspect.signature(model.forward).parameters:
        kw["token_type_ids"] = torch.tensor(types)
    with torch.no_grad():
        return model(**kw).logits.numpy()


def jax_logits(folder, ids, mask, types, **options):
    """(logits, params, load report) of jaxsft's classifier built from the checkpoint `folder`."""
    model = build_model(tf.AutoConfig.from_pretrained(folder), "classification", jnp.float32, 0, options)
    params, report = load_weights(model, hf_io.read_weights(folder), str(folder))
    return np.asarray(jax.jit(Functional(model).apply)(params, ids, mask, types)), params, report


def check_export_round_trip(tmp_path, src, ids, mask, types):
    """Perturbed params exported from `src` load in transformers as the family's class, with jaxsft's logits."""
    ours, params, _ = jax_logits(src, ids, mask, types)
    # Perturb the params so the test cannot pass by re-reading the original files.
    params = {k: v + 0.01 * jnp.sin(jnp.arange(v.size).reshape(v.shape)) for k, v in params.items()}
    hf_io.write_safetensors(to_hf_weights(params), tmp_path / "out")
    hf_config = tf.AutoConfig.from_pretrained(src)
    from jaxsft.models.registry import family_for

    hf_config.architectures = [family_for(hf_config).hf_architecture(hf_config, "classification")]
    hf_config.save_pretrained(tmp_path / "out")
    theirs = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(theirs).__name__ == hf_config.architectures[0]
    again, _, report = jax_logits(tmp_path / "out", ids, mask, types)
    assert not report.missing and not report.unexpected
    np.testing.assert_allclose(again, torch_logits(theirs, ids, mask, types), atol=1e-4, rtol=0)
    assert np.abs(again - ours).max() > 1e-3  # the perturbation really travelled


def check_lora_targets_match_peft(hf_config, torch_class, targets: list[str]) -> list[str]:
    """jaxsft's adapted module paths for `targets` equal the modules PEFT adapts in transformers' model; returned."""
    from jaxsft.models import lora

    peft = pytest.importorskip("peft")
    model = build_model(hf_config, "classification", jnp.float32, 0)
    lc = ml_collections.ConfigDict(dict(rank=4, alpha=8.0, dropout=0.0, target_modules=targets, use_dora=False,
                                        quantize=""))
    adapted = lora.inject(model, lc)
    theirs = peft.get_peft_model(torch_class(hf_config), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    peft_names = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A")
                        for n, _ in theirs.named_modules() if n.endswith(".lora_A"))
    assert sorted(adapted) == peft_names
    return adapted


def check_partition_rules_cover_every_large_kernel(hf_config, family, options: dict | None = None) -> None:
    from jaxsft import parallel

    model = build_model(hf_config, "classification", jnp.float32, 0, options)
    shapes = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for name in shapes:
        if name.endswith(("kernel", "embedding")):
            assert parallel._rule_spec(name, family.PARTITION_RULES) is not None, name
    specs = parallel.param_specs(shapes, family.PARTITION_RULES, parallel.make_mesh(
        ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))))
    assert len(specs) == len(shapes)


def load_config_with_command(name: str):
    """configs/{name}.py, checked to start with the COMMAND that runs it."""
    from jaxsft import config as config_lib

    path = ROOT / "configs" / f"{name}.py"
    assert path.read_text().startswith(f"# COMMAND: python -m jaxsft.run --config configs/{name}.py")
    return config_lib.load_config_file(str(path))


def check_cli_round_trip(tmp_path, config: str, folder, model_type: str):
    """`configs/{config}.py` on the checkpoint `folder`: run → evaluate → export, and transformers' predictions on
    the export equal the ones jaxsft.evaluate wrote."""
    from test_train import run_cli

    rows = synthetic_rows(56, seed=2)
    train, evals = write_tsv(tmp_path / "tr.tsv", rows[:40]), write_tsv(tmp_path / "ev.tsv", rows[40:])
    w = tmp_path / "w"
    proc = run_cli("jaxsft.run", "--config", f"configs/{config}.py", "--workdir", w,
                   f"--config.model.name_or_path={folder}", f"--config.data.train={train}",
                   f"--config.data.eval={evals}", "--config.max_steps=4", "--config.batch_size=8",
                   "--config.max_length=32", "--config.learning_rate=1e-3")
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["step"] == 4 and 0.0 <= final["eval_accuracy"] <= 1.0
    result = json.loads(run_cli("jaxsft.evaluate", "--workdir", w, "--predictions",
                                tmp_path / "pred.jsonl").stdout.strip().splitlines()[-1])
    assert result["eval_accuracy"] == final["eval_accuracy"]
    preds = [json.loads(line) for line in open(tmp_path / "pred.jsonl")]
    assert len(preds) == 16

    run_cli("jaxsft.export", "--workdir", w, "--output", tmp_path / "hf")
    model = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert model.config.model_type == model_type and model.config.id2label == {0: "negative", 1: "positive"}
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = tok([r[0] for r in rows[40:]], padding=True, truncation=True, max_length=32, return_tensors="np")
    probs = torch.softmax(torch.tensor(torch_logits(model, enc["input_ids"], enc["attention_mask"],
                                                    enc.get("token_type_ids"))), -1).numpy()
    np.testing.assert_allclose(probs, [p["probabilities"] for p in preds], atol=1e-4)
    assert [p["pred_id"] for p in preds] == probs.argmax(-1).tolist()
