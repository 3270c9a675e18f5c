"""Training features each process tokenizes only a share of (jaxsft.data.sharded), simulated in one process: P
processes' scans of their slices, merged, must plan the same batches and collate the same arrays as the whole
split tokenized at once, for every task, while each process makes only the rows its devices hold."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import alpaca_rows, llm_tokenizer, minilm_path, parallel_rows, seq2seq_tokenizer, synthetic_rows
from test_causal_lm_data import TEMPLATE_EOS, make_tokenizer

from jaxsft import pipeline
from jaxsft.data import sharded
from jaxsft.data.batching import BatchPlan, choose_buckets
from jaxsft.defaults import base_config
from jaxsft.errors import UserError
from jaxsft.tasks import causal_lm, classification, seq2seq

datasets = pytest.importorskip("datasets")


def classify_case():
    from transformers import AutoTokenizer

    rows = [{"sentence": t, "label": y} for t, y in synthetic_rows(61, 3)]
    rows += rows[:4]  # duplicates, some across slices
    rows.append({"sentence": "", "label": "pos"})  # an empty text
    rows.append({"sentence": " ".join(["word"] * 80), "label": "neg"})  # cut at max_length
    c = base_config()
    c.max_length = 48
    return c, classification, datasets.Dataset.from_list(rows), AutoTokenizer.from_pretrained(minilm_path())


def causal_case(packing: bool, messages: bool):
    c = base_config()
    c.task, c.max_length = "causal_lm", 96
    c.data.packing = packing
    if messages:
        tok = make_tokenizer(chat_template=TEMPLATE_EOS)
        rows = [{"messages": [{"role": "user", "content": r["instruction"]},
                              {"role": "assistant", "content": r["output"]}]} for r in alpaca_rows(57, 1)]
        rows.insert(20, {"messages": [{"role": "user", "content": " ".join(["long"] * 120)},
                                      {"role": "assistant", "content": "x"}]})  # no loss token left
    else:
        tok = llm_tokenizer()
        rows = alpaca_rows(57, 2)
        rows += rows[:3]
        rows.append({"instruction": " ".join(["long"] * 120), "input": "", "output": "x"})  # no loss token left
    return c, causal_lm, datasets.Dataset.from_list(rows), tok


def seq2seq_case():
    from test_seq2seq_data import SEQ2SEQ_KEYS

    c = base_config()
    with c.unlocked():
        for k, v in SEQ2SEQ_KEYS.items():
            c.data[k] = v
    c.task, c.max_length = "seq2seq", 40
    rows = [{"source": s, "target": t} for s, t in parallel_rows(63, 4)]
    rows += rows[:2] + [{"source": "", "target": "leer"}, {"source": " ".join(["the"] * 60), "target": "die"}]
    return c, seq2seq, datasets.Dataset.from_list(rows), seq2seq_tokenizer()


CASES = {"classification": classify_case, "causal_lm": lambda: causal_case(False, False),
         "causal_lm_packed": lambda: causal_case(True, False), "causal_lm_chat": lambda: causal_case(False, True),
         "seq2seq": seq2seq_case}


def simulated(task, ds, tok, c, processes: int):
    """What every one of `processes` processes holds after the scan, merge and from_scan of featurize."""
    parts = [sharded.scan_part(task, ds, tok, c, "data.train", "rows", sharded.part_of(len(ds), processes, p))
             for p in range(processes)]
    return task.from_scan(sharded.merge(parts), ds, tok, c, "data.train", "rows")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("processes", [2, 3])
def test_each_process_share_plans_and_collates_what_the_whole_split_does(case, processes):
    c, task, ds, tok = CASES[case]()
    task.resolve_labels(c, ds)
    whole = task.featurize(ds, tok, c, "data.train", "rows", need_labels=True)
    lazy = simulated(task, ds, tok, c, processes)

    assert len(lazy) == len(whole)
    np.testing.assert_array_equal(lazy.lengths, whole.lengths)
    counts = [(f.num_empty, f.num_truncated, f.num_duplicates) for f in (lazy, whole)]
    assert counts[0] == counts[1] and all(counts[1]), counts  # each kind occurs in these rows
    if task is causal_lm:
        assert [list(r) for r in lazy.rows] == [list(r) for r in whole.rows]  # the same packing

    batch_size, pad = 8, tok.pad_token_id
    plan = BatchPlan(whole.lengths, batch_size, seed=5, shuffle=True)
    batches = plan.epoch(0) + plan.epoch(1)
    buckets = choose_buckets([whole.lengths[b].max() for b in plan.epoch(0)], 3, c.max_length)
    share = slice(4, 8)  # the second of two processes' rows
    for idx in batches:
        want = task.collate(whole, idx, batch_size, buckets, pad, rows=share)
        got = task.collate(lazy, idx, batch_size, buckets, pad, rows=share)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert task.batch_lengths(lazy, idx, buckets) == (want["input_ids"].shape[1],) + \
            ((want["labels"].shape[1],) if task is seq2seq else ())
    made = {int(i) for idx in batches for i in idx[share]}
    assert lazy.on_demand.built == len(made) < len(whole)  # only this process's rows, each made once


@pytest.mark.parametrize("case", sorted(CASES))
def test_fewer_rows_than_processes(case):
    c, task, ds, tok = CASES[case]()
    task.resolve_labels(c, ds)
    small = ds.select(range(2))
    whole = task.featurize(small, tok, c, "data.train", "rows", need_labels=True)
    lazy = simulated(task, small, tok, c, 4)  # two processes scan nothing
    np.testing.assert_array_equal(lazy.lengths, whole.lengths)
    idx = np.arange(len(whole))
    want = task.collate(whole, idx, 4, [c.max_length], tok.pad_token_id)
    got = task.collate(lazy, idx, 4, [c.max_length], tok.pad_token_id)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_a_bad_row_on_any_process_names_its_row_in_the_whole_data_set():
    c, task, ds, tok = classify_case()
    task.resolve_labels(c, ds)
    rows = ds.to_list()
    rows[50]["label"] = "neutral"  # not a label of the (already resolved) label set
    bad = datasets.Dataset.from_list(rows)
    with pytest.raises(UserError, match=r"label 'neutral' \(row 50\) is not in the label set"):
        simulated(task, bad, tok, c, 2)


def test_global_batches_find_each_shape_once_without_collating_every_batch():
    import jax
    from jax.sharding import Mesh

    c, task, ds, tok = classify_case()
    task.resolve_labels(c, ds)
    lazy = simulated(task, ds, tok, c, 2)
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    batches = BatchPlan(lazy.lengths, 8, seed=0, shuffle=True).epoch(0)
    make = pipeline.global_batches(task, lazy, 8, [16, 32, 48], tok.pad_token_id, mesh)
    shapes = {tuple(make.shapes(b)["input_ids"].shape) for b in batches}
    want = {(8, task.batch_lengths(lazy, b, [16, 32, 48])[0]) for b in batches}
    assert shapes == want and len(shapes) > 1
    assert lazy.on_demand.built <= 8 * len(shapes)  # one batch collated per shape, not all of them


def test_prefetch_makes_the_next_batches_rows_in_few_calls_and_the_batches_stay_the_same():
    c, task, ds, tok = seq2seq_case()
    task.resolve_labels(c, ds)
    whole = task.featurize(ds, tok, c, "data.train", "rows", need_labels=True)
    lazy = simulated(task, ds, tok, c, 2)
    calls = []
    build = lazy.on_demand.build
    lazy.on_demand.build = lambda idx: calls.append(len(idx)) or build(idx)
    batches, share = BatchPlan(whole.lengths, 8, seed=1, shuffle=True).epoch(0), slice(0, 4)
    for at, idx in enumerate(batches):
        sharded.prefetch(lazy.on_demand, batches, at, share, chunk=20)  # 5 batches' rows per call
        want = task.collate(whole, idx, 8, [16, 40], tok.pad_token_id, rows=share)
        got = task.collate(lazy, idx, 8, [16, 40], tok.pad_token_id, rows=share)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert len(calls) == -(-len(batches) // 5) and sum(calls) == len({int(i) for b in batches for i in b[share]})
