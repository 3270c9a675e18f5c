"""Config values are checked for meaning before anything loads or is written; `None` clears a placeholder key;
list items get their key's type; `--help` and `--list-keys` need no --config.

Most cases call the parse / check functions in-process (config.apply_override, config.check_values,
config.check_positions); three run `python -m jaxsft.run` as a subprocess to prove exit 2, one `error:` line (the
traceback too with --verbose) and an untouched workdir; one runs the CLI in-process up to the model's config.json.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
from test_bad_input import ROOT, good_args, run_cli, run_in_process
from test_bad_input import models as models  # noqa: F401 - the tiny-BERT fixture (max_position_embeddings 512)

from jaxsft import config as config_lib
from jaxsft import defaults
from jaxsft.errors import UserError


def classify(*overrides: tuple[str, str]):
    """configs/classify.py (label_names set, max_length 64) with `--config.KEY=VALUE` overrides applied."""
    c = config_lib.load_config_file(str(ROOT / "configs" / "classify.py"))
    for key, text in overrides:
        config_lib.apply_override(c, key, text)
    return c


# --- `None` and list items -------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["data.label_names", "data.buckets", "eval_batch_size", "model.num_labels",
                                 "data.format", "decode.early_stopping", "decode.length_penalty",
                                 "checkpoint_metric", "data.max_target_length"])
@pytest.mark.parametrize("word", ["None", "none", "null"])
def test_none_clears_every_placeholder_key(key, word):
    c = classify()
    first = {"data.format": "text", "checkpoint_metric": "eval_loss", "decode.early_stopping": "true"}
    config_lib.apply_override(c, key, first.get(key, "2"))
    config_lib.apply_override(c, key, word)
    group, _, name = key.rpartition(".")
    assert (c[group] if group else c)[name] is None
    config_lib.check_values(c)


def test_every_placeholder_key_in_defaults_takes_none():
    """Every key whose default is None, set and cleared from the command line."""
    flat = config_lib._flat(defaults.base_config().to_dict())
    placeholders = [k for k, v in flat.items() if v is None]
    assert len(placeholders) >= 10
    for key in placeholders:
        c = defaults.base_config()
        config_lib.apply_override(c, key, "None")
        assert config_lib._flat(c.to_dict())[key] is None, key


def test_none_on_a_key_that_needs_a_value_is_refused():
    with pytest.raises(UserError, match=r"^config\.max_length: expected an integer, got 'None'$"):
        classify(("max_length", "None"))


def test_none_on_a_key_left_none_in_a_workdir_config_json(tmp_path):
    """A workdir's config.json has no placeholders; None values take their type from defaults.py."""
    path = tmp_path / "config.json"
    path.write_text(config_lib.to_json(defaults.base_config()))
    c = config_lib.from_json_file(path)
    config_lib.apply_override(c, "data.buckets", "32,64")
    assert c.data.buckets == [32, 64]
    config_lib.apply_override(c, "data.buckets", "None")
    assert c.data.buckets is None


@pytest.mark.parametrize("key, text, want", [
    ("data.buckets", "32", [32]),
    ("data.buckets", "32,64", [32, 64]),
    ("data.buckets", "[32, 64]", [32, 64]),
    ("data.buckets", "['32']", [32]),
    ("data.text_fields", "sentence1,sentence2", ["sentence1", "sentence2"]),
    ("data.label_names", "neg,pos", ["neg", "pos"]),
    ("data.label_names", "[0, 1]", [0, 1]),
    ("lora.target_modules", "[q_proj, v_proj]", ["q_proj", "v_proj"]),  # unquoted names in brackets
    ("data.label_names", "[]", []),  # empty: the labels are inferred, as before
])
def test_list_items_get_their_keys_type(key, text, want):
    c = classify((key, text))
    group, _, name = key.rpartition(".")
    assert c[group][name] == want and [type(v) for v in c[group][name]] == [type(v) for v in want]


@pytest.mark.parametrize("key, text, line", [
    ("data.buckets", "32,abc", "config.data.buckets: item 'abc' is not an integer (from '32,abc')"),
    ("data.buckets", "[32, 40.5]", "config.data.buckets: item 40.5 is not an integer (from '[32, 40.5]')"),
    ("data.text_fields", "[1]", "config.data.text_fields: item 1 is not a string (from '[1]')"),
    ("data.label_names", "[1.5, 2]",
     "config.data.label_names: item 1.5 is not a string or an integer (from '[1.5, 2]')"),
])
def test_a_bad_list_item_is_one_line_naming_key_and_item(key, text, line):
    with pytest.raises(UserError) as e:
        classify((key, text))
    assert str(e.value) == line


# --- values without a meaning ------------------------------------------------------------------------------------

BAD_VALUES = [
    ("data.label_names", "neg,pos,neg", "config.data.label_names: 'neg' appears more than once in "
                                        "['neg', 'pos', 'neg']"),
    ("data.label_names", "pos", "config.data.label_names: one name ('pos'); classification needs at least two "
                                "(model.num_labels=1 for regression)"),
    ("eval_batch_size", "0", "config.eval_batch_size must be >= 1, got 0 (None: batch_size)"),
    ("warmup_ratio", "1.5", "config.warmup_ratio must be in [0, 1], got 1.5 (a share of the run's steps; above 1 "
                            "the peak rate is never reached)"),
    ("warmup_ratio", "-0.1", "config.warmup_ratio must be in [0, 1], got -0.1 (a share of the run's steps; above 1 "
                             "the peak rate is never reached)"),
    ("max_length", "1", "config.max_length must be >= 8, got 1 (tokens per row, special tokens included)"),
    ("max_length", "7", "config.max_length must be >= 8, got 7 (tokens per row, special tokens included)"),
    ("batch_size", "0", "config.batch_size must be >= 1, got 0"),
    ("batch_size", "-4", "config.batch_size must be >= 1, got -4"),
    ("num_epochs", "-1", "config.num_epochs must be >= 0, got -1"),
    ("learning_rate", "0", "config.learning_rate must be > 0, got 0.0"),
    ("learning_rate", "nan", "config.learning_rate must be > 0, got nan"),
    ("keep_checkpoints", "0", "config.keep_checkpoints must be >= 1, got 0 (the best is kept as well)"),
    ("gradient_accumulation_steps", "0", "config.gradient_accumulation_steps must be >= 1, got 0 "
                                         "(1: no accumulation)"),
    ("label_smoothing", "1", "config.label_smoothing must be in [0, 1), got 1.0"),
    ("label_smoothing", "-0.1", "config.label_smoothing must be in [0, 1), got -0.1"),
    ("data.num_buckets", "-1", "config.data.num_buckets must be >= 0, got -1 (0: powers of two up to max_length)"),
    ("lora.rank", "-1", "config.lora.rank must be >= 0, got -1 (0: off)"),
    ("lora.alpha", "0", "config.lora.alpha must be > 0, got 0.0"),
    ("lora.dropout", "1", "config.lora.dropout must be in [0, 1), got 1.0"),
    ("log_every_steps", "0", "config.log_every_steps must be >= 1, got 0"),
    ("weight_decay", "-0.01", "config.weight_decay must be >= 0, got -0.01"),
    ("max_grad_norm", "-1", "config.max_grad_norm must be >= 0, got -1.0 (0: no clipping)"),
    ("adam_beta1", "1", "config.adam_beta1 must be in [0, 1), got 1.0"),
    ("adam_beta2", "1.5", "config.adam_beta2 must be in [0, 1), got 1.5"),
    ("adam_epsilon", "0", "config.adam_epsilon must be > 0, got 0.0"),
    ("warmup_steps", "-5", "config.warmup_steps must be >= 0, got -5"),
    ("chunked_loss_size", "-1", "config.chunked_loss_size must be >= 0, got -1 (0: all at once)"),
    ("data.eval_fraction", "1", "config.data.eval_fraction must be in [0, 1), got 1.0 (the share of data.train "
                                "held out)"),
    ("model.num_labels", "0", "config.model.num_labels must be >= 1, got 0 (1: regression)"),
    ("data.max_target_length", "1", "config.data.max_target_length must be >= 2, got 1 (a target token and EOS)"),
    ("decode.num_beams", "0", "config.decode.num_beams must be >= 1, got 0 (1: greedy)"),
    ("decode.max_new_tokens", "0", "config.decode.max_new_tokens must be >= 1, got 0"),
    ("seed", "-1", "config.seed must be >= 0, got -1"),
    ("data.buckets", "16,1024", "config.data.buckets: 1024 is outside [1, 64] (a padded length: rows are cut at "
                                "max_length=64, so no batch is longer)"),
    ("data.buckets", "0,32", "config.data.buckets: 0 is outside [1, 64] (a padded length: rows are cut at "
                             "max_length=64, so no batch is longer)"),
    ("data.buckets", "32,32", "config.data.buckets: 32 appears more than once in [32, 32]"),
    ("data.text_fields", "a,b,c", "config.data.text_fields: one field, or two for sentence pairs; got "
                                  "['a', 'b', 'c']"),
    ("lora.target_modules", "q_proj(", "config.lora.target_modules: 'q_proj(' is not a regular expression "
                                       "(missing ), unterminated subpattern at position 6)"),
]


@pytest.mark.parametrize("key, text, line", BAD_VALUES, ids=[f"{k}={t}" for k, t, _ in BAD_VALUES])
def test_a_value_without_a_meaning_is_one_line(key, text, line):
    c = classify((key, text))
    with pytest.raises(UserError) as e:
        config_lib.check_values(c)
    assert str(e.value) == line


def test_every_range_in_the_table_names_a_key_of_defaults():
    flat = config_lib._flat(defaults.base_config().to_dict())
    assert set(defaults.RANGES) <= set(flat) and set(defaults.ITEMS) <= set(flat)
    for key, (spec, _) in defaults.RANGES.items():  # every default (placeholders aside) is allowed
        assert flat[key] is None or config_lib._within(flat[key], spec), key


def test_the_shipped_configs_and_edges_of_the_ranges_pass():
    for path in sorted((ROOT / "configs").glob("*.py")):
        config_lib.check_values(config_lib.load_config_file(str(path)))
    config_lib.check_values(classify(("max_length", "8"), ("data.buckets", "8")))
    config_lib.check_values(classify(("warmup_ratio", "1"), ("data.buckets", "8,64"),
                                      ("max_steps", "0"), ("num_epochs", "1"), ("label_smoothing", "0.99"),
                                      ("max_grad_norm", "0"), ("data.label_names", "None")))


def test_no_steps_and_no_epochs_names_both():
    with pytest.raises(UserError, match=r"config\.max_steps \(0\) and config\.num_epochs \(0\)"):
        config_lib.check_values(classify(("max_steps", "0"), ("num_epochs", "0")))


def test_buckets_may_reach_a_seq2seq_max_target_length():
    c = classify(("task", "seq2seq"), ("data.max_target_length", "128"), ("data.buckets", "32,128"))
    config_lib.check_values(c)


@pytest.mark.parametrize("body, want", [
    ("def get_config():\n    return 3\n",
     "--config: {path}: get_config() returned int 3, not an ml_collections.ConfigDict (start from "
     "jaxsft.defaults.base_config())"),
    ("def get_config():\n    return {'task': 'classification'}\n",
     "--config: {path}: get_config() returned dict {{'task': 'classification'}}, not an ml_collections.ConfigDict "
     "(start from jaxsft.defaults.base_config())"),
    ("def get_config():\n    return 1 / 0\n",
     "--config: {path}: get_config() failed: ZeroDivisionError: division by zero"),
])
def test_a_config_file_whose_get_config_returns_no_config_is_one_line(tmp_path, body, want):
    path = tmp_path / "cfg.py"
    path.write_text(body)
    with pytest.raises(UserError) as e:
        config_lib.load_config_file(str(path))
    assert str(e.value) == want.format(path=path)


def test_a_config_missing_or_adding_keys_is_refused():
    c = defaults.base_config()
    del c.data["buckets"]
    with pytest.raises(UserError, match=r"^config\.data\.buckets is missing: a config file starts from "):
        config_lib.check_values(c)
    c = defaults.base_config()
    c.model.name_or_path = "x"
    c.learning_rat = 1e-4  # a config file's typo: ConfigDict takes any new key
    with pytest.raises(UserError, match=r"^unknown config key: config\.learning_rat "):
        config_lib.check_values(c)


def test_a_config_file_value_of_the_wrong_type_or_none_is_refused():
    c = defaults.base_config()
    c.max_length = None
    with pytest.raises(UserError, match=r"^config\.max_length is None; it needs an integer \(default 128\)$"):
        config_lib.check_values(c)
    c = defaults.base_config()
    c.data.buckets = ["32"]
    with pytest.raises(UserError, match=r"^config\.data\.buckets: item '32' is not an integer$"):
        config_lib.check_values(c)


# --- max_length against the model's positions ---------------------------------------------------------------------

def _hf(kind: str, **kw):
    import transformers as tf

    return {"bert": tf.BertConfig, "roberta": tf.RobertaConfig, "gpt2": tf.GPT2Config, "llama": tf.LlamaConfig,
            "t5": tf.T5Config, "marian": tf.MarianConfig}[kind](**kw)


@pytest.mark.parametrize("kind, kw, overrides, line", [
    ("bert", {"max_position_embeddings": 512}, [("max_length", "100000")],
     "config.max_length=100000 exceeds the model's 512 positions (max_position_embeddings in config.json)"),
    ("gpt2", {"n_positions": 1024}, [("task", "causal_lm"), ("max_length", "2048")],
     "config.max_length=2048 exceeds the model's 1024 positions (n_positions in config.json)"),
    ("roberta", {"max_position_embeddings": 514, "pad_token_id": 1}, [("max_length", "513")],
     "config.max_length=513 exceeds the model's 512 positions (max_position_embeddings=514 in config.json, less 2 "
     "before the first position)"),
    ("marian", {"max_position_embeddings": 512}, [("task", "seq2seq"), ("data.max_target_length", "600")],
     "config.data.max_target_length=600 exceeds the model's 512 positions (max_position_embeddings in config.json)"),
])
def test_max_length_past_a_position_table_is_refused(kind, kw, overrides, line):
    c = classify(*overrides)
    with pytest.raises(UserError) as e:
        config_lib.check_positions(c, _hf(kind, **kw))
    assert str(e.value) == line


def test_positions_within_the_table_or_relative_pass_and_rotary_warns(caplog):
    config_lib.check_positions(classify(("max_length", "512")), _hf("bert", max_position_embeddings=512))
    config_lib.check_positions(classify(("max_length", "512")), _hf("roberta", max_position_embeddings=514,
                                                                    pad_token_id=1))
    config_lib.check_positions(classify(("task", "seq2seq"), ("max_length", "100000")), _hf("t5"))
    with caplog.at_level(logging.WARNING, logger="jaxsft"):
        config_lib.check_positions(classify(("task", "causal_lm"), ("max_length", "8192")),
                                   _hf("llama", max_position_embeddings=4096))
    assert any("config.max_length=8192 exceeds the model's 4096 positions" in r.getMessage()
               for r in caplog.records)


def test_max_length_past_the_tiny_berts_positions_writes_nothing(models, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Through the CLI (in-process): the check runs once config.json of the model is read, before any write."""
    workdir = tmp_path / "workdir"
    p = {"model": models["model"], "good": ROOT / "jaxsft" / "resources" / "sentiment" / "train.tsv"}
    r = run_in_process(good_args(p, workdir) + ["--config.max_length=100000"], capsys, monkeypatch)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1] == ("error: config.max_length=100000 exceeds the model's 512 positions "
                                         "(max_position_embeddings in config.json)")
    assert "Traceback" not in r.stderr and not workdir.exists()


# --- the CLI: exit 2, one line, nothing written; --help; --list-keys ----------------------------------------------

@pytest.mark.parametrize("extra, line", [
    (["--config.data.buckets=None", "--config.max_length=1"],
     "error: config.max_length must be >= 8, got 1 (tokens per row, special tokens included)"),
    (["--config.data.label_names=negative,positive,negative"],
     "error: config.data.label_names: 'negative' appears more than once in ['negative', 'positive', 'negative']"),
], ids=["max_length-1", "duplicate-label-names"])
def test_cli_refuses_a_meaningless_value_before_writing(tmp_path, extra, line):
    workdir = tmp_path / "workdir"
    r = run_cli(["--config", "configs/classify.py", "--workdir", str(workdir), *extra], timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.splitlines() == [line], r.stderr[-3000:]
    assert not workdir.exists()


def test_cli_with_verbose_exits_2_and_shows_the_traceback(tmp_path):
    workdir = tmp_path / "workdir"
    r = run_cli(["--config", "configs/classify.py", "--workdir", str(workdir), "--config.warmup_ratio=1.5",
                 "--verbose"], timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("error: config.warmup_ratio must be in [0, 1], got 1.5")
    assert not workdir.exists()


def test_help_needs_no_config_and_says_config_is_required():
    r = subprocess.run([sys.executable, "-m", "jaxsft.run", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m jaxsft.run --config FILE --workdir W")
    assert "--list-keys" in r.stdout and "required" in r.stdout and "--config.KEY=None" in r.stdout


def test_no_config_points_at_help(capsys, monkeypatch):
    r = run_in_process(["--workdir", "w"], capsys, monkeypatch)
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
        "error: --config FILE is required (--help: usage; --list-keys: every config key and its default)")


def test_list_keys_prints_every_key_default_and_comment(capsys, monkeypatch):
    r = run_in_process(["--list-keys"], capsys, monkeypatch)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    flat = config_lib._flat(defaults.base_config().to_dict())
    assert sorted(lines_keys(lines)) == sorted(flat)  # every key, once
    by_key = dict(zip(lines_keys(lines), lines, strict=True))
    assert re.fullmatch(r"max_length = 128 +# tokens per row .* \(allowed: >= 8\)", by_key["max_length"])
    assert by_key["data.num_buckets"].endswith("0: powers of two up to max_length (allowed: >= 0)")  # continued
    assert "# devices per axis; -1: the rest" in by_key["mesh.fsdp"]
    assert re.fullmatch(r"data\.label_names = None +# None: from the training labels; .*", by_key["data.label_names"])


def lines_keys(lines: list[str]) -> list[str]:
    return [line.split(" = ", 1)[0] for line in lines]


@pytest.mark.parametrize("overrides, line", [
    ([("model.remat", "some")], "config.model.remat must be one of none, dots, full, got 'some'"),
    ([("task", "causal_lm"), ("data.format", "chat")],
     "config.data.format must be one of messages, prompt_completion, alpaca, text, translation (None: detected from "
     "the columns), got 'chat'"),
])
def test_train_validate_refuses_unknown_choices(overrides, line):
    from jaxsft import train

    with pytest.raises(UserError) as e:
        train.validate(classify(*overrides))
    assert str(e.value) == line
