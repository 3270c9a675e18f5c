"""What a train step sends between devices on each mesh: the collectives in jaxsft's compiled train step
(train.make_train_step, as `jaxsft.run` builds it), with the residual stream pinned to the batch axes
(models.layers.split_batch, the default) beside XLA's sharding propagation alone (JAXSFT_ACTIVATION_SHARDING=0,
jaxsft before it). Counted from the optimized HLO (parallel.collectives): bytes of all-gather, all-reduce,
reduce-scatter, all-to-all and collective-permute results per device per step. No step is run: each one is
compiled ahead of time on forced host CPU devices, so this runs anywhere.

COMMAND: python benchmarks/collectives.py            (8 CPU devices; llama SFT, bert classification, t5 seq2seq)
         python benchmarks/collectives.py --json out.json --families llama --meshes 1,8,1

Models are small random ones of real structure (the sizes below); the batch is 16 rows of 64 tokens. What is
sent for the weights (FSDP gathers, gradient reductions) grows with the model; what is sent for activations grows
with the batch, so at real batch sizes a step that gathers activations is far worse than these figures show.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

FAMILIES = ("llama", "bert", "t5")
MESHES = ((1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2), (1, 1, 8))


def hf_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=8, num_key_value_heads=8), "causal_lm"
    if family == "bert":
        return tf.BertConfig(vocab_size=30522, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=8, num_labels=2), "classification"
    return tf.T5Config(vocab_size=32128, d_model=128, d_kv=16, d_ff=256, num_layers=2, num_heads=8,
                       feed_forward_proj="gated-gelu", tie_word_embeddings=False), "seq2seq"


def measure(family: str, mesh_sizes: tuple[int, int, int], batch: int = 16, seq: int = 64) -> dict:
    """Collective bytes of one compiled train step (this process's ACTIVATION_SHARDING setting)."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxsft import defaults, optim, parallel, pipeline, train
    from jaxsft.models import Functional, flatten_state

    cfg, task_name = hf_config(family)
    config = defaults.base_config()
    config.task, config.dtype, config.batch_size, config.max_length = task_name, "float32", batch, seq
    if task_name == "classification":
        config.model.num_labels = 2
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_sizes
    task = pipeline.task_module(config)
    mesh = train.mesh_for(config)
    model, trainable = pipeline.build(cfg, config, with_lora=False)
    params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    functional = Functional(model)
    tx, _ = optim.make_optimizer(config, 100)
    abstract = pipeline.train_state(params, {}, jax.eval_shape(tx.init, params))
    shardings = parallel.state_shardings(abstract, parallel.rules_for(cfg), mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    step = train.make_train_step(functional, task, tx, config, mesh, shardings)
    ids = np.ones((batch, seq), np.int32)
    if task_name == "classification":
        arrays = {"input_ids": ids, "attention_mask": ids, "token_type_ids": 0 * ids,
                  "labels": np.zeros(batch, np.int32), "weights": np.ones(batch, np.float32)}
    elif task_name == "causal_lm":
        arrays = {"input_ids": ids, "attention_mask": ids, "segment_ids": ids, "positions": ids, "targets": ids,
                  "loss_mask": ids.astype(np.float32), "weights": np.full(batch, seq, np.float32)}
    else:
        arrays = {"input_ids": ids, "attention_mask": ids, "decoder_input_ids": ids, "decoder_attention_mask": ids,
                  "labels": ids, "loss_mask": ids.astype(np.float32), "weights": np.full(batch, seq, np.float32)}
    sharding = parallel.batch_sharding(mesh)
    batch_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in arrays.items()}
    hlo = step.lower(state, batch_abstract, np.int32(0)).compile().as_text()
    found = parallel.collectives(hlo)
    return {"bytes": sum(v["bytes"] for v in found.values()), "ops": sum(v["ops"] for v in found.values()),
            "kinds": found, "param_bytes": int(sum(v.size * v.dtype.itemsize for v in params.values()))}


def worker(families: list[str], meshes: list[tuple]) -> dict:
    return {f"{family} {','.join(map(str, m))}": measure(family, m) for family in families for m in meshes}


def run_all(families: list[str], meshes: list[tuple], devices: int) -> dict:
    """Both settings, each in its own process (the setting is read at import)."""
    out = {}
    for name, flag in (("xla", "0"), ("jaxsft", "1")):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXSFT_ACTIVATION_SHARDING": flag,
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        p = subprocess.run([sys.executable, __file__, "--worker", "--families", ",".join(families), "--meshes",
                            ";".join(",".join(map(str, m)) for m in meshes)], env=env, capture_output=True,
                           text=True, timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"worker ({name}) failed:\n{p.stderr[-3000:]}")
        out[name] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--meshes", default=";".join(",".join(map(str, m)) for m in MESHES),
                    help="data,fsdp,tensor sizes; several separated by ';'")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    families = args.families.split(",")
    meshes = [tuple(int(x) for x in m.split(",")) for m in args.meshes.split(";")]
    if args.worker:
        print(json.dumps(worker(families, meshes)))
        return
    out = run_all(families, meshes, args.devices)
    print(f"{'case (data,fsdp,tensor)':24s} {'params MiB':>10s} {'xla alone MiB':>14s} {'jaxsft MiB':>11s} "
          f"{'ratio':>6s}   jaxsft by kind (MiB)")
    for key in out["jaxsft"]:
        a, b = out["xla"][key], out["jaxsft"][key]
        kinds = ", ".join(f"{k} {v['bytes'] / 2**20:.1f}" for k, v in sorted(b["kinds"].items()))
        print(f"{key:24s} {b['param_bytes'] / 2**20:10.1f} {a['bytes'] / 2**20:14.1f} {b['bytes'] / 2**20:11.1f} "
              f"{b['bytes'] / max(a['bytes'], 1):6.2f}   {kinds}")
    print("collective bytes per device per step (results of all-gather/all-reduce/reduce-scatter/all-to-all/"
          "collective-permute in the optimized HLO); batch 16 x 64 tokens, float32")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
