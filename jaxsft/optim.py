"""The Optax chain from config: clip → AdamW or Adafactor (no decay on biases and norms) with warmup + linear
decay."""

from __future__ import annotations

import math

import optax

from jaxsft.errors import UserError

OPTIMIZERS = ("adamw", "adafactor")


def warmup_steps(config, total_steps: int) -> int:
    if config.warmup_steps and config.warmup_steps > 0:
        return int(config.warmup_steps)
    return int(math.ceil(config.warmup_ratio * total_steps))


def schedule(config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then linear decay to 0 at total_steps (HF's default)."""
    if not config.learning_rate > 0:
        raise UserError(f"config.learning_rate must be > 0, got {config.learning_rate}")
    warm = min(warmup_steps(config, total_steps), total_steps)
    decay = optax.linear_schedule(config.learning_rate, 0.0, max(total_steps - warm, 1))
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warm), decay], [warm])


def decay_mask(params: dict) -> dict:
    """Weight decay on matrices only, and on none whose path contains "bias": HF Trainer's rule
    (`Trainer.get_decay_parameter_names`: no decay on LayerNorm/RMSNorm weights nor on any name containing
    "bias", so T5's relative_attention_bias embedding and Marian's final_logits_bias are left alone). Every 1-D
    parameter of our families is a bias or a norm scale; our paths equal the HF names but for the leaf
    (kernel / scale / embedding for weight)."""
    from jaxsft.models import stacked_parts  # scanned layers: the leading layer axis does not count

    return {k: getattr(v, "ndim", 0) - (stacked_parts(k) is not None) >= 2 and "bias" not in k.lower()
            for k, v in params.items()}


def make_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = schedule(config, total_steps)
    chain = []
    if config.max_grad_norm and config.max_grad_norm > 0:
        chain.append(optax.clip_by_global_norm(config.max_grad_norm))
    name = config.get("optimizer", "adamw")
    if name == "adamw":
        chain.append(optax.adamw(lr, b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_epsilon,
                                 weight_decay=config.weight_decay, mask=decay_mask))
    elif name == "adafactor":  # T5's optimizer: transformers' Adafactor(scale_parameter=True, relative_step=False)
        chain.append(adafactor(lr, config.weight_decay))
    else:
        raise UserError(f"config.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return optax.chain(*chain), lr


def adafactor(lr: optax.Schedule, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Adafactor as transformers' `Adafactor(lr, scale_parameter=True, relative_step=False)` steps: factored second
    moments (decay 1 - t^-0.8) for every matrix, the update clipped to RMS 1 and scaled by the weight's RMS (at
    least 1e-3), and decoupled weight decay scaled like the update (by the learning rate and that RMS); no
    momentum."""
    return optax.chain(optax.scale_by_factored_rms(min_dim_size_to_factor=1), optax.clip_by_block_rms(1.0),
                       optax.add_decayed_weights(weight_decay, mask=decay_mask), optax.scale_by_param_block_rms(),
                       optax.scale_by_learning_rate(lr))
