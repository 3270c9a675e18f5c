"""`data.train` / `data.eval` as `tfds:NAME[:SPLIT]`: a prepared TensorFlow Datasets split read through
`tfds.data_source` (ArrayRecord, random access, no TensorFlow), from `data.tfds_data_dir`.

The data set is built here with a `GeneratorBasedBuilder` (file_format="array_record") into a tmp data_dir and
kept out of TFDS's registry, so every read below goes through the prepared files alone, as in a fresh process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import synthetic_rows

from jaxsft.errors import UserError

NAME = "jaxsft_tiny_sentiment"


def _rows(n: int, seed: int) -> list[tuple[str, int]]:
    return [(text, int(label == "positive")) for text, label in synthetic_rows(n, seed)]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> Path:
    """A data_dir holding NAME (train 24 rows, test 8; `sentence` Text, `label` ClassLabel) in ArrayRecord."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    data_dir = tmp_path_factory.mktemp("tfds")

    with tfds.core.registered.skip_registration():  # not registered: readers must find it from the files

        class JaxsftTinySentiment(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "sentence": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=["negative", "positive"])}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(_rows(24, 1)), "test": self._generate_examples(_rows(8, 2))}

            def _generate_examples(self, rows):
                for i, (text, label) in enumerate(rows):
                    yield i, {"sentence": text, "label": label}

    builder = JaxsftTinySentiment(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    assert NAME not in tfds.list_builders(with_community_datasets=False)
    assert list((data_dir / NAME / "1.0.0").glob("*.array_record*")), "no ArrayRecord files were written"
    return data_dir


def test_tfds_spec_reads_the_split_as_the_other_sources_do(tfds_dir):
    import datasets

    from jaxsft.data.sources import load_source

    ds = load_source(f"tfds:{NAME}:train", "data.train", tfds_data_dir=str(tfds_dir))
    assert isinstance(ds, datasets.Dataset) and len(ds) == 24
    assert sorted(ds.column_names) == ["label", "sentence"]
    assert sorted(zip(ds["sentence"], ds["label"])) == sorted(_rows(24, 1))  # str texts, int labels
    assert ds.features["label"].names == ["negative", "positive"]  # the ClassLabel's names travel with the ids
    assert len(load_source(f"tfds:{NAME}:test", "data.eval", tfds_data_dir=str(tfds_dir))) == 8
    assert len(load_source(f"tfds:{NAME}:train[:25%]", "data.train", tfds_data_dir=str(tfds_dir))) == 6
    assert len(load_source(f"tfds:{NAME}", "data.train", tfds_data_dir=str(tfds_dir))) == 24  # default: train
    assert len(load_source(f"tfds:{NAME}:1.0.0:test", "data.eval", tfds_data_dir=str(tfds_dir))) == 8  # versioned


@pytest.mark.parametrize("spec, want", [(f"tfds:{NAME}:validation", ("data.eval", "'validation'", "Unknown split")),
                                        ("tfds:no_such_set:train", ("data.eval", "'no_such_set'", "not found")),
                                        ("tfds:", ("data.eval", "give a TFDS name"))])
def test_tfds_bad_spec_is_one_line_naming_it(spec, want, tfds_dir):
    from jaxsft.data.sources import load_source

    with pytest.raises(UserError) as e:
        load_source(spec, "data.eval", tfds_data_dir=str(tfds_dir))
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in want), msg


def test_without_tfds_installed_the_run_exits_2_naming_the_extra(tmp_path, tiny_bert, capsys, monkeypatch):
    """Runs with or without tensorflow-datasets installed: it is hidden from the import system."""
    from test_bad_input import run_in_process

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import tensorflow_datasets` → ImportError
    workdir = tmp_path / "w"
    r = run_in_process(["--config", "configs/classify.py", "--workdir", str(workdir),
                        f"--config.model.name_or_path={tiny_bert}", f"--config.data.train=tfds:{NAME}:train",
                        "--config.data.eval=", "--config.max_steps=2", "--config.batch_size=4"], capsys, monkeypatch)
    assert r.returncode == 2, r.stderr[-3000:]
    line = r.stderr.splitlines()[-1]
    assert line.startswith("error: data.train:") and "jaxsft[tfds]" in line and "tensorflow_datasets" in line, line
    assert "Traceback" not in r.stderr and not workdir.exists()


@pytest.mark.slow
def test_cli_trains_on_a_tfds_split(tfds_dir, tiny_bert, tmp_path):
    """`python -m jaxsft.run` on tfds:NAME:train / tfds:NAME:test for 2 steps: it trains and evaluates."""
    from test_bad_input import run_cli

    workdir = tmp_path / "w"
    r = run_cli(["--config", "configs/classify.py", "--workdir", str(workdir),
                 f"--config.model.name_or_path={tiny_bert}", f"--config.data.train=tfds:{NAME}:train",
                 f"--config.data.eval=tfds:{NAME}:test", f"--config.data.tfds_data_dir={tfds_dir}",
                 "--config.max_steps=2", "--config.batch_size=8",
                 "--config.max_length=32"])
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"data.train: tfds:{NAME}:train: 24 rows" in r.stderr
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert final["step"] == 2 and 0.0 <= final["eval_accuracy"] <= 1.0
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["train"] == f"tfds:{NAME}:train" and saved["data"]["tfds_data_dir"] == str(tfds_dir)
    # ClassLabel ids index configs/classify.py's label_names, as integer labels of any source do
    assert saved["data"]["label_names"] == ["negative", "positive"] and saved["model"]["num_labels"] == 2
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e] == [2] and any("eval_accuracy" in e for e in events)
