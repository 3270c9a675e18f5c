"""Memory of the training state (params + gradients + AdamW state, float32) with and without LoRA and QLoRA.

    python benchmarks/lora_memory.py [--hidden 768 --layers 12 --vocab 32000 --rank 16]

Builds a ~100M-parameter Llama-shaped model exactly as `jaxsft.run` would (same build, same LoRA injection, same
trainable split and optimizer), counts the bytes of each part from the arrays' shapes, and prints a table.
"""

from __future__ import annotations

import argparse

import jax
import ml_collections
import numpy as np


def nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()

    from flax import nnx
    from transformers import LlamaConfig

    from jaxsft import optim, pipeline
    from jaxsft.defaults import base_config
    from jaxsft.models import flatten_state

    hf = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3 // 64 * 64),
                     num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                     num_key_value_heads=args.hidden // 64, vocab_size=args.vocab, tie_word_embeddings=True)
    rows = []
    for rank, quantize in ((0, ""), (args.rank, ""), (args.rank, "int8"), (args.rank, "nf4")):
        config = base_config()
        config.task = "causal_lm"
        config.lora = ml_collections.ConfigDict({"rank": rank, "alpha": 2.0 * max(rank, 1), "dropout": 0.0,
                                                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                                 "quantize": quantize})
        model, trainable = pipeline.build(hf, config)
        params = flatten_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        train, frozen = pipeline.split_trainable(params, trainable)
        tx, _ = optim.make_optimizer(config, 100)
        opt = jax.eval_shape(tx.init, train)
        total = sum(int(np.prod(v.shape)) for v in params.values())
        n_train = sum(int(np.prod(v.shape)) for v in train.values())
        name = "full fine-tuning" if rank == 0 else f"{f'QLoRA-{quantize.upper()}' if quantize else 'LoRA'} r={rank}"
        rows.append((name + ("" if rank == 0 else " (q,k,v,o)"), total, n_train,
                     nbytes(params), nbytes(train), nbytes(opt)))
    print(f"Llama-shaped model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, tied embeddings "
          "(params: stored elements; an NF4 code byte holds two weights)\n")
    print("| setup | params | trainable | params MiB | grads MiB | AdamW state MiB | params+grads+opt MiB |")
    print("|---|---|---|---|---|---|---|")
    mib = 2 ** 20
    for name, total, n_train, pb, gb, ob in rows:
        print(f"| {name} | {total / 1e6:.1f}M | {n_train / 1e6:.2f}M | {pb / mib:.0f} | {gb / mib:.0f} | "
              f"{ob / mib:.0f} | {(pb + gb + ob) / mib:.0f} |")
    total_bytes = [pb + gb + ob for _, _, _, pb, gb, ob in rows]
    print("\n" + ", ".join(f"{name.split(' r=')[0]} / full: {b / total_bytes[0]:.2f}x"
                             for (name, *_), b in zip(rows[1:], total_bytes[1:])))


if __name__ == "__main__":
    main()
