"""seq2seq task: line-aligned and field-based pairs, encoder/decoder batches, loss, BLEU/chrF, LLM prompt rows."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED, minilm_path, write_jsonl

from jaxsft.data.batching import BatchPlan, bucket_for, default_buckets
from jaxsft.data.sources import load_source
from jaxsft.defaults import base_config
from jaxsft.errors import UserError
from jaxsft.tasks import seq2seq

datasets = pytest.importorskip("datasets")
MULTI30K = SHARED / "data" / "multi30k"
SEQ2SEQ_KEYS = {"source_field": "source", "target_field": "target", "source_prefix": "", "max_target_length": None,
                "source_lang": "English", "target_lang": "German"}


@pytest.fixture(scope="module")
def tok():
    """A seq2seq-like tokenizer (EOS = [SEP] closes every text) from MiniLM's vocabulary, as make_tiny.py builds."""
    import transformers as tf
    from tokenizers import processors

    base = tf.AutoTokenizer.from_pretrained(minilm_path())
    bt = base.backend_tokenizer
    bt.post_processor = processors.TemplateProcessing(single="$A [SEP]", pair="$A [SEP] $B [SEP]",
                                                      special_tokens=[("[SEP]", base.sep_token_id)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=bt, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]",
                                      unk_token="[UNK]")


def config(max_length=64, **data):
    c = base_config()
    with c.unlocked():
        for k, v in SEQ2SEQ_KEYS.items():
            if k not in c.data:
                c.data[k] = v
    c.task, c.max_length = "seq2seq", max_length
    for k, v in data.items():
        c.data[k] = v
    return c


def featurize(ds, tok, c, need_labels=True):
    return seq2seq.featurize(ds, tok, c, "data.train", "rows", need_labels=need_labels)


def pairs(*rows):
    return datasets.Dataset.from_dict({"source": [r[0] for r in rows], "target": [r[1] for r in rows]})


def write_pair(tmp_path, src: str, tgt: str) -> str:
    (tmp_path / "a.en").write_text(src)
    (tmp_path / "a.de").write_text(tgt)
    return f"{tmp_path / 'a.en'},{tmp_path / 'a.de'}"


def test_line_aligned_files_load_as_pairs_with_blank_lines_kept_in_place(tmp_path):
    spec = write_pair(tmp_path, "a dog\n\nthe end\r\n", "ein hund\nleer\ndas ende\r\n")
    ds = load_source(spec, "data.train")
    assert ds["source"] == ["a dog", "", "the end"] and ds["target"] == ["ein hund", "leer", "das ende"]
    ds = load_source(spec, "data.train", source_field="en", target_field="de")
    assert ds.column_names == ["en", "de"] and ds["en"][0] == "a dog"
    (tmp_path / "u.en").write_text("one\u2028still one\n")  # only "\n" ends a line, as for wc -l
    (tmp_path / "u.de").write_text("eins\n")
    assert len(load_source(f"{tmp_path / 'u.en'},{tmp_path / 'u.de'}", "data.train")) == 1


def test_line_aligned_errors_name_the_files(tmp_path):
    spec = write_pair(tmp_path, "a\nb\nc\n", "x\ny\n")
    with pytest.raises(UserError, match=r"data\.train: .*a\.en has 3 lines but .*a\.de has 2"):
        load_source(spec, "data.train")
    with pytest.raises(UserError, match=r"data\.eval: file not found: .*missing\.de"):
        load_source(f"{tmp_path / 'a.en'},{tmp_path / 'missing.de'}", "data.eval")
    (tmp_path / "e.de").write_text("")
    with pytest.raises(UserError, match=r"e\.de is empty"):
        load_source(f"{tmp_path / 'a.en'},{tmp_path / 'e.de'}", "data.train")
    with pytest.raises(UserError, match="two line-aligned text files"):
        load_source(f"{tmp_path / 'a.en'},{tmp_path / 'a.de'},{tmp_path / 'a.de'}", "data.train")
    with pytest.raises(UserError, match=r"data\.train: unknown file format '\.en' .*SOURCE,TARGET"):
        load_source(str(tmp_path / "a.en"), "data.train")  # one text file is not a data set


def test_field_based_jsonl_and_missing_columns(tmp_path, tok):
    f = write_jsonl(tmp_path / "t.jsonl", [{"en": "a dog", "de": "ein hund"}, {"en": "a cat", "de": "eine katze"}])
    c = config(source_field="en", target_field="de", train=str(f))
    ds = load_source(str(f), "data.train")
    seq2seq.resolve_labels(c, ds)
    assert featurize(ds, tok, c).references == ["ein hund", "eine katze"]
    c.data.target_field = "target"
    with pytest.raises(UserError, match=r"no column 'target' .*set data\.target_field"):
        seq2seq.resolve_labels(c, ds)
    c.data.source_field = "text"
    with pytest.raises(UserError, match=r"no column 'text' .*set data\.source_field"):
        seq2seq.resolve_labels(c, ds)


def test_prefix_goes_to_the_encoder_input_only(tok):
    c = config(source_prefix="translate English to German: ")
    f = featurize(pairs(("a dog runs", "ein hund läuft")), tok, c)
    assert f.sources == ["a dog runs"] and f.references == ["ein hund läuft"]
    assert f.input_ids[0].tolist() == tok("translate English to German: a dog runs")["input_ids"]
    assert f.lengths[0] == len(f.input_ids[0])
    assert seq2seq.prompts_for_generation(f) == [f.input_ids[0].tolist()]


def test_labels_end_with_eos_and_decoder_inputs_are_labels_shifted_right(tok):
    c = config(max_target_length=5)
    c.model.decoder_start_token_id = 7  # as the loop copies it from the HF config
    f = featurize(pairs(("a dog", "ein hund"), ("a very long sentence here", "ein sehr langer satz hier jetzt")),
                  tok, c)
    eos = tok.eos_token_id
    assert all(x[-1] == eos for x in f.labels)
    assert f.labels[0].tolist() == tok(text_target="ein hund")["input_ids"]
    assert len(f.labels[1]) == 5 and f.num_truncated == 1  # cut at max_target_length, EOS kept
    b = seq2seq.collate(f, np.arange(2), 4, [8, 16], tok.pad_token_id)
    for r in range(2):
        n = len(f.labels[r])
        assert b["decoder_input_ids"][r, :n].tolist() == [7] + f.labels[r][:-1].tolist()
        assert b["labels"][r, :n].tolist() == f.labels[r].tolist()
        assert (b["labels"][r, n:] == 0).all() and (b["decoder_input_ids"][r, n:] == tok.pad_token_id).all()
    c.model.decoder_start_token_id = None  # unset: the tokenizer's pad id (T5's and Marian's start token)
    assert featurize(pairs(("a", "b")), tok, c).decoder_start_token_id == tok.pad_token_id


def test_masks_cover_exactly_the_real_tokens_and_padding_rows_are_empty(tok):
    c = config()
    f = featurize(pairs(("a dog", "ein hund"), ("three word source", "x"), ("", "")), tok, c)
    assert f.num_empty == 1 and f.labels[2].tolist() == [tok.eos_token_id]
    b = seq2seq.collate(f, np.arange(3), 5, [8, 16], tok.pad_token_id)
    assert b["input_ids"].shape == (5, 8) and b["labels"].shape == (5, 16)  # default target buckets start at 16
    for r in range(3):
        assert b["attention_mask"][r].tolist() == [1] * f.lengths[r] + [0] * (8 - f.lengths[r])
        n = f.target_lengths[r]
        assert b["loss_mask"][r].tolist() == [1.0] * n + [0.0] * (16 - n)
        assert b["decoder_attention_mask"][r].tolist() == [1] * n + [0] * (16 - n)
    assert b["loss_mask"].dtype == np.float32 and b["weights"].tolist() == [*f.target_lengths, 0, 0]
    for k in ("attention_mask", "decoder_attention_mask", "loss_mask"):
        assert not b[k][3:].any()


def test_target_less_data_gives_labels_none_and_start_token_decoder_inputs(tok):
    c = config()
    ds = datasets.Dataset.from_dict({"source": ["a dog", "a cat"]})
    with pytest.raises(UserError, match="data.target_field"):
        featurize(ds, tok, c)
    f = featurize(ds, tok, c, need_labels=False)
    assert f.labels is None and f.references is None
    b = seq2seq.collate(f, np.arange(2), 2, [8], tok.pad_token_id)
    assert b["decoder_input_ids"][:, 0].tolist() == [tok.pad_token_id] * 2 and b["loss_mask"].sum() == 0
    assert seq2seq.compute_metrics(np.zeros((2, 2)), f, c) == {}
    assert seq2seq.generation_metrics(["x", "y"], f, c) == {}


def test_target_buckets_follow_max_target_length():
    assert seq2seq.target_buckets(config(max_length=128)) == default_buckets(128)
    assert seq2seq.target_buckets(config(max_length=128, max_target_length=40)) == [16, 32, 40]
    assert seq2seq.target_buckets(config(max_length=128, max_target_length=40, buckets=[24, 64])) == [24, 40]


def test_an_epoch_of_multi30k_compiles_a_handful_of_shapes(tok):
    if not (MULTI30K / "train.en").is_file():
        pytest.skip("shared multi30k data absent")
    head = [MULTI30K / "train.en", MULTI30K / "train.de"]
    texts = [p.read_text(encoding="utf-8").split("\n")[:2000] for p in head]
    c = config(max_length=128)
    f = featurize(pairs(*zip(*texts)), tok, c)
    src_buckets = default_buckets(128)
    plan = BatchPlan(f.lengths, 32, seed=0, shuffle=True, group_by_length=True)
    shapes = set()
    for idx in plan.epoch(0):
        b = seq2seq.collate(f, idx, 32, src_buckets, tok.pad_token_id)
        shapes.add((b["input_ids"].shape, b["decoder_input_ids"].shape))
    used_src = {bucket_for(int(n), src_buckets) for n in f.lengths}
    used_tgt = {bucket_for(int(n), f.target_buckets) for n in f.target_lengths}
    assert len(shapes) <= min(len(used_src) * len(used_tgt), 12), shapes
    assert all(s[0] == 32 and t[0] == 32 for s, t in shapes)


def test_loss_and_eval_outputs_match_a_numpy_reference(tok):
    c = config()
    f = featurize(pairs(("a dog", "ein hund"), ("a cat sat", "eine katze sitzt da")), tok, c)
    b = seq2seq.collate(f, np.arange(2), 3, [8], tok.pad_token_id)
    logits = np.random.default_rng(0).normal(size=b["labels"].shape + (50,)).astype(np.float32)
    labels = np.minimum(b["labels"], 49)
    b["labels"] = labels
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0] * b["loss_mask"]
    total, count = seq2seq.loss(logits, b, c)
    np.testing.assert_allclose(float(total), nll.sum(), rtol=1e-5)
    assert float(count) == b["loss_mask"].sum() == b["weights"].sum()
    out = np.asarray(seq2seq.eval_outputs(logits, b))
    np.testing.assert_allclose(out[:, 0], nll.sum(-1), rtol=1e-5)
    assert out[:, 1].tolist() == b["weights"].tolist()
    m = seq2seq.compute_metrics(out, f, c)
    assert m["eval_loss"] == pytest.approx(nll.sum() / b["loss_mask"].sum(), rel=1e-5)
    c.label_smoothing = 0.1  # CE against 0.9 * one-hot + 0.1 / V
    smoothed = -(0.9 * np.take_along_axis(logp, labels[..., None], -1)[..., 0] + 0.1 * logp.mean(-1))
    np.testing.assert_allclose(float(seq2seq.loss(logits, b, c)[0]), (smoothed * b["loss_mask"]).sum(), rtol=1e-5)


def test_bleu_and_chrf_equal_sacrebleu_with_signatures(tok):
    sacrebleu = pytest.importorskip("sacrebleu")
    refs = ["Ein Hund läuft über die Wiese.", "Zwei Männer spielen Fußball im Park.", "Eine Frau liest ein Buch."]
    hyps = ["Ein Hund rennt über die Wiese.", "Zwei Männer spielen\nFußball.", "Eine Frau liest ein Buch."]
    f = featurize(pairs(*zip(["x"] * 3, refs)), tok, config())
    m = seq2seq.generation_metrics(hyps, f, config(), token_lengths=[7, 5, 6])
    flat = [h.replace("\n", " ") for h in hyps]
    assert m["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(flat, [refs]).score)
    assert m["eval_chrf"] == pytest.approx(sacrebleu.corpus_chrf(flat, [refs]).score)
    assert 0 < m["eval_bleu"] < 100 and m["eval_gen_len"] == 6.0
    assert m["eval_bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert m["eval_chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    assert seq2seq.prediction_lines(["a\nb", "c\r\nd", "e"]) == ["a b", "c d", "e"]
    assert seq2seq.checkpoint_metric(config()) == ("eval_bleu", "max")


def test_instruction_rows_name_the_languages():
    c = config(source_lang="English", target_lang="French")
    rows = seq2seq.to_instruction_rows(pairs(("a dog", "un chien")), c)
    assert rows[0] == {"prompt": "Translate from English to French:\na dog\n", "completion": "un chien"}
    assert seq2seq.LLM_PROMPT.format(source_lang="A", target_lang="B", source="s") == "Translate from A to B:\ns\n"
    only = seq2seq.to_instruction_rows(datasets.Dataset.from_dict({"source": ["a dog"]}), c)
    assert only.column_names == ["prompt"]
