"""Every config in configs/ runs end to end through the CLI in its offline form (a tiny local checkpoint and
small files shaped like the data set it names): run → evaluate. classify.py: the Quick start test (test_train.py);
translate.py, translate_llm.py: test_translate.py; sft.py: test_sft.py."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_classifier, synthetic_rows
from test_train import run_cli


def glue_tsv(path, rows, header):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


@pytest.mark.slow  # two short runs + evaluations: ~60 s idle
@pytest.mark.parametrize("config", ["sst2", "trec"])
def test_classification_configs_run_offline_on_their_data_format(config, tmp_path):
    rows = synthetic_rows(48, seed=1)
    if config == "sst2":  # GLUE SST-2: sentence<TAB>label with 0 / 1
        header, data = ("sentence", "label"), [(t, "1" if y == "positive" else "0") for t, y in rows]
        names = ["negative", "positive"]
    else:  # TREC: text<TAB>coarse<TAB>fine
        classes = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
        header = ("text", "coarse", "fine")
        data = [(t, classes[i % 6], f"{classes[i % 6].lower()}:x") for i, (t, _) in enumerate(rows)]
        names = classes
    train = glue_tsv(tmp_path / "train.tsv", data[:40], header)
    evals = glue_tsv(tmp_path / "dev.tsv", data[40:], header)
    model = make_tiny_classifier(tmp_path / "model", num_labels=len(names))
    w = tmp_path / "w"
    proc = run_cli("jaxsft.run", "--config", f"configs/{config}.py", "--workdir", w,
                   f"--config.model.name_or_path={model}", f"--config.data.train={train}",
                   f"--config.data.eval={evals}", "--config.max_steps=3", "--config.batch_size=8",
                   "--config.max_length=32")
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["step"] == 3 and 0.0 <= final["eval_accuracy"] <= 1.0
    assert json.loads((w / "config.json").read_text())["data"]["label_names"] == names
    result = json.loads(run_cli("jaxsft.evaluate", "--workdir", w).stdout.strip().splitlines()[-1])
    assert result["eval_accuracy"] == final["eval_accuracy"]
