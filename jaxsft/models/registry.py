"""HF `model_type` → family module, and the task → head builder each family offers."""

from __future__ import annotations

from types import ModuleType

from jaxsft.errors import UserError
from jaxsft.models import (
    albert,
    bart,
    bert,
    deberta,
    decoder,
    distilbert,
    electra,
    gemma,
    gpt2,
    marian,
    modernbert,
    moe,
    phi3,
    t5,
)

FAMILIES: dict[str, ModuleType] = {t: family for family in (bert, electra, distilbert, albert, deberta, modernbert,
                                                             decoder, gemma, gpt2, phi3, moe, t5, marian,
                                                             bart)
                                  for t in family.MODEL_TYPES}
TASK_BUILDERS = {"classification": "sequence_classification", "causal_lm": "causal_lm", "seq2seq": "seq2seq_lm"}


def family_for(hf_config) -> ModuleType:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(f"unknown model_type {model_type!r} in the checkpoint's config.json; "
                        f"supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def builder(family: ModuleType, task: str):
    name = TASK_BUILDERS.get(task)
    if name is None or not hasattr(family, name):
        raise UserError(f"task {task!r} is not available for {family.__name__.rsplit('.', 1)[-1]} models")
    return getattr(family, name)
