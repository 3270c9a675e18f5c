"""Data specs, label rules, length buckets, batch order, config overrides, and the shipped sentiment set."""

from __future__ import annotations

import csv
import re
from importlib import resources

import numpy as np
import pytest
from conftest import write_tsv

from jaxsft import config as config_lib
from jaxsft import pipeline
from jaxsft.data.batching import BatchPlan, bucket_for, choose_buckets, default_buckets
from jaxsft.data.sources import load_source
from jaxsft.defaults import base_config
from jaxsft.errors import UserError
from jaxsft.tasks import classification


def read_split(name):
    path = resources.files("jaxsft") / "resources" / "sentiment" / f"{name}.tsv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0] == ["sentence", "label"]
    return rows[1:]


def norm(s):
    return re.sub(r"[^a-z0-9 ]", "", s.lower()).strip()


def test_shipped_sentiment_set_is_large_balanced_and_has_disjoint_splits():
    train, evals = read_split("train"), read_split("eval")
    assert len(train) >= 300 and len(evals) >= 100
    for rows in (train, evals):
        assert all(len(r) == 2 and r[1] in ("positive", "negative") for r in rows)
        share = sum(r[1] == "positive" for r in rows) / len(rows)
        assert 0.4 <= share <= 0.6
        assert len({norm(r[0]) for r in rows}) == len(rows)  # no duplicates within a split
    assert not {norm(r[0]) for r in train} & {norm(r[0]) for r in evals}
    lengths = [len(r[0].split()) for r in train]
    assert min(lengths) <= 4 and max(lengths) >= 30  # varied length
    assert len({w.lower() for r in train for w in r[0].split()}) > 1000  # varied vocabulary


def test_tsv_is_read_without_quote_processing(tmp_path):
    f = write_tsv(tmp_path / "q.tsv", [('he said "wow', 1), ('NA', 0), ('"quoted" start', 1)])
    ds = load_source(str(f), "data.train")
    assert ds["sentence"] == ['he said "wow', "NA", '"quoted" start']


def test_jsonl_and_csv_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"sentence": "x y", "label": "a"}\n{"sentence": "z", "label": "b"}\n')
    (tmp_path / "a.csv").write_text('sentence,label\n"x, y",a\nz,b\n')
    assert load_source(str(tmp_path / "a.jsonl"), "data.train")["label"] == ["a", "b"]
    assert load_source(str(tmp_path / "a.csv"), "data.train")["sentence"] == ["x, y", "z"]


def _labels(values, label_names=None, num_labels=None):
    import datasets

    c = base_config()
    c.data.label_names = label_names
    c.model.num_labels = num_labels
    ds = datasets.Dataset.from_dict({"sentence": ["s"] * len(values), "label": values})
    classification.resolve_labels(c, ds)
    return c


def test_label_rules():
    c = _labels([0, 2, 1, 0])  # integers 0..K-1 are used as they are
    assert c.data.label_names == [0, 1, 2] and c.model.num_labels == 3
    c = _labels([3, 7, 3])  # other values are sorted and numbered
    assert c.data.label_names == [3, 7]
    np.testing.assert_array_equal(classification.label_ids([7, 3], c, "data.eval"), [1, 0])
    c = _labels(["pos", "neg", "pos"])
    assert c.data.label_names == ["neg", "pos"]
    c = _labels([1, 0], label_names=["negative", "positive"])  # ints index into label_names
    np.testing.assert_array_equal(classification.label_ids([1, 0], c, "data.eval"), [1, 0])
    c = _labels(["positive", "negative"], label_names=["negative", "positive"])
    with pytest.raises(UserError, match="'neutral'"):
        classification.label_ids(["neutral"], c, "data.eval")
    c = _labels([1, 0], label_names=["negative", "positive"])
    with pytest.raises(UserError, match="outside 0..1"):
        classification.label_ids([2], c, "data.train")
    c = _labels([0.5, 1.0, 3.25], num_labels=1)
    assert c.data.label_names is None and c.model.num_labels == 1


def test_buckets_are_powers_of_two_up_to_max_length():
    assert default_buckets(128) == [16, 32, 64, 128]
    assert default_buckets(100) == [16, 32, 64, 100]
    assert bucket_for(17, [16, 32]) == 32 and bucket_for(5, [16, 32]) == 16


def test_chosen_buckets_pad_least_of_all_bucket_sets_of_that_size():
    """choose_buckets against brute force: no other set of at most k multiples of 8 (covering the longest batch)
    pads these batches less; and the run's buckets come from it unless data.buckets is set."""
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(200):
        longest = rng.integers(1, 130, rng.integers(1, 30))
        k, max_length = int(rng.integers(1, 6)), int(rng.choice([64, 100, 128]))
        got = choose_buckets(longest, k, max_length)
        rounded = np.minimum(-(-longest // 8) * 8, max_length)
        values = sorted(set(rounded.tolist()))

        def padded(b, longest=longest):
            return sum(bucket_for(int(n), b) for n in longest)

        best = min(padded(list(c)) for n in range(1, k + 1) for c in itertools.combinations(values, n)
                   if c[-1] == values[-1])
        assert len(got) <= k and all(b % 8 == 0 or b == max_length for b in got)
        assert got[-1] >= min(longest.max(), max_length)
        assert padded(got) == best, (longest, k, got)
    c = base_config()
    c.max_length = 64
    assert pipeline.buckets(c, [9, 9, 20, 33, 40]) == choose_buckets([9, 9, 20, 33, 40], c.data.num_buckets, 64)
    c.data.buckets = [24]
    assert pipeline.buckets(c, [9, 9, 20, 33, 40]) == [24, 64]
    c.data.buckets, c.data.num_buckets = None, 0
    assert pipeline.buckets(c, [9, 40]) == default_buckets(64)


def test_batch_order_is_a_function_of_seed_and_epoch_and_covers_every_example():
    lengths = np.random.RandomState(0).randint(1, 100, 103)
    plan = BatchPlan(lengths, 8, seed=3, shuffle=True)
    e0, e0_again, e1 = plan.epoch(0), BatchPlan(lengths, 8, seed=3, shuffle=True).epoch(0), plan.epoch(1)
    assert all(np.array_equal(a, b) for a, b in zip(e0, e0_again))
    assert not all(np.array_equal(a, b) for a, b in zip(e0, e1))
    assert sorted(np.concatenate(e0).tolist()) == list(range(103)) and len(e0) == plan.num_batches == 13


def test_overrides_parse_by_type_and_reject_unknown_keys():
    c = base_config()
    config_lib.apply_override(c, "data.text_fields", "sentence1,sentence2")
    config_lib.apply_override(c, "batch_size", "8")
    config_lib.apply_override(c, "learning_rate", "3e-5")
    config_lib.apply_override(c, "model.num_labels", "4")
    config_lib.apply_override(c, "data.label_names", "a,b")
    assert c.data.text_fields == ["sentence1", "sentence2"] and c.batch_size == 8 and c.learning_rate == 3e-5
    assert c.model.num_labels == 4 and c.data.label_names == ["a", "b"]
    with pytest.raises(UserError, match="config.data.no_such_key"):
        config_lib.apply_override(c, "data.no_such_key", "1")
    with pytest.raises(UserError, match="config.batch_size"):
        config_lib.apply_override(c, "batch_size", "abc")


@pytest.mark.parametrize("config_file", ["classify", "sst2", "trec"])
def test_configs_load_and_start_with_their_command(config_file):
    from conftest import ROOT

    path = ROOT / "configs" / f"{config_file}.py"
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# COMMAND: python -m jaxsft.run --config configs/{config_file}.py")
    c = config_lib.load_config_file(str(path))
    assert c.num_epochs >= 1 and c.max_steps == -1
