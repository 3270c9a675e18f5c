"""The Optax chain from config: clip → AdamW or Adafactor (no decay on biases and norms), its learning rate
following one of transformers' schedules (`lr_scheduler_type`: linear by default)."""

from __future__ import annotations

import math

import optax

from jaxsft.errors import UserError

OPTIMIZERS = ("adamw", "adafactor")


SCHEDULES = ("linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup", "inverse_sqrt",
             "warmup_stable_decay")
WSD_SHAPES = ("linear", "cosine", "1-sqrt")


def warmup_steps(config, total_steps: int) -> int:
    if config.warmup_steps and config.warmup_steps > 0:
        return int(config.warmup_steps)
    return int(math.ceil(config.warmup_ratio * total_steps))


def decay_steps(config, total_steps: int) -> int:
    """warmup_stable_decay: the steps of the final decay (`decay_steps` > 0 wins over `decay_ratio`)."""
    if config.get("decay_steps", 0) and config.decay_steps > 0:
        return int(config.decay_steps)
    return int(math.ceil(config.get("decay_ratio", 0.1) * total_steps))


def lr_factor(config, total_steps: int):
    """The multiplier of learning_rate at optimizer step `count` (0 for the first update), as transformers'
    `get_scheduler(config.lr_scheduler_type, ...)` defines it (`optimization.py`: the `_lr_lambda` functions), for
    jnp step counts. HF Trainer's step i uses lambda(i), as optax's count does."""
    import jax.numpy as jnp

    kind = config.get("lr_scheduler_type", "linear")
    if kind not in SCHEDULES:
        raise UserError(f"config.lr_scheduler_type must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    total = int(total_steps)
    warm = min(warmup_steps(config, total), total) if kind != "constant" else 0
    min_ratio = float(config.get("min_lr_ratio", 0.0))
    half_cycles = 0.5  # num_cycles: a half cosine, from the peak down to the floor

    def ramp(count):  # linear warmup from 0
        return count / max(1, warm)

    if kind == "linear":
        def after(count):
            return jnp.maximum(0.0, (total - count) / max(1, total - warm))
    elif kind in ("cosine", "cosine_with_min_lr"):
        floor = min_ratio if kind == "cosine_with_min_lr" else 0.0

        def after(count):
            progress = (count - warm) / max(1, total - warm)
            factor = 0.5 * (1.0 + jnp.cos(math.pi * half_cycles * 2.0 * progress))
            return jnp.maximum(0.0, factor * (1.0 - floor) + floor)
    elif kind in ("constant", "constant_with_warmup"):
        def after(count):
            return jnp.ones_like(count)
    elif kind == "inverse_sqrt":
        timescale = int(config.get("inverse_sqrt_timescale") or warm or 10_000)

        def after(count):
            return 1.0 / jnp.sqrt((count + (timescale - warm)) / timescale)
    else:  # warmup_stable_decay: get_wsd_schedule(num_warmup_steps, num_decay_steps, num_training_steps, ...)
        decay = min(decay_steps(config, total), total - warm)
        stable = total - warm - decay
        shape = config.get("decay_type", "cosine")
        if shape not in WSD_SHAPES:
            raise UserError(f"config.decay_type must be one of {', '.join(WSD_SHAPES)}, got {shape!r}")

        def ramp(count):  # HF's WSD warms up from min_lr_ratio, not from 0
            return (count / max(1, warm)) * (1.0 - min_ratio) + min_ratio

        def after(count):
            progress = (count - warm - stable) / max(1, decay)
            if shape == "linear":
                factor = 1.0 - progress
            elif shape == "cosine":
                factor = 0.5 * (1.0 + jnp.cos(math.pi * half_cycles * 2.0 * progress))
            else:
                factor = 1.0 - jnp.sqrt(jnp.clip(progress, 0.0, None))
            decaying = jnp.maximum(0.0, factor * (1.0 - min_ratio) + min_ratio)
            return jnp.where(count < warm + stable, 1.0, jnp.where(count < warm + stable + decay, decaying,
                                                                   min_ratio))

    def factor(count):
        count = jnp.asarray(count, jnp.float32)
        return jnp.where(count < warm, ramp(count), after(count)) if warm else after(count)

    return factor


def schedule(config, total_steps: int) -> optax.Schedule:
    """learning_rate times `lr_factor`: linear warmup from 0 to learning_rate, then the `lr_scheduler_type`'s decay
    (default linear to 0 at total_steps, HF's default)."""
    if not config.learning_rate > 0:
        raise UserError(f"config.learning_rate must be > 0, got {config.learning_rate}")
    factor = lr_factor(config, total_steps)
    peak = float(config.learning_rate)
    return lambda count: peak * factor(count)


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
