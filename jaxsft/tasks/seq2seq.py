"""Sequence-to-sequence fine-tuning (machine translation): source/target pairs, fixed-shape encoder-decoder batches,
token cross-entropy, and BLEU/chrF on generated hypotheses (sacrebleu).

Data: a JSONL/CSV/TSV/parquet file with data.source_field / data.target_field, or two line-aligned text files
`train.en,train.de` (source first; a blank line is an empty text and keeps its place). Without a target column
(evaluation or generation only) the features have no labels.
Tokens: the encoder reads data.source_prefix + source, cut at max_length; the target is tokenized with
`text_target=` (Marian's target vocabulary; the tokenizer's closing EOS), cut at data.max_target_length (None:
max_length). The decoder reads the target shifted right behind the decoder start token, which featurize takes from
config.model.decoder_start_token_id (the loop copies the HF config's there), else the tokenizer's pad id (T5's and
Marian's start token). Loss on every target token, EOS included.
Shapes: the source length is bucketed with the loop's buckets, the target length with `target_buckets(config)`
(carried by the Features, as is the start token), so an epoch compiles at most len(buckets) × len(target buckets)
shapes, and in practice a few: batches are grouped by source length, and target lengths follow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from jaxsft.data import sharded
from jaxsft.data.batching import bucket_for, default_buckets, local_part, pad_rows
from jaxsft.data.sources import require_columns
from jaxsft.errors import UserError
from jaxsft.tasks.losses import token_nll

log = logging.getLogger("jaxsft")

name = "seq2seq"
LLM_PROMPT = "Translate from {source_lang} to {target_lang}:\n{source}\n"


@dataclass
class Features:
    input_ids: list[np.ndarray]  # per example, int32: prefix + source tokens (with the tokenizer's EOS)
    labels: list[np.ndarray] | None  # per example, int32: target tokens incl. EOS; None without targets
    lengths: np.ndarray  # source tokens per example (what batches are grouped and bucketed by)
    target_lengths: np.ndarray  # target tokens per example (zeros without targets)
    sources: list[str]  # raw source texts (no prefix)
    references: list[str] | None  # raw target texts
    decoder_start_token_id: int
    target_buckets: list[int]
    num_empty: int = 0  # pairs with a blank source or target (kept, as "")
    num_truncated: int = 0  # sources or targets at their length limit (cut, or exactly that long)
    num_duplicates: int = 0  # pairs equal to an earlier pair (source and target); kept
    keys: np.ndarray | None = None  # per example, a 64-bit key of its pair (duplicates across processes)
    on_demand: sharded.OnDemand | None = None  # token rows made when a batch needs them (multi-process training)

    def __len__(self) -> int:
        return len(self.input_ids)


def checkpoint_metric(config) -> tuple[str, str]:
    return ("eval_bleu", "max")


def target_buckets(config) -> list[int]:
    """Padded target lengths: data.buckets up to max_target_length (if set), else powers of two up to it."""
    limit = config.data.max_target_length or config.max_length
    if config.data.buckets:
        return sorted({int(b) for b in config.data.buckets if int(b) < limit} | {limit})
    return default_buckets(limit)


def resolve_labels(config, train_ds) -> None:
    """No label set to infer: checks that the training data has the source and target columns."""
    d = config.data
    require_columns(train_ds, [d.source_field], "data.train", d.train, "data.source_field")
    require_columns(train_ds, [d.target_field], "data.train", d.train, "data.target_field")


def _texts(values) -> list[str]:
    return ["" if v is None else str(v) for v in values]


def language_id(tokenizer, code: str) -> int | None:
    """The token id of a language code of a multilingual tokenizer (M2M100's `en` is the token `__en__`); None
    when the tokenizer does not know it."""
    if hasattr(tokenizer, "get_lang_id"):
        try:
            return int(tokenizer.get_lang_id(code))
        except (KeyError, ValueError):
            return None
    found = tokenizer.convert_tokens_to_ids(code)
    return None if found is None or found == tokenizer.unk_token_id else int(found)


def set_languages(tokenizer, config) -> None:
    """data.src_lang / data.tgt_lang become the tokenizer's src_lang / tgt_lang (its language-code tokens on
    sources and on targets); unset keys leave the tokenizer's own."""
    for key in ("src_lang", "tgt_lang"):
        code = config.data.get(key)  # .get: workdirs from before the keys
        if code is None:
            continue
        if not hasattr(tokenizer, key):
            raise UserError(f"config.data.{key}={code!r}: the tokenizer ({type(tokenizer).__name__}) has no "
                            "language codes (NLLB, M2M100 and mBART tokenizers have)")
        if language_id(tokenizer, code) is None:
            raise UserError(f"config.data.{key}={code!r} is not a language code of the tokenizer "
                            f"({type(tokenizer).__name__}; e.g. NLLB: eng_Latn, M2M100: en, mBART-50: en_XX)")
        setattr(tokenizer, key, code)


def generation_overrides(tokenizer, config) -> dict:
    """What the run's settings change in the checkpoint's generation config: the decoder start token it trained
    with (config.model.decoder_start_token_id) and the forced BOS (decode.forced_bos_token_id, else data.tgt_lang's
    code where the tokenizer leads targets with it, as NLLB's, M2M100's and mBART-50's do and transformers'
    translation pipeline forces; mBART's own targets end with their code, which is the decoder start instead)."""
    set_languages(tokenizer, config)  # the sources generation reads carry data.src_lang's code
    out = {}
    start = config.model.get("decoder_start_token_id")
    if start is not None:
        out["decoder_start_token_id"] = int(start)
    forced = config.decode.get("forced_bos_token_id")
    code = config.data.get("tgt_lang")
    if forced is None and code is not None:
        lang = language_id(tokenizer, code)
        if list(tokenizer(text_target="")["input_ids"][:1]) == [lang]:
            forced = lang
    if forced is not None:
        out["forced_bos_token_id"] = int(forced)
    return out


def featurize(ds, tokenizer, config, key: str, spec: str, *, need_labels: bool = True, first_row: int = 0,
              report: bool = True) -> Features:
    """Tokenizes one split: prefixed sources for the encoder, targets (with EOS) for the decoder. `first_row`: the
    data set row `ds` starts at (a slice of it); `report`: log the counts (not for a slice)."""
    d = config.data
    set_languages(tokenizer, config)
    require_columns(ds, [d.source_field], key, spec, "data.source_field")
    has_targets = d.target_field in ds.column_names
    if need_labels and not has_targets:
        require_columns(ds, [d.target_field], key, spec, "data.target_field")
    sources = _texts(ds[d.source_field])
    prefix = d.source_prefix or ""
    ids = [np.asarray(x, dtype=np.int32) for x in
           tokenizer([prefix + s for s in sources], truncation=True, max_length=config.max_length)["input_ids"]]
    lengths = np.asarray([len(x) for x in ids], dtype=np.int64)
    max_target = d.max_target_length or config.max_length
    labels = references = None
    target_lengths = np.zeros(len(ids), dtype=np.int64)
    blank = np.asarray([not s.strip() for s in sources])
    truncated = lengths >= config.max_length
    if has_targets:
        references = _texts(ds[d.target_field])
        labels = [np.asarray(x, dtype=np.int32) for x in
                  tokenizer(text_target=references, truncation=True, max_length=max_target)["input_ids"]]
        target_lengths = np.asarray([len(x) for x in labels], dtype=np.int64)
        blank |= np.asarray([not t.strip() for t in references])
        truncated |= target_lengths >= max_target
    start = config.model.get("decoder_start_token_id")
    start = tokenizer.pad_token_id if start is None else int(start)
    keys = sharded.keys_of(zip(sources, references) if references is not None else zip(sources))
    f = Features(ids, labels, lengths, target_lengths, sources, references, start, target_buckets(config),
                 int(blank.sum()), int(truncated.sum()), sharded.duplicates(keys), keys)
    if report:
        _report(f, config, key)
    return f


def _report(f: Features, config, key: str) -> None:
    if f.num_empty or f.num_truncated:
        log.info("%s: %d pairs with a blank source or target (kept), %d at max_length=%d / max_target_length=%d",
                 key, f.num_empty, f.num_truncated, config.max_length,
                 config.data.max_target_length or config.max_length)


def scan(ds, tokenizer, config, key: str, spec: str, *, first_row: int = 0) -> dict:
    """What planning needs of these training pairs (one process's slice; jaxsft.data.sharded)."""
    f = featurize(ds, tokenizer, config, key, spec, need_labels=True, first_row=first_row, report=False)
    return {"lengths": f.lengths, "target_lengths": f.target_lengths, "keys": f.keys, "num_empty": f.num_empty,
            "num_truncated": f.num_truncated}


def from_scan(meta: dict, ds, tokenizer, config, key: str, spec: str) -> Features:
    """Training features from the gathered scans: lengths of every pair, tokens made on demand."""
    def build(indices: np.ndarray) -> list[dict]:
        f = featurize(ds.select(indices), tokenizer, config, key, spec, need_labels=True, report=False)
        return [{"input_ids": a, "labels": b, "sources": c, "references": d}
                for a, b, c, d in zip(f.input_ids, f.labels, f.sources, f.references)]

    rows = sharded.OnDemand(len(meta["lengths"]), build, config.max_length)
    start = config.model.get("decoder_start_token_id")
    start = tokenizer.pad_token_id if start is None else int(start)
    f = Features(rows.field("input_ids"), rows.field("labels"), meta["lengths"], meta["target_lengths"],
                 rows.field("sources"), rows.field("references"), start,
                 target_buckets(config), meta["num_empty"], meta["num_truncated"], sharded.duplicates(meta["keys"]),
                 on_demand=rows)
    _report(f, config, key)
    return f


# --- batches, loss, metrics ------------------------------------------------------------------------------------

def batch_lengths(features: Features, indices: np.ndarray, buckets: list[int]) -> tuple[int, ...]:
    """(source, target) padded lengths of this batch: all its shapes follow from them."""
    return (bucket_for(int(features.lengths[indices].max()), buckets),
            bucket_for(int(features.target_lengths[indices].max()), features.target_buckets))


def collate(features: Features, indices: np.ndarray, batch_size: int, buckets: list[int], pad_id: int,
            rows: slice | None = None) -> dict:
    """One fixed-shape numpy batch; rows past len(indices) are padding (all masks 0). `rows`: only those rows of
    it (a process's share; the lengths still come from the whole batch).

    Target side: `labels` (pad 0) and `loss_mask` (1 on every target token, EOS included); `decoder_input_ids` are
    the labels shifted right behind the decoder start token (pad_id after). `weights` (B,) counts loss tokens.
    """
    src_len, tgt_len = batch_lengths(features, indices, buckets)
    indices, batch_size = local_part(indices, batch_size, rows)
    if features.on_demand is not None:
        features.on_demand.fetch(indices)
    n = len(indices)
    ids = pad_rows([features.input_ids[i] for i in indices], src_len, pad_id, batch_size)
    mask = (np.arange(src_len)[None] < np.minimum(features.lengths[indices], src_len)[:, None]).astype(np.int32)
    tgt_lens = np.minimum(features.target_lengths[indices], tgt_len)
    loss_mask = np.zeros((batch_size, tgt_len), dtype=np.float32)
    loss_mask[:n] = np.arange(tgt_len)[None] < tgt_lens[:, None]
    if features.labels is None:
        labels = np.zeros((batch_size, tgt_len), dtype=np.int32)
    else:
        labels = pad_rows([features.labels[i] for i in indices], tgt_len, 0, batch_size)
    start = np.full((batch_size, 1), features.decoder_start_token_id, dtype=np.int32)
    dec_ids = np.where(loss_mask > 0, np.concatenate([start, labels[:, :-1]], axis=1), pad_id).astype(np.int32)
    dec_ids[:n, 0] = features.decoder_start_token_id  # without targets: the start token alone
    dec_mask = loss_mask.astype(np.int32)
    dec_mask[:n, 0] = 1
    return {"input_ids": ids, "attention_mask": np.pad(mask, ((0, batch_size - n), (0, 0))),
            "decoder_input_ids": dec_ids, "decoder_attention_mask": dec_mask, "labels": labels,
            "loss_mask": loss_mask, "weights": loss_mask.sum(axis=1)}


def forward(apply, params, batch, rng=None):
    return apply(params, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                 batch["decoder_attention_mask"], rng=rng)


def loss(logits, batch, config):
    """(sum of token cross-entropies over target tokens, number of target tokens): the loop divides."""
    mask = batch["loss_mask"]
    return (token_nll(logits, batch["labels"], config.label_smoothing) * mask).sum(), mask.sum()


def eval_outputs(logits, batch):
    """(B, 2) float32 per row: [sum of token NLL over target tokens, number of target tokens]."""
    mask = batch["loss_mask"]
    return jnp.stack([(token_nll(logits, batch["labels"]) * mask).sum(-1), mask.sum(-1)], axis=-1)


def compute_metrics(outputs: np.ndarray, features: Features, config) -> dict[str, float]:
    """Token-level eval_loss; generation metrics (BLEU, chrF) come from `generation_metrics`."""
    outputs = np.asarray(outputs, dtype=np.float64)
    tokens = outputs[:, 1].sum()
    if features.labels is None or tokens <= 0:
        return {}
    return {"eval_loss": float(outputs[:, 0].sum() / tokens)}


def prompts_for_generation(features: Features) -> list[list[int]]:
    """The encoder input ids of every example, in data set order (what generation translates)."""
    return [x.tolist() for x in features.input_ids]


def prediction_lines(hypotheses: list[str]) -> list[str]:
    """One line per hypothesis (line breaks inside one become spaces): a file sacrebleu reads line by line."""
    return [" ".join(h.splitlines()) for h in hypotheses]


def eval_generates(config) -> bool:
    """Evaluation decodes the eval set (BLEU / chrF) on top of the token loss."""
    return True


def generation_metrics(hypotheses: list[str], features: Features, config, *,
                       token_lengths: list[int] | None = None) -> dict:
    """sacrebleu corpus BLEU and chrF (default settings, detokenized text) against the references, with their
    signatures; `eval_gen_len` (mean generated tokens) when `token_lengths` are given."""
    from sacrebleu.metrics import BLEU, CHRF

    if features.references is None:
        return {}
    if len(hypotheses) != len(features.references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(features.references)} references")
    hyps, refs = prediction_lines(hypotheses), [prediction_lines(features.references)]
    bleu, chrf = BLEU(), CHRF()
    out = {"eval_bleu": float(bleu.corpus_score(hyps, refs).score),
           "eval_chrf": float(chrf.corpus_score(hyps, refs).score),
           "eval_bleu_signature": str(bleu.get_signature()), "eval_chrf_signature": str(chrf.get_signature())}
    if token_lengths is not None and len(token_lengths):
        out["eval_gen_len"] = float(np.mean(token_lengths))
    return out


# --- translation as SFT on a decoder LLM (configs/translate_llm.py, causal_lm task) ----------------------------

def to_instruction_rows(ds, config, key: str = "data.train", spec: str | None = None):
    """Source/target rows → `prompt`/`completion` rows (LLM_PROMPT naming data.source_lang / data.target_lang);
    without a target column, `prompt` rows only (for generation)."""
    import datasets

    d = config.data
    require_columns(ds, [d.source_field], key, d.train if spec is None else spec, "data.source_field")
    rows = {"prompt": [LLM_PROMPT.format(source_lang=d.source_lang, target_lang=d.target_lang, source=s)
                       for s in _texts(ds[d.source_field])]}
    if d.target_field in ds.column_names:
        rows["completion"] = _texts(ds[d.target_field])
    return datasets.Dataset.from_dict(rows)
