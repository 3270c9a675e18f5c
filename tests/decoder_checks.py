"""Checks the decoder families' tests share (test_models_gemma.py, test_models_phi3.py, test_models_moe.py): NEFTune
against transformers' own hook, and a trained workdir's export → `jaxsft.generate` against transformers' greedy
`generate` on the export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import alpaca_rows
from test_models_decoder import hf_model, padded_batch
from test_sft import cli

from jaxsft.models import Functional, build_model, layers, load_weights

torch = pytest.importorskip("torch")
import transformers as tf  # noqa: E402


def check_neftune_matches_transformers_hook(cfg, monkeypatch, alpha: float = 5.0) -> None:
    """Our training forward with NEFTune equals transformers' with `neftune_post_forward_hook` on
    get_input_embeddings() drawing the same noise; and the noise changes the logits."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    theirs = hf_model(cfg)
    ours = build_model(cfg, "causal_lm", jnp.float32, 0, {"neftune_noise_alpha": alpha})
    params, _ = load_weights(ours, {k: v.numpy() for k, v in theirs.state_dict().items()}, "test")
    apply = Functional(ours).apply
    ids, mask = padded_batch("right", lengths=(12, 9, 5), seed=3)
    key = jax.random.key(3)
    train = np.asarray(apply(params, ids, mask, rng=key))
    noise = np.asarray(layers.neftune(jnp.zeros(ids.shape + (cfg.hidden_size,), jnp.float32), alpha, key))
    emb = theirs.get_input_embeddings()
    emb.neftune_noise_alpha = alpha
    emb.register_forward_hook(neftune_post_forward_hook)
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda self, a, b: self.copy_(torch.from_numpy(noise.copy())))
    theirs.train()
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask == 1
    np.testing.assert_allclose(train[real], ref[real], atol=1e-4, rtol=0)
    assert np.abs(train - np.asarray(apply(params, ids, mask)))[real].max() > 1e-3  # the noise matters


def check_export_and_generate_cli_equal_transformers(workdir, hf, tmp_path, architecture: str, prompts: int,
                                                     max_new_tokens: int) -> None:
    """`jaxsft.export` writes a folder transformers loads whole as `architecture`, and `jaxsft.generate` on the
    workdir gives transformers' greedy completions of the export."""
    cli("export", "--workdir", workdir, "--output", hf)
    assert json.loads((hf / "config.json").read_text())["architectures"] == [architecture]
    texts = [r["instruction"] for r in alpaca_rows(prompts, seed=5)]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n")
    gen = cli("generate", "--workdir", workdir, "--prompts", tmp_path / "p.txt", "--max_new_tokens",
              str(max_new_tokens))
    ours = [json.loads(line)["completion"] for line in gen.stdout.splitlines() if line.startswith("{")]
    tok = tf.AutoTokenizer.from_pretrained(hf)
    ref_model, info = tf.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert len(ours) == len(texts)
    for p, o in zip(texts, ours):
        enc = tok([p], return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            ref = ref_model.eval().generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        assert tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() == o.strip()
