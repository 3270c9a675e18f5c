"""The optimizer choice: Adafactor steps equal transformers' Adafactor(scale_parameter=True, relative_step=False)."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxsft import optim
from jaxsft.defaults import base_config
from jaxsft.errors import UserError


def _config(**kw):
    c = base_config()
    c.learning_rate, c.warmup_steps, c.max_grad_norm = 1e-2, 0, 0.0
    for k, v in kw.items():
        c[k] = v
    return c


def test_adafactor_steps_equal_transformers_adafactor():
    torch = pytest.importorskip("torch")
    from transformers.optimization import Adafactor

    rng = np.random.default_rng(0)
    # a matrix of T5-embedding scale, a small one of T5-query scale, and a vector (not factored)
    params = {"emb.weight": rng.normal(0, 1.0, (24, 16)), "q.weight": rng.normal(0, 1 / 128, (16, 8)),
              "ln.weight": rng.normal(1, 0.1, (16,))}
    grads = [{k: rng.normal(0, 0.05, v.shape) for k, v in params.items()} for _ in range(4)]

    tparams = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for k, v in params.items()}
    groups = [{"params": [tparams["emb.weight"], tparams["q.weight"]]},
              {"params": [tparams["ln.weight"]], "weight_decay": 0.0}]  # jaxsft decays matrices only
    topt = Adafactor(groups, lr=1e-2, scale_parameter=True, relative_step=False, warmup_init=False, weight_decay=0.1)
    tx, _ = optim.make_optimizer(_config(optimizer="adafactor", learning_rate=1e-2, weight_decay=0.1),
                                 total_steps=10**6)
    jparams = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = tx.init(jparams)
    for g in grads:
        for k, p in tparams.items():
            p.grad = torch.tensor(g[k], dtype=torch.float64)
        topt.step()
        updates, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, jparams)
        jparams = {k: jparams[k] + updates[k] for k in jparams}
    for k in params:  # a constant learning rate here (the schedule's decay over 1e6 steps is ~1e-5 relative)
        np.testing.assert_allclose(np.asarray(jparams[k]), tparams[k].detach().numpy(), rtol=2e-4, atol=1e-6)
        assert not np.allclose(np.asarray(jparams[k]), params[k])  # it moved
    # updates scale with each weight's RMS: the query-scale matrix moved ~100x less than the embedding-scale one
    moved = {k: np.abs(np.asarray(jparams[k]) - params[k]).mean() for k in ("emb.weight", "q.weight")}
    assert moved["emb.weight"] > 30 * moved["q.weight"]


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(UserError, match="config.optimizer"):
        optim.make_optimizer(_config(optimizer="sgdd"), total_steps=10)
    assert isinstance(base_config(), ml_collections.ConfigDict) and base_config().optimizer == "adamw"
