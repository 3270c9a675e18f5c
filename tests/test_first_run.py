"""What a newcomer meets on a first run: no noise from libraries, jaxsft's own lines, damaged files named."""

from __future__ import annotations

import pytest
from test_bad_input import good_args, run_cli
from test_bad_input import models as models  # noqa: F401 - the tiny-model fixture

from jaxsft import hf_io
from jaxsft.errors import UserError


def test_a_truncated_safetensors_file_is_one_line_naming_it(models, tmp_path):  # noqa: F811
    folder = tmp_path / "m"
    folder.mkdir()
    for f in models["model"].iterdir():
        data = f.read_bytes()
        (folder / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    with pytest.raises(UserError, match=r"m/model.safetensors: not a readable safetensors file"):
        hf_io.WeightReader(folder)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        hf_io.WeightReader(folder)


def test_a_run_says_nothing_of_pytorch_and_names_the_new_head_itself(models, tmp_path):  # noqa: F811
    train = tmp_path / "t.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"a {w} film\t{lab}\n" for w, lab in
                                                   [("good", "positive"), ("bad", "negative")] * 4))
    head_less = tmp_path / "base"  # the checkpoint without its classifier: the head is new
    head_less.mkdir()
    from safetensors.numpy import load_file, save_file

    for f in models["model"].iterdir():
        if f.name == "model.safetensors":
            save_file({k: v for k, v in load_file(f).items() if not k.startswith("classifier")},
                      head_less / f.name, metadata={"format": "pt"})
        else:
            (head_less / f.name).write_bytes(f.read_bytes())
    r = run_cli(good_args({"model": head_less, "good": train}, tmp_path / "w"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "PyTorch was not found" not in r.stderr
    assert "Some weights of" not in r.stderr
    line = next(x for x in r.stderr.splitlines() if "new weights, randomly initialised" in x)
    assert "classifier" in line, line
