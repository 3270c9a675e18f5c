"""`python -m jaxsft.aot`: the real train step compiled for a TPU topology by libtpu on this CPU host (tiny models,
the smallest slices), the one-line verdict of a run that does not fit, and the one line without libtpu."""

from __future__ import annotations

import sys

import pytest

from jaxsft import aot
from jaxsft.errors import run_cli

pytestmark = pytest.mark.tpu_aot


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Local folders holding only the config.json of tiny llama / bert / t5 models, and of a llama too big for HBM."""
    import transformers as tf

    root = tmp_path_factory.mktemp("aot_configs")
    configs = {
        "llama": tf.LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2),
        "bert": tf.BertConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_labels=3),
        "t5": tf.T5Config(vocab_size=1024, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        # 2 x 256000 x 8192 embeddings alone: 4.2e9 float32 parameters + AdamW state, 63 GiB per chip replicated
        "huge": tf.LlamaConfig(vocab_size=256000, hidden_size=8192, intermediate_size=256, num_hidden_layers=1,
                               num_attention_heads=64, num_key_value_heads=8),
    }
    for name, cfg in configs.items():
        cfg.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def libtpu():
    pytest.importorskip("libtpu", reason='the TPU compiler: pip install -e ".[aot]"')


def run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        run_cli(aot.main, argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def load(config_file: str, **overrides):
    from jaxsft.config import apply_override, load_config_file

    config = load_config_file(config_file)
    for k, v in overrides.items():
        apply_override(config, k, str(v))
    return config


def test_llama_packed_sft_compiles_and_reports(folders, libtpu, capsys):
    argv = ["--config", "configs/sft.py", "--topology", "v5e-4", f"--config.model.name_or_path={folders / 'llama'}",
            "--config.batch_size=8", "--config.max_length=128"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "v5e-4: 4 x TPU v5e (1 host)" in out
    assert "parameters + optimizer state" in out and "of 15.75 GiB HBM (fits" in out
    assert "FLOPs per chip per step" in out and "all-reduce" in out
    assert "estimated step time (not a measurement" in out and "tokens/s" in out


@pytest.mark.slow
def test_scanned_layers_cost_is_extrapolated(folders, libtpu):
    """XLA counts a loop body once: with scan_layers the FLOPs / time come from unrolled 1- and 2-layer compiles,
    and equal the unrolled step's."""
    topo = aot.parse_topology("v5e-4")
    reports = [aot.compile_step(load("configs/sft.py", **{"model.name_or_path": folders / "llama",
                                                          "model.scan_layers": scan}), topo, 8, 128, None)
               for scan in (False, True)]
    assert reports[1].cost_note and not reports[0].cost_note
    assert reports[1].flops == pytest.approx(reports[0].flops, rel=0.02)
    assert reports[1].estimated_seconds == pytest.approx(reports[0].estimated_seconds, rel=0.1)


@pytest.mark.slow  # ~35 s: two compiles for a v5e-4 mesh
def test_bert_classification_and_t5_seq2seq_compile(folders, libtpu):
    topo = aot.parse_topology("v5e:2x2")
    bert = load("configs/classify.py", **{"model.name_or_path": folders / "bert", "batch_size": 8, "max_length": 64})
    t5 = load("configs/translate.py", **{"model.name_or_path": folders / "t5", "batch_size": 8, "max_length": 32,
                                         "data.max_target_length": 16, "mesh.data": 1, "mesh.fsdp": -1})
    for config, b, t, u in ((bert, 8, 64, None), (t5, 8, 32, 16)):
        r = aot.compile_step(config, topo, b, t, u)
        assert r.fits and r.state_bytes > 0 and r.code_bytes > 0 and r.total_bytes > r.state_bytes
        assert r.flops > 0 and r.estimated_seconds > 0 and r.tokens_per_second > 0 and 0 < r.mfu < 1
    assert r.tokens_per_step == 8 * (32 + 16) and r.mesh == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
    assert r.collectives.get("all-gather", {}).get("bytes", 0) > 0  # FSDP gathers the weights


def test_multi_host_topology_compiles(folders, libtpu):
    topo = aot.parse_topology("v5p-32")
    assert (topo.layout, topo.chips, topo.hosts) == ("v5p:2x2x4", 16, 4)
    devices = aot.topology_devices(topo)
    assert len(devices) == 16 and len({d.process_index for d in devices}) == 4
    config = load("configs/sft.py", **{"model.name_or_path": folders / "llama", "mesh.data": 2, "mesh.fsdp": -1})
    r = aot.compile_step(config, topo, 16, 64, None)
    assert r.fits and r.hosts == 4 and r.flops > 0


def test_run_that_does_not_fit_exits_2_with_one_line(folders, libtpu, capsys):
    argv = ["--config", "configs/sft.py", "--topology", "v5e-4", f"--config.model.name_or_path={folders / 'huge'}",
            "--config.batch_size=4", "--config.max_length=128"]  # 128: splash takes it (no fallback warning)
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "does not fit on v5e-4" in lines[0] and "GiB over" in lines[0] and "--config.mesh.fsdp=-1" in lines[0]


def test_without_libtpu_one_line_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu → ImportError
    code, out, err = run(["--config", "configs/sft.py", "--topology", "v5e-8"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert 'pip install -e ".[aot]"' in err


def test_unknown_topology_is_one_line(capsys):
    code, _, err = run(["--config", "configs/sft.py", "--topology", "v9x-8"], capsys)
    assert code == 2 and "--topology 'v9x-8': unknown" in err
