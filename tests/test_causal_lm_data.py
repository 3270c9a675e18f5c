"""causal_lm task: SFT data formats, loss masks, packing, fixed-shape batches, loss and metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED, minilm_path

from jaxsft.data.batching import default_buckets
from jaxsft.data.packing import next_token_targets, pack, segment_layout
from jaxsft.defaults import base_config
from jaxsft.errors import UserError
from jaxsft.tasks import causal_lm

datasets = pytest.importorskip("datasets")

# ChatML-like; one template closes each turn with EOS, the other does not.
TEMPLATE_EOS = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_tokenizer(pad: str = "[PAD]", chat_template: str | None = None):
    """An LLM-like tokenizer (BOS in front only) from MiniLM's vocabulary, as shared/checks/make_tiny.py builds."""
    import transformers as tf
    from tokenizers import processors

    base = tf.AutoTokenizer.from_pretrained(minilm_path())
    bt = base.backend_tokenizer
    bt.post_processor = processors.TemplateProcessing(single="[CLS] $A", pair="[CLS] $A $B",
                                                      special_tokens=[("[CLS]", base.cls_token_id)])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bt, bos_token="[CLS]", eos_token="[SEP]", pad_token=pad,
                                     unk_token="[UNK]")
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def config(**data):
    c = base_config()
    c.task, c.max_length = "causal_lm", 128
    c.data.packing = False
    for k, v in data.items():
        c.data[k] = v
    return c


def featurize(rows, tokenizer, c):
    ds = datasets.Dataset.from_list(rows)
    causal_lm.resolve_labels(c, ds)
    return causal_lm.featurize(ds, tokenizer, c, "data.train", "rows", need_labels=True)


def masked_targets(f, tokenizer, buckets=(16, 32, 64, 128)):
    """Per row: the target ids under the loss mask (rows are examples when packing is off)."""
    b = causal_lm.collate(f, np.arange(len(f)), len(f), list(buckets), tokenizer.pad_token_id)
    return [list(b["targets"][r][b["loss_mask"][r] > 0]) for r in range(len(f))], b


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_format_is_detected_from_the_columns():
    cases = {"messages": {"messages": [[{"role": "user", "content": "a"}]]},
             "prompt_completion": {"prompt": ["a"], "completion": ["b"]},
             "alpaca": {"instruction": ["a"], "output": ["b"]},
             "text": {"text": ["a"]}}
    for fmt, cols in cases.items():
        c = config()
        causal_lm.resolve_labels(c, datasets.Dataset.from_dict(cols))
        assert c.data.format == fmt
    c = config(format="text", train="pc.jsonl")  # a given format is checked, not detected
    with pytest.raises(UserError, match=r"^data.train: pc.jsonl has no column 'text' \(columns: prompt, completion\)"):
        causal_lm.resolve_labels(c, datasets.Dataset.from_dict(cases["prompt_completion"]))
    with pytest.raises(UserError, match="data.format: 'chat' is not one of"):
        causal_lm.resolve_labels(config(format="chat"), datasets.Dataset.from_dict(cases["text"]))


def test_unknown_columns_are_one_line_naming_found_and_expected():
    c = config()
    c.data.train = "qa.jsonl"
    with pytest.raises(UserError) as e:
        causal_lm.resolve_labels(c, datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]}))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.train: qa.jsonl has columns question, answer;")
    assert all(w in msg for w in ("messages", "prompt+completion", "instruction+output", "text", "data.format"))


def test_messages_without_a_chat_template_is_a_user_error(tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    with pytest.raises(UserError, match="^data.train: the data is in chat format \\(messages\\) but the tokenizer has "
                                        "no chat template; set data.chat_template$"):
        featurize(rows, tok, config())
    f = featurize(rows, tok, config(chat_template=TEMPLATE))  # data.chat_template supplies one
    assert len(f) == 1


def test_prompt_completion_loss_is_exactly_the_completion_and_eos(tok):
    rows = [{"prompt": "What is the capital of France?", "completion": " Paris, of course."},
            {"prompt": "Count:", "completion": "one two three"}]
    f = featurize(rows, tok, config())
    got, b = masked_targets(f, tok)
    for r, row in enumerate(rows):
        assert got[r] == ids(tok, row["completion"]) + [tok.eos_token_id]
        n = f.lengths[r]  # the model sees tokenizer(prompt) + completion ids + EOS
        assert list(b["input_ids"][r][:n]) == tok(row["prompt"])["input_ids"] + got[r]
    assert f.prompts == [r["prompt"] for r in rows] and f.references == [r["completion"] for r in rows]
    on_prompt, _ = masked_targets(featurize(rows, tok, config(train_on_prompt=True)), tok)
    assert on_prompt[0] == tok(rows[0]["prompt"] + rows[0]["completion"])["input_ids"][1:] + [tok.eos_token_id]


def test_alpaca_uses_the_instruction_template_with_and_without_input(tok):
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": None, "output": "Hi!"}]
    f = featurize(rows, tok, config())
    got, _ = masked_targets(f, tok)
    for r, row in enumerate(rows):
        assert tok.decode(got[r]) == tok.decode(ids(tok, row["output"]) + [tok.eos_token_id])
    assert f.prompts[0] == causal_lm.ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.")
    assert f.prompts[2] == causal_lm.ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert f.prompts[1].endswith("### Input:\n2 and 3\n\n### Response:\n")
    # without an input column at all
    f = featurize([{"instruction": "Name a colour.", "output": "Blue."}], tok, config())
    assert f.prompts[0] == causal_lm.ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.")


def test_alpaca_with_a_chat_template_is_a_user_and_an_assistant_turn():
    tok = make_tokenizer(chat_template=TEMPLATE_EOS)
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "five"}]
    f = featurize(rows, tok, config())
    assert f.prompts == ["<|user|>\nAdd the numbers.\n\n2 and 3[SEP]\n<|assistant|>\n"]
    got, b = masked_targets(f, tok)
    # the template closes the turn with EOS: loss on "five [SEP]" and no second EOS
    assert got[0] == ids(tok, "five") + [tok.eos_token_id]
    assert list(b["input_ids"][0][:f.lengths[0]]).count(tok.eos_token_id) == 2


def test_text_puts_loss_on_every_token(tok):
    f = featurize([{"text": "the cat sat on the mat"}], tok, config())
    got, _ = masked_targets(f, tok)
    assert got[0] == ids(tok, "the cat sat on the mat") + [tok.eos_token_id]
    assert f.prompts == [""] and f.references == ["the cat sat on the mat"]
    f = featurize([{"text": "[CLS] already rendered [SEP]"}], tok, config())  # BOS and EOS written in the text
    assert f.input_ids[0].tolist() == tok("already rendered")["input_ids"] + [tok.eos_token_id]


def test_multi_turn_messages_put_loss_on_exactly_the_assistant_turns():
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "hi friend"}, {"role": "user", "content": "bye now"},
            {"role": "assistant", "content": "see you later"}]
    for template, turn_end in ((TEMPLATE_EOS, True), (TEMPLATE, False)):
        tok = make_tokenizer(chat_template=template)
        f = featurize([{"messages": conv}], tok, config())
        _, b = masked_targets(f, tok)
        mask, targets = b["loss_mask"][0] > 0, b["targets"][0]
        runs = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
        want = [ids(tok, "hi friend") + ([tok.eos_token_id] if turn_end else []),
                ids(tok, "see you later") + [tok.eos_token_id]]  # EOS: the template's, or appended once
        assert [list(targets[r]) for r in runs] == want
        n = f.lengths[0]
        assert b["input_ids"][0][0] == tok.bos_token_id and list(b["input_ids"][0][:n]).count(tok.bos_token_id) == 1
        assert f.references == ["see you later"]
        assert f.prompts[0].endswith("<|user|>\nbye now" + ("[SEP]" if turn_end else "") + "\n<|assistant|>\n")
        on_prompt, _ = masked_targets(featurize([{"messages": conv}], tok, config(train_on_prompt=True)), tok)
        assert len(on_prompt[0]) == n - 1


def test_config_chat_template_overrides_the_tokenizers():
    tok = make_tokenizer(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    f = featurize([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}], tok,
                  config(chat_template=TEMPLATE_EOS))
    assert f.prompts == ["<|user|>\nhi[SEP]\n<|assistant|>\n"]


def test_eos_is_a_target_when_pad_equals_eos():
    tok = make_tokenizer(pad="[SEP]")
    assert tok.pad_token_id == tok.eos_token_id
    f = featurize([{"prompt": "a b", "completion": "c d"}, {"prompt": "x", "completion": "y"}], tok, config())
    got, b = masked_targets(f, tok)
    assert got[1] == ids(tok, "y") + [tok.eos_token_id]
    assert got[0][-1] == tok.eos_token_id
    assert (b["input_ids"][1][f.lengths[1]:] == tok.eos_token_id).all()  # padding, masked out
    assert b["loss_mask"][1][f.lengths[1] - 1:].sum() == 0


def test_truncation_is_counted_and_examples_without_loss_tokens_are_dropped(tok):
    long_prompt = " ".join(["word"] * 40)
    rows = [{"prompt": long_prompt, "completion": "answer"}, {"prompt": "short", "completion": "reply text"},
            {"prompt": "q " * 20, "completion": "cut answer here"}]
    c = config()
    c.max_length = 24
    f = featurize(rows, tok, c)
    assert f.num_truncated == 2 and f.num_empty == 1 and len(f) == 2 and f.num_examples == 2
    assert [list(r) for r in f.rows] == [[1], [2]]
    assert len(f.prompts) == 3  # per data set example, dropped ones included
    assert f.lengths.max() <= 24
    with pytest.raises(UserError, match="no example of rows has a loss token within max_length=24"):
        featurize(rows[:1], tok, c)


def test_pack_keeps_examples_whole_within_capacity_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=500)
    rows = pack(lengths, 256)
    assert sorted(np.concatenate(rows).tolist()) == list(range(500))
    assert all(lengths[r].sum() <= 256 for r in rows)
    assert len(rows) <= int(np.ceil(lengths.sum() / 256 * 1.05))  # near the lower bound
    assert [r.tolist() for r in pack(lengths, 256)] == [r.tolist() for r in rows]
    with pytest.raises(ValueError):
        pack([300], 256)


def test_segment_layout_and_targets_never_cross_a_segment():
    seg, pos = segment_layout([3, 2, 4])
    assert seg.tolist() == [1, 1, 1, 2, 2, 3, 3, 3, 3] and pos.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    row = np.arange(10, 20, dtype=np.int32)[None]
    segs = np.asarray([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0]], dtype=np.int32)
    targets, mask = next_token_targets(row, segs, np.ones_like(row))
    assert targets.tolist() == [[11, 12, 0, 14, 0, 16, 17, 18, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 1, 0, 1, 1, 1, 0, 0]]


def mixed_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta river stone cloud light quick slow green blue".split()
    return [{"instruction": " ".join(rng.choice(words, rng.integers(2, 12))),
             "output": " ".join(rng.choice(words, int(rng.choice([1, 4, 16, 60]))))} for _ in range(n)]


def test_packed_rows_hold_every_example_once_with_per_segment_positions(tok):
    rows = mixed_rows(120)
    plain = featurize(rows, tok, config())
    c = config(packing=True)
    f = featurize(rows, tok, c)
    assert len(f) < len(plain) and f.num_examples == len(rows) and f.lengths.max() <= c.max_length
    assert sorted(np.concatenate(f.rows).tolist()) == list(range(len(rows)))
    b = causal_lm.collate(f, np.arange(len(f)), len(f) + 2, [64, 128], tok.pad_token_id)
    assert b["input_ids"].shape == (len(f) + 2, 128) and not b["attention_mask"][len(f):].any()
    got, _ = masked_targets(plain, tok)
    for r, members in enumerate(f.rows):
        seg, n = b["segment_ids"][r], f.lengths[r]
        assert seg[:n].tolist() == np.repeat(np.arange(1, len(members) + 1), plain.lengths[members]).tolist()
        assert not seg[n:].any() and (b["attention_mask"][r] == (seg > 0)).all()
        for s, ex in enumerate(members, 1):
            at = np.flatnonzero(seg == s)
            assert b["positions"][r][at].tolist() == list(range(len(at)))
            assert b["input_ids"][r][at].tolist() == plain.input_ids[ex].tolist()
            assert b["targets"][r][at[-1]] == 0 and b["loss_mask"][r][at[-1]] == 0  # nothing across the boundary
            assert b["targets"][r][at][b["loss_mask"][r][at] > 0].tolist() == got[ex]
    assert b["weights"].sum() == b["loss_mask"].sum() == plain.num_loss_tokens == f.num_loss_tokens


def test_packing_needs_much_less_padding_on_mixed_lengths(tok):
    rows, c = mixed_rows(400, seed=1), config()
    c.max_length = 256
    buckets = default_buckets(256)
    plain = causal_lm.padding_share(featurize(rows, tok, c), 8, buckets)
    c.data.packing = True
    packed = causal_lm.padding_share(featurize(rows, tok, c), 8, buckets)
    assert packed < 0.1 and packed < plain / 2, (plain, packed)


def reference_nll(logits, batch, smoothing=0.0):
    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    nll = (1 - smoothing) * nll - smoothing * logp.mean(-1)
    return nll * batch["loss_mask"]


def test_loss_eval_outputs_and_metrics_match_numpy(tok):
    f = featurize(mixed_rows(20), tok, config(packing=True))
    idx = np.arange(len(f))
    b = causal_lm.collate(f, idx, len(f) + 1, [64, 128], tok.pad_token_id)
    logits = np.random.default_rng(0).normal(size=b["input_ids"].shape + (50,)).astype(np.float32) * 3
    b["targets"] = b["targets"] % 50  # a small vocabulary for the check
    for smoothing in (0.0, 0.1):
        c = config()
        c.label_smoothing = smoothing
        total, count = causal_lm.loss(logits, b, c)
        ref = reference_nll(logits, b, smoothing)
        np.testing.assert_allclose(float(total), ref.sum(), rtol=1e-5)
        assert float(count) == b["loss_mask"].sum()
    out = np.asarray(causal_lm.eval_outputs(logits, b))
    ref = reference_nll(logits, b)
    assert out.shape == (len(f) + 1, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], ref.sum(1), rtol=1e-5)
    np.testing.assert_array_equal(out[:, 1], b["loss_mask"].sum(1))
    m = causal_lm.compute_metrics(out[:len(f)], f, config())
    np.testing.assert_allclose(m["eval_loss"], ref.sum() / b["loss_mask"].sum(), rtol=1e-5)
    np.testing.assert_allclose(m["eval_perplexity"], np.exp(m["eval_loss"]), rtol=1e-12)


def test_forward_passes_positions_and_segments_and_metric_is_eval_loss(tok):
    b = causal_lm.collate(featurize(mixed_rows(5), tok, config(packing=True)), np.arange(1), 2, [128], 0)
    seen = {}

    def apply(params, input_ids, attention_mask, *, positions, segment_ids, rng):
        seen.update(positions=positions, segment_ids=segment_ids, mask=attention_mask, params=params)
        return np.zeros(input_ids.shape + (7,), np.float32)

    assert causal_lm.forward(apply, "P", b).shape == (2, 128, 7)
    assert seen["params"] == "P" and seen["positions"] is b["positions"] and seen["segment_ids"] is b["segment_ids"]
    assert causal_lm.checkpoint_metric(config()) == ("eval_loss", "min")


def test_render_prompt_wraps_a_raw_prompt_as_training_did(tok):
    assert causal_lm.render_prompt(tok, config(), "Name a colour.") == \
        causal_lm.ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.")
    assert causal_lm.render_prompt(tok, config(chat_template=TEMPLATE), "hi") == "[CLS]<|user|>\nhi\n<|assistant|>\n"
    # the template writes BOS itself, so it is not added a second time
    assert causal_lm.encode_prompt(tok, config(), "[CLS]<|user|>\nhi").count(tok.bos_token_id) == 1
    assert causal_lm.encode_prompt(tok, config(), "hi") == tok("hi")["input_ids"]


def test_shared_alpaca_demo_featurizes_and_packing_cuts_padding(tok):
    path = SHARED / "data" / "instruct" / "alpaca_en_demo.json"
    if not path.exists():
        pytest.skip("shared instruct data absent")
    rows = json.loads(path.read_text())
    shares = {}
    for packing in (False, True):
        c = config(packing=packing)
        c.max_length = 512
        f = featurize(rows, tok, c)
        assert c.data.format == "alpaca" and len(f.prompts) == len(rows) and f.lengths.max() <= 512
        shares[packing] = causal_lm.padding_share(f, 8, default_buckets(512))
        print(f"alpaca_en_demo packing={packing}: {len(rows)} examples → {len(f)} rows, {f.num_truncated} cut, "
              f"{f.num_empty} dropped, padding {100 * shares[packing]:.1f}% (batch 8, buckets {default_buckets(512)})")
    assert shares[True] < shares[False]
