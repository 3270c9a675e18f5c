"""Causal-LM supervised fine-tuning: SFT data formats, loss masks, packed rows, next-token loss and perplexity.

Data formats (TRL's column names), detected from the training columns unless data.format names one:
  messages           a list of {role, content} turns
  prompt_completion  prompt + completion: strings, or lists of turns (TRL's conversational form)
  alpaca             instruction + output, with an optional input ("" or null when absent)
  text               plain text
Rendering. The chat template is data.chat_template, else the tokenizer's. `messages` (and conversational
prompt+completion) always go through it. Alpaca and string prompt+completion go through it too when one exists, as
a user turn (the prompt; for Alpaca the instruction, plus "\\n\\n" + input when there is one) and an assistant turn
(the completion/output). Without a template, Alpaca uses the standard Alpaca prompt and prompt+completion is the
prompt text followed by the completion text.
Tokens. The special tokens `tokenizer(text)` puts in front (e.g. BOS) start every example, once (not again when
the template writes them). A plain completion is tokenized on its own, so prompt ids + completion ids is exactly
what the model sees and what generation continues from. Chat data is tokenized whole; each loss turn spans from the
token prefix of the conversation rendered up to it (with the generation prompt) to that of the conversation
rendered through it, as TRL does (no `{% generation %}` markers needed). Every example ends with the tokenizer's EOS
unless the rendered text already closes its last loss turn with it.
Loss tokens (data.loss_on): all of `text`, whatever the key; otherwise "assistant" (default): the completion / every
assistant turn (multi-turn; of a conversational completion, all its turns); "last_turn": only the last assistant
turn (earlier turns are context; Alpaca and string prompt+completion have one, so it is "assistant" there); "all":
every token, system / user turns and template markup included (data.train_on_prompt=True is its older spelling).
The appended EOS is a target when the last loss turn is the example's last turn (always with "all").
End of turn (data.train_on_eos): a loss span (turn, completion or text) runs through the markup the template writes
after the content. Its end-of-turn tokens are its last run of special tokens (the tokenizer's special tokens and
added tokens marked special, not UNK) when only whitespace tokens follow that run in the span, with those tokens:
ChatML `<|im_end|>` "\n", Llama 3 `<|eot_id|>`, Gemma `<end_of_turn>` "\n", Mistral `</s>`; none when the span
ends in other text (a template that closes turns with plain text). data.train_on_eos=False masks them and the
appended EOS (the tokens stay); True (default) trains them. Examples are cut at max_length; those left without a loss
token are dropped. With data.packing, examples are packed whole into rows of max_length tokens (segment ids 1..k,
positions restarting per segment); `lengths` and batches are per row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.data import batching, sharded
from jaxsft.data.batching import BatchPlan, bucket_for, local_part, pad_rows
from jaxsft.data.packing import next_token_targets, pack, segment_layout
from jaxsft.data.sources import require_columns
from jaxsft.errors import UserError, first_line
from jaxsft.tasks.losses import token_nll

log = logging.getLogger("jaxsft")

name = "causal_lm"
default_metric = ("eval_loss", "min")
FORMATS = {"messages": ["messages"], "prompt_completion": ["prompt", "completion"],
           "alpaca": ["instruction", "output"], "text": ["text"]}
LOSS_ON = ("assistant", "last_turn", "all")  # data.loss_on
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass
class Features:
    input_ids: list[np.ndarray]  # per row, int32
    segment_ids: list[np.ndarray]  # per row, 1..k (one per example)
    positions: list[np.ndarray]  # per row, restarting at 0 per segment
    loss_tokens: list[np.ndarray]  # per row, uint8: 1 where the token is a prediction target
    rows: list[np.ndarray]  # per row, the data set indices of its examples
    lengths: np.ndarray  # real tokens per row
    prompts: list[str] = field(default_factory=list)  # per data set example: the text a generation continues
    references: list[str] = field(default_factory=list)  # per data set example: the completion / last reply
    num_empty: int = 0  # examples left out: no loss token within max_length
    num_truncated: int = 0  # examples cut at max_length
    num_duplicates: int = 0  # examples whose tokens and loss mask equal an earlier one's; kept
    on_demand: sharded.OnDemand | None = None  # token rows made when a batch needs them (multi-process training)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_examples(self) -> int:  # kept examples (rows hold one or more each)
        return sum(len(r) for r in self.rows)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_loss_tokens(self) -> int:
        return int(sum(int(x[1:].sum()) if len(x) else 0 for x in self.loss_tokens))


def checkpoint_metric(config) -> tuple[str, str]:
    return ("eval_bleu", "max") if eval_generates(config) else default_metric


def eval_generates(config) -> bool:
    """Translation prompts (data.format "translation") are scored by BLEU/chrF on greedy generations of the whole
    eval set; other data when decode.eval_samples is set (the first N prompts, -1: all)."""
    return config.data.format == "translation" or bool(config.decode.get("eval_samples"))


def generation_prompts(features, config) -> list[str]:
    """The eval prompts decoded at each evaluation: all for translation, else the first decode.eval_samples."""
    n = config.decode.get("eval_samples") or 0
    return features.prompts if config.data.format == "translation" or n < 0 else features.prompts[:n]


GENERATION_METRICS = ("exact_match", "rouge_l", "bleu", "chrf")


def generation_metrics(hypotheses: list[str], features, config) -> dict:
    """Translation: sacrebleu BLEU / chrF against the targets (eval_bleu, eval_chrf), as seq2seq. Otherwise the
    decode.eval_metrics of the completions against the references (the completion, or the last assistant reply),
    as `eval_gen_<metric>` in percent: exact_match (equal after stripping surrounding whitespace), rouge_l (the mean
    ROUGE-L F1 of Google's rouge-score package, no stemming: HF evaluate's `rougeL` defaults), bleu / chrf
    (sacrebleu corpus scores, default settings); plus eval_gen_samples."""
    from jaxsft.tasks import seq2seq

    if config.data.format == "translation":
        return seq2seq.generation_metrics(hypotheses, features, config)
    refs = list(features.references[:len(hypotheses)])
    hyps = list(hypotheses)
    if not hyps:
        return {}
    out: dict = {"eval_gen_samples": len(hyps)}
    for metric in config.decode.get("eval_metrics") or ():
        if metric == "exact_match":
            out["eval_gen_exact_match"] = 100.0 * float(np.mean([h.strip() == r.strip() for h, r in zip(hyps, refs)]))
        elif metric == "rouge_l":
            from rouge_score import rouge_scorer

            scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
            out["eval_gen_rouge_l"] = 100.0 * float(np.mean([scorer.score(r, h)["rougeL"].fmeasure
                                                             for h, r in zip(hyps, refs)]))
        elif metric in ("bleu", "chrf"):
            from sacrebleu.metrics import BLEU, CHRF

            scorer = BLEU() if metric == "bleu" else CHRF()
            lines = seq2seq.prediction_lines
            out[f"eval_gen_{metric}"] = float(scorer.corpus_score(lines(hyps), [lines(refs)]).score)
    return out


def generation_rows(hypotheses: list[str], features, config) -> list[dict]:
    """One JSON row per decoded eval prompt: index, prompt, reference, completion."""
    return [{"index": i, "prompt": p, "reference": r, "completion": h}
            for i, (p, r, h) in enumerate(zip(features.prompts, features.references, hypotheses))]


def detect_format(ds, key: str, spec: str) -> str:
    cols = ds.column_names
    for fmt, need in FORMATS.items():
        if all(c in cols for c in need):
            return fmt
    raise UserError(f"{key}: {spec} has columns {', '.join(cols)}; causal_lm data needs messages, "
                    "prompt+completion, instruction+output (+input) or text (or set data.format)")


def resolve_labels(config, train_ds) -> None:
    """No labels: detects the data format from the training columns into `data.format` (or checks the given one)."""
    d = config.data
    if d.format == "translation":  # source/target pairs → prompt/completion (configs/translate_llm.py)
        require_columns(train_ds, [d.source_field, d.target_field], "data.train", d.train, "data.source_field")
        return
    if d.format:
        if d.format not in FORMATS:
            raise UserError(f"data.format: {d.format!r} is not one of {', '.join(FORMATS)}")
        require_columns(train_ds, FORMATS[d.format], "data.train", d.train, "data.format")
    else:
        d.format = detect_format(train_ds, "data.train", d.train)


# --- rendering -------------------------------------------------------------------------------------------------

def has_chat_template(tokenizer, config) -> bool:
    return bool(config.data.chat_template or getattr(tokenizer, "chat_template", None))


def _render(tokenizer, config, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=config.data.chat_template or None, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def render_prompt(tokenizer, config, text: str) -> str:
    """A raw user prompt wrapped as training data was: a chat user turn + generation prompt, else the Alpaca prompt."""
    if has_chat_template(tokenizer, config):
        return _render(tokenizer, config, [{"role": "user", "content": text}], True)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=text)


def _special_prefix(tokenizer) -> list[int]:
    """The special tokens `tokenizer(text)` puts in front of a text (e.g. [BOS]); trailing ones are not used."""
    full = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for s in range(len(full) - len(plain) + 1):
        if full[s:s + len(plain)] == plain:
            return list(full[:s])
    return []


def _with_prefix(prefix: list[int], ids: list[int]) -> list[int]:
    return list(ids) if prefix and list(ids[:len(prefix)]) == prefix else prefix + list(ids)


def encode_prompt(tokenizer, config, text: str) -> list[int]:
    """Token ids of a prompt as training saw it (the special prefix once, then the text): what generation feeds."""
    return _with_prefix(_special_prefix(tokenizer), tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    a, b = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if len(diff) else n


def _text(v) -> str:
    return "" if v is None else str(v)


@dataclass
class _Plain:  # prompt text + completion text, tokenized apart
    prompt: str
    completion: str
    train_all: bool  # loss on the prompt too (text format, or train_on_prompt)


@dataclass
class _Chat:  # a conversation tokenized whole; loss on the turns in `loss_turns`
    messages: list[dict]
    loss_turns: list[int]


def _loss_on(config) -> str:
    """data.loss_on; data.train_on_prompt=True (its older spelling) is "all", and a config.json written before the
    key existed means "assistant"."""
    d = config.data
    loss_on = "all" if d.get("train_on_prompt") else d.get("loss_on") or "assistant"
    if loss_on not in LOSS_ON:
        raise UserError(f"config.data.loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    return loss_on


def _turn_end_finder(tokenizer):
    """(ids, start, end) → the end-of-turn positions of the loss span ids[start:end] (masked by
    data.train_on_eos=False): the span's last run of special tokens (the tokenizer's special tokens and added tokens
    marked special; not UNK) when only whitespace tokens follow it in the span, with those whitespace tokens;
    none when the span ends in other text."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    special.discard(tokenizer.unk_token_id)
    blank: dict[int, bool] = {}

    def is_blank(t: int) -> bool:
        if t not in blank:
            blank[t] = not tokenizer.decode([t]).strip()
        return blank[t]

    def find(ids, start: int, end: int) -> range:
        e = end
        while e > start and ids[e - 1] not in special and is_blank(ids[e - 1]):
            e -= 1
        s = e
        while s > start and ids[s - 1] in special:
            s -= 1
        return range(s, end) if s < e else range(0)

    return find


def _examples(ds, config, key: str, spec: str, chat: bool, first_row: int = 0) -> tuple[list, list[str]]:
    """Per data set row: a _Plain or _Chat, and the reference text (`first_row`: the data set row `ds` starts at,
    for messages)."""
    fmt = config.data.format or detect_format(ds, key, spec)
    if fmt == "translation":
        from jaxsft.tasks import seq2seq

        ds, fmt = seq2seq.to_instruction_rows(ds, config, key, spec), "prompt_completion"
        if "completion" not in ds.column_names:  # unlabelled sources: prompts only, nothing to score
            ds = ds.add_column("completion", [""] * len(ds))
    require_columns(ds, FORMATS[fmt], key, spec, "data.format")
    loss_on = _loss_on(config)
    on_prompt, last_turn = loss_on == "all", loss_on == "last_turn"

    def last(msgs, turns):  # data.loss_on=last_turn: the last assistant turn of the loss turns (else the last one)
        return ([j for j in turns if msgs[j].get("role") == "assistant"] or turns)[-1:] if last_turn else turns

    out, refs = [], []
    if fmt == "text":
        for t in ds["text"]:
            out.append(_Plain("", _text(t), True))
            refs.append(_text(t))
        return out, refs
    no_template = UserError(f"{key}: the data is in chat format (messages) but the tokenizer has no chat template; "
                            "set data.chat_template")
    if fmt == "messages":
        if not chat:
            raise no_template
        for i, msgs in enumerate(ds["messages"]):
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
                raise UserError(f"{key}: row {first_row + i} of {spec}: messages must be a list of "
                                "{role, content} turns")
            turns = [j for j, m in enumerate(msgs) if m["role"] == "assistant"]
            out.append(_Chat(list(msgs), last(msgs, turns)))
            refs.append(_text(msgs[turns[-1]].get("content")) if turns else "")
        return out, refs
    if fmt == "alpaca":
        inputs = ds["input"] if "input" in ds.column_names else [None] * len(ds)
        pairs = []
        for ins, inp, output in zip(ds["instruction"], inputs, ds["output"]):
            ins, inp = _text(ins), _text(inp)
            if chat:
                pairs.append((ins + "\n\n" + inp if inp.strip() else ins, _text(output)))
            elif inp.strip():
                pairs.append((ALPACA_PROMPT.format(instruction=ins, input=inp), _text(output)))
            else:
                pairs.append((ALPACA_PROMPT_NO_INPUT.format(instruction=ins), _text(output)))
    else:  # prompt_completion
        pairs = list(zip(ds["prompt"], ds["completion"]))
    for p, c in pairs:
        if isinstance(p, list) or isinstance(c, list):  # conversational: loss on the completion's turns
            if not chat:
                raise no_template
            p = list(p) if isinstance(p, list) else [{"role": "user", "content": _text(p)}]
            c = list(c) if isinstance(c, list) else [{"role": "assistant", "content": _text(c)}]
            out.append(_Chat(p + c, last(p + c, list(range(len(p), len(p) + len(c))))))
            refs.append(_text(c[-1].get("content")) if c else "")
        elif chat:
            out.append(_Chat([{"role": "user", "content": _text(p)}, {"role": "assistant", "content": _text(c)}],
                             [1]))
            refs.append(_text(c))
        else:
            out.append(_Plain(_text(p), _text(c), on_prompt))
            refs.append(_text(c))
    return out, refs


def _chat_texts(ex: _Chat, tokenizer, config, key: str, row: int) -> list[str]:
    """[whole conversation, generation prompt, then (prefix, through) per loss turn]."""
    def render(msgs, gen=False):
        if not msgs:
            return ""
        try:
            return _render(tokenizer, config, msgs, gen)
        except Exception as e:  # noqa: BLE001 - a template error is a data or template problem
            msg = first_line(e)
            raise UserError(f"{key}: row {row}: the chat template failed ({type(e).__name__}: {msg})") from None

    m, turns = ex.messages, ex.loss_turns
    texts = [render(m), render(m[:turns[-1]] if turns else m, True)]
    for j in turns:
        texts += [render(m[:j], m[j]["role"] == "assistant"), render(m[:j + 1])]
    return texts


def _tokenize(examples: list, tokenizer, config, key: str,
              first_row: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """(ids, loss_tokens, prompt texts) per example, before truncation."""
    chat_texts = {i: _chat_texts(ex, tokenizer, config, key, first_row + i) for i, ex in enumerate(examples)
                  if isinstance(ex, _Chat)}
    strings = []
    for i, ex in enumerate(examples):
        strings += chat_texts[i] if i in chat_texts else [ex.prompt, ex.completion]
    enc = tokenizer(strings, add_special_tokens=False)["input_ids"] if strings else []
    prefix, eos = _special_prefix(tokenizer), tokenizer.eos_token_id
    on_prompt = _loss_on(config) == "all"
    eos_off = not config.data.get("train_on_eos", True)  # mask the end of each loss span and the appended EOS
    turn_end = _turn_end_finder(tokenizer) if eos_off else None
    all_ids, all_loss, prompts, k = [], [], [], 0
    for i, ex in enumerate(examples):
        if isinstance(ex, _Plain):
            c_ids = list(enc[k + 1])
            ids = _with_prefix(prefix, list(enc[k]) + c_ids)  # text that starts with BOS keeps just that one
            k += 2
            loss = [int(ex.train_all)] * (len(ids) - len(c_ids)) + [1] * len(c_ids)
            spans = [(len(ids) - len(c_ids), len(ids))]
            close = eos is not None and not (ids and ids[-1] == eos)
            prompts.append(ex.prompt)
            end_loss = 1
        else:
            texts = chat_texts[i]
            seqs = [_with_prefix(prefix, e) for e in enc[k:k + len(texts)]]
            k += len(texts)
            ids, loss = seqs[0], [int(on_prompt)] * len(seqs[0])
            span, spans = (0, 0), []
            for t in range(len(ex.loss_turns)):
                start = _common_prefix(seqs[2 + 2 * t], ids) if texts[2 + 2 * t] else 0
                span = (start, _common_prefix(seqs[3 + 2 * t], ids))
                loss[span[0]:span[1]] = [1] * max(span[1] - span[0], 0)
                spans.append(span)
            close = eos is not None and eos not in ids[span[0]:span[1]] and not (ids and ids[-1] == eos)
            prompts.append(texts[1])
            end_loss = int(on_prompt or (bool(ex.loss_turns) and ex.loss_turns[-1] == len(ex.messages) - 1))
        if eos_off:
            for a, b in spans:
                for j in turn_end(ids, a, b):
                    loss[j] = 0
            end_loss = 0
        if close:
            ids, loss = ids + [eos], loss + [end_loss]
        all_ids.append(np.asarray(ids, dtype=np.int32))
        all_loss.append(np.asarray(loss, dtype=np.uint8))
    return all_ids, all_loss, prompts


def _example_tokens(ds, tokenizer, config, key: str, spec: str, first_row: int = 0):
    """Per data set example: (ids, loss tokens) cut at max_length, and the prompt and reference texts; with the
    examples cut and each example's 64-bit key (tokens and loss mask: duplicates)."""
    examples, references = _examples(ds, config, key, spec, has_chat_template(tokenizer, config), first_row)
    ids, loss, prompts = _tokenize(examples, tokenizer, config, key, first_row)
    max_length = config.max_length
    truncated = sum(len(x) > max_length for x in ids)
    keys = sharded.keys_of((x.tobytes(), m.tobytes()) for x, m in zip(ids, loss))
    return [x[:max_length] for x in ids], [x[:max_length] for x in loss], prompts, references, truncated, keys


def _plan_rows(lengths: np.ndarray, has_loss: np.ndarray, config, key: str, spec: str) -> tuple[list, int]:
    """(the example indices of each row, examples left out): examples without a loss token are left out, the rest
    packed whole into rows of max_length (data.packing) or one per row."""
    keep = np.flatnonzero(has_loss)
    num_empty = len(lengths) - len(keep)
    if num_empty:
        log.info("%s: %d of %d examples have no loss token within max_length=%d and are left out", key, num_empty,
                 len(lengths), config.max_length)
    if not len(keep):
        raise UserError(f"{key}: no example of {spec} has a loss token within max_length={config.max_length}")
    groups = pack(lengths[keep], config.max_length) if config.data.packing else [np.asarray([j])
                                                                                  for j in range(len(keep))]
    return [keep[g].astype(np.int64) for g in groups], num_empty


def _row(ids: list[np.ndarray], loss: list[np.ndarray]) -> dict:
    """One row of examples laid end to end: segment ids 1..k, positions restarting per example."""
    seg, pos = segment_layout([len(x) for x in ids])
    return {"input_ids": np.concatenate(ids), "loss_tokens": np.concatenate(loss), "segment_ids": seg,
            "positions": pos}


def featurize(ds, tokenizer, config, key: str, spec: str, *, need_labels: bool = True) -> Features:
    """Tokenizes one split into rows (packed when data.packing) with explicit loss tokens."""
    ids, loss, prompts, references, truncated, keys = _example_tokens(ds, tokenizer, config, key, spec)
    lengths = np.asarray([len(x) for x in ids], dtype=np.int64)
    members, num_empty = _plan_rows(lengths, np.asarray([x[1:].any() for x in loss], dtype=bool), config, key,
                                    spec)
    f = Features([], [], [], [], members, np.asarray([lengths[m].sum() for m in members], dtype=np.int64), prompts,
                 references, num_empty, truncated, sharded.duplicates(keys))
    for m in members:
        row = _row([ids[i] for i in m], [loss[i] for i in m])
        for name in ("input_ids", "segment_ids", "positions", "loss_tokens"):
            getattr(f, name).append(row[name])
    _report_packing(f, config, key)
    return f


def _report_packing(f: Features, config, key: str) -> None:
    if config.data.packing:
        log.info("%s: %d examples packed into %d rows of %d tokens (%.1f%% filled)", key, f.num_examples, len(f),
                 config.max_length, 100 * f.num_tokens / (len(f) * config.max_length))


def scan(ds, tokenizer, config, key: str, spec: str, *, first_row: int = 0) -> dict:
    """What planning needs of these training examples (one process's slice; jaxsft.data.sharded)."""
    ids, loss, _, _, truncated, keys = _example_tokens(ds, tokenizer, config, key, spec, first_row)
    return {"lengths": np.asarray([len(x) for x in ids], dtype=np.int64),
            "has_loss": np.asarray([x[1:].any() for x in loss], dtype=bool), "keys": keys, "num_truncated": truncated}


def from_scan(meta: dict, ds, tokenizer, config, key: str, spec: str) -> Features:
    """Training features from the gathered scans: the same rows (and packing) as `featurize`, planned from every
    example's length; a row's tokens are made when a batch needs it."""
    members, num_empty = _plan_rows(meta["lengths"], meta["has_loss"], config, key, spec)

    def build(indices: np.ndarray) -> list[dict]:
        need = np.unique(np.concatenate([members[r] for r in indices]))
        ids, loss, *_ = _example_tokens(ds.select(need), tokenizer, config, key, spec)
        at = {int(e): j for j, e in enumerate(need)}
        return [_row([ids[at[int(e)]] for e in members[r]], [loss[at[int(e)]] for e in members[r]]) for r in indices]

    rows = sharded.OnDemand(len(members), build, config.max_length)
    f = Features(rows.field("input_ids"), rows.field("segment_ids"), rows.field("positions"),
                 rows.field("loss_tokens"), members, np.asarray([meta["lengths"][m].sum() for m in members],
                                                                dtype=np.int64),
                 num_empty=num_empty, num_truncated=meta["num_truncated"],
                 num_duplicates=sharded.duplicates(meta["keys"]), on_demand=rows)
    _report_packing(f, config, key)
    return f


def padding_share(features: Features, batch_size: int, buckets: list[int], *, group_by_length: bool = True) -> float:
    """Share of padding token slots over one epoch of training batches."""
    plan = BatchPlan(features.lengths, batch_size, seed=0, shuffle=True, group_by_length=group_by_length)
    return batching.padding_share(features.lengths, plan.epoch(0), batch_size, buckets)


# --- batches, loss, metrics ------------------------------------------------------------------------------------

def batch_lengths(features: Features, indices: np.ndarray, buckets: list[int]) -> tuple[int, ...]:
    """The padded length of this batch: all its shapes follow from it."""
    return (bucket_for(int(features.lengths[indices].max()), buckets),)


def collate(features: Features, indices: np.ndarray, batch_size: int, buckets: list[int], pad_id: int,
            rows: slice | None = None) -> dict:
    """One fixed-shape numpy batch of rows; rows past len(indices) are padding (segment 0, loss mask 0). `rows`:
    only those rows of it (a process's share; the length still comes from the whole batch).

    `weights` (B,) is the number of loss tokens per row, so a loop summing it gets the token count it divides by.
    """
    (length,) = batch_lengths(features, indices, buckets)
    indices, batch_size = local_part(indices, batch_size, rows)
    if features.on_demand is not None:
        features.on_demand.fetch(indices)

    def padded(xs, pad):
        return pad_rows([xs[i] for i in indices], length, pad, batch_size)

    ids, seg = padded(features.input_ids, pad_id), padded(features.segment_ids, 0)
    targets, loss_mask = next_token_targets(ids, seg, padded(features.loss_tokens, 0))
    return {"input_ids": ids, "attention_mask": (seg > 0).astype(np.int32), "segment_ids": seg,
            "positions": padded(features.positions, 0), "targets": targets, "loss_mask": loss_mask,
            "weights": loss_mask.sum(axis=1)}


def forward(apply, params, batch, rng=None):
    return apply(params, batch["input_ids"], batch["attention_mask"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"], rng=rng)


def loss(logits, batch, config):
    """(sum of token cross-entropies over loss tokens, number of loss tokens): the loop divides."""
    mask = batch["loss_mask"]
    return (token_nll(logits, batch["targets"], config.label_smoothing) * mask).sum(), mask.sum()


def chunked_loss(hidden, kernel, targets, mask, chunk: int, label_smoothing: float = 0.0):
    """`loss` without the (B, T, vocab) logits: hidden (B, T, D) @ kernel (D, vocab) in hidden's dtype, `chunk`
    tokens at a time under lax.scan, each chunk rematerialised in the backward pass, so at most (chunk, vocab)
    float32 logits live at once. Returns (sum of token cross-entropies over `mask`, mask.sum())."""
    d = hidden.shape[-1]
    h, t, m = hidden.reshape(-1, d), targets.reshape(-1), mask.reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    c = max(1, min(int(chunk), n))
    pad = (-n) % c
    if pad:  # padded tokens carry mask 0
        h, t, m = jnp.pad(h, ((0, pad), (0, 0))), jnp.pad(t, (0, pad)), jnp.pad(m, (0, pad))
    w = kernel.astype(hidden.dtype)

    @jax.checkpoint
    def one(w, hc, tc, mc):
        logits = jnp.dot(hc, w).astype(jnp.float32)
        return (token_nll(logits, tc, label_smoothing) * mc).sum()

    def body(acc, xs):
        return acc + one(w, *xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h.reshape(-1, c, d), t.reshape(-1, c),
                                                                m.reshape(-1, c)))
    return total, mask.sum()


def train_sums(functional, params, batch, rng, config):
    """The training loss sums; with config.chunked_loss_size > 0 the logits are computed chunk by chunk. An MoE model
    whose HF config asks for the router load-balancing loss (models/moe.py) adds coef x that loss to the mean, as
    transformers' *ForCausalLM does with labels."""
    chunk = int(config.get("chunked_loss_size", 0) or 0)
    kernel = functional.method(params, "head_kernel") if chunk > 0 else None
    coef = getattr(functional, "router_aux_loss_coef", 0.0)
    if kernel is None and not coef:  # unchunked (or a LoRA-adapted head: the plain path)
        return loss(forward(functional.apply, params, batch, rng), batch, config)
    extra = {"router_aux_loss": True} if coef else {}
    if kernel is not None:
        extra["hidden_only"] = True
    out = functional.apply(params, batch["input_ids"], batch["attention_mask"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"], rng=rng, **extra)
    out, aux = out if coef else (out, None)
    if kernel is None:
        total, count = loss(out, batch, config)
    else:
        total, count = chunked_loss(out, kernel, batch["targets"], batch["loss_mask"], chunk, config.label_smoothing)
    if coef:  # the loop divides by the count (no gradient through it): coef x aux x count adds coef x aux to the mean
        total = total + coef * aux * jax.lax.stop_gradient(jnp.maximum(count, 1.0))
    return total, count


def eval_outputs(logits, batch):
    """(B, 2) float32 per row: [sum of token NLL over loss tokens, number of loss tokens]."""
    mask = batch["loss_mask"]
    return jnp.stack([(token_nll(logits, batch["targets"]) * mask).sum(-1), mask.sum(-1)], axis=-1)


def compute_metrics(outputs: np.ndarray, features: Features, config) -> dict[str, float]:
    outputs = np.asarray(outputs, dtype=np.float64)
    tokens = outputs[:, 1].sum()
    if tokens <= 0:
        return {}
    nll = float(outputs[:, 0].sum() / tokens)
    return {"eval_loss": nll, "eval_perplexity": float(np.exp(nll))}


def prediction_lines(hypotheses: list[str]) -> list[str]:
    """Translation prompts: one hypothesis per line (sacrebleu-ready), as the seq2seq task writes them."""
    from jaxsft.tasks import seq2seq

    return seq2seq.prediction_lines(hypotheses)
