"""Pretrained weights load straight into their shardings (each process reads only its devices' slices of the
safetensors files), and export writes sharded safetensors the way transformers' save_pretrained does.

The multi-device checks run this file as a script in subprocesses (`python tests/test_sharded_io.py WHAT ...`):
8 host CPU devices in one process, or 2 processes × 1 CPU device over jax.distributed on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, make_tiny_classifier, make_tiny_decoder  # noqa: E402


def run_worker(*args, devices: int = 8, timeout: int = 600, **env) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **env}
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"worker {args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shard_checkpoint(folder: Path, max_shard_size: str) -> None:
    """Rewrites folder's model.safetensors as sharded safetensors + index (jaxsft's own writer)."""
    from safetensors.numpy import load_file

    from jaxsft import hf_io

    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    files = hf_io.write_safetensors_sharded({k: (v.shape, v.dtype) for k, v in weights.items()}, weights.__getitem__,
                                            folder, max_shard_size)
    assert len(files) > 2


# ---- values: sharded load == plain load, on an 8-device mesh -------------------------------------------------------

CASES = (  # (checkpoint, task, model options, mesh (data, fsdp, tensor))
    ("bert", "classification", {}, (2, 2, 2)),          # a new classifier head: initialised on its devices
    ("llama", "causal_lm", {"scan_layers": True}, (1, 4, 2)),  # scanned stacks, read layer by layer
    ("llama", "classification", {}, (1, 8, 1)),          # sharded safetensors (index), a new score head
)


@pytest.mark.slow  # ~25 s
@pytest.mark.mesh
def test_sharded_load_and_init_on_8_devices_are_bit_identical_to_the_plain_ones(tmp_path):
    bert = make_tiny_classifier(tmp_path / "bert", num_labels=3)
    llama = make_tiny_decoder(tmp_path / "llama")
    shard_checkpoint(llama, "40KB")
    out = run_worker("values", bert, llama)
    for case, result in zip(CASES, out["cases"]):
        assert result["differ"] == [], (case, result["differ"])
        assert result["split"] > 0, case  # parameters really are divided between the devices
        assert result["report_equal"], case
        assert result["scratch_keys_equal"] and result["scratch_differ"] == [], (case, result["scratch_differ"])
        assert result["scratch_split"] > 0, case


def _values_worker(bert: str, llama: str) -> dict:
    import jax
    import jax.numpy as jnp
    import transformers as tf
    from flax import nnx

    from jaxsft import hf_io, parallel
    from jaxsft.models import build_model, flatten_state, init_sharded, load_sharded, load_weights

    assert jax.device_count() == 8
    results = []
    for name, task, options, (d, f, t) in CASES:
        folder = Path(bert if name == "bert" else llama)
        hf_config = tf.AutoConfig.from_pretrained(folder)
        hf_config.num_labels = 3

        def build(hf_config=hf_config, task=task, options=options):
            return build_model(hf_config, task, jnp.float32, 3, options)

        plain, plain_report = load_weights(build(), hf_io.read_weights(folder), "test")
        mesh = parallel.make_mesh({"data": d, "fsdp": f, "tensor": t})
        _, params, report = load_sharded(build, hf_io.WeightReader(folder), "test", mesh, parallel.rules_for(hf_config))
        assert params.keys() == plain.keys()
        # model.from_scratch: every param initialised on its devices equals an eager build's
        eager = flatten_state(nnx.to_pure_dict(nnx.state(build(), nnx.Param)))
        _, fresh = init_sharded(build, mesh, parallel.rules_for(hf_config))
        results.append({
            "differ": [k for k in plain if not np.array_equal(np.asarray(params[k]), np.asarray(plain[k]))
                       or params[k].dtype != plain[k].dtype],
            "split": sum(v.addressable_shards[0].data.shape != v.shape for v in params.values()),
            "report_equal": (report.missing, report.unexpected) == (plain_report.missing, plain_report.unexpected),
            "scratch_differ": [k for k in eager if not np.array_equal(np.asarray(fresh[k]), np.asarray(eager[k]))],
            "scratch_split": sum(v.addressable_shards[0].data.shape != v.shape for v in fresh.values()),
            "scratch_keys_equal": fresh.keys() == eager.keys(),
        })
    return {"cases": results}


def test_load_errors_are_the_same_one_line_messages(tmp_path):
    """Shape mismatches and unrelated checkpoints fail as the plain load does (tests/test_bad_input.py)."""
    import jax.numpy as jnp
    import transformers as tf

    from jaxsft import hf_io, parallel
    from jaxsft.errors import UserError
    from jaxsft.models import build_model, load_sharded, load_weights

    bert = make_tiny_classifier(tmp_path / "bert")
    mesh = parallel.make_mesh({"data": -1})
    wrong = tf.AutoConfig.from_pretrained(bert)
    wrong.intermediate_size *= 2
    llama = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
    for cfg, task in ((wrong, "classification"), (llama, "causal_lm")):
        with pytest.raises(UserError) as plain:
            load_weights(build_model(cfg, task, jnp.float32, 0), hf_io.read_weights(bert), str(bert))
        with pytest.raises(UserError) as sharded:
            load_sharded(lambda cfg=cfg, task=task: build_model(cfg, task, jnp.float32, 0), hf_io.WeightReader(bert),
                         str(bert), mesh, parallel.rules_for(cfg))
        assert str(sharded.value) == str(plain.value) and "\n" not in str(plain.value)


def test_pytorch_bin_weights_are_read_whole_but_load_the_same(tmp_path):
    """torch .bin (like flax msgpack) cannot be read in slices: the one format read whole, then placed sharded."""
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    import transformers as tf
    from safetensors.numpy import load_file

    from jaxsft import hf_io, parallel
    from jaxsft.models import build_model, load_sharded, load_weights

    bert = make_tiny_classifier(tmp_path / "bert")
    weights = load_file(bert / "model.safetensors")
    (bert / "model.safetensors").unlink()
    torch.save({k: torch.tensor(v) for k, v in weights.items()}, bert / "pytorch_model.bin")
    cfg = tf.AutoConfig.from_pretrained(bert)
    plain, _ = load_weights(build_model(cfg, "classification", jnp.float32, 0), weights, "test")
    _, params, _ = load_sharded(lambda: build_model(cfg, "classification", jnp.float32, 0),
                                hf_io.WeightReader(bert), "test", parallel.make_mesh({"data": -1}),
                                parallel.rules_for(cfg))
    assert all(np.array_equal(np.asarray(params[k]), np.asarray(plain[k])) for k in plain)


# ---- memory: no process holds the whole model --------------------------------------------------------------------

def write_llama_checkpoint(folder: Path) -> int:
    """A Llama-shaped checkpoint of 375 MB written with numpy + safetensors (no torch), as 2 shards + index;
    returns its size in bytes (float32 params: the size of the loaded model)."""
    import transformers as tf
    from safetensors.numpy import save_file

    cfg = tf.LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    h, m, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       **{p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"},
                       p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                       p + "mlp.down_proj.weight": (h, m)})
    rng = np.random.default_rng(0)
    names = list(shapes)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for filename, part in halves.items():
        save_file({k: rng.standard_normal(shapes[k], dtype=np.float32) * 0.02 for k in part}, folder / filename,
                  metadata={"format": "pt"})
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: f for f, part in halves.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_growth(folder: Path, how: str) -> list[dict]:
    """Peak host memory growth of each of 2 processes (1 CPU device each, fsdp over both) while loading."""
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([sys.executable, __file__, "memory", str(folder), how, str(port), str(i)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-4000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


@pytest.mark.multihost
@pytest.mark.slow
def test_each_process_reads_only_its_half_of_a_375mb_checkpoint(tmp_path):
    model_bytes = write_llama_checkpoint(tmp_path / "llama")
    results = peak_growth(tmp_path / "llama", "sharded")
    for r in results:
        assert r["held"] == (model_bytes - r["replicated"]) // 2 + r["replicated"]  # fsdp halves (norms: whole)
        assert r["growth"] < 0.7 * model_bytes, (r, model_bytes)  # the plain load peaks above 2x the model


def _memory_worker(folder: str, how: str, port: str, process_id: str) -> dict:
    import jax

    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
    import jax.numpy as jnp
    import transformers as tf

    from jaxsft import hf_io, parallel
    from jaxsft.models import build_model, load_sharded, load_weights

    hf_config = tf.AutoConfig.from_pretrained(folder)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 1})
    rules = parallel.rules_for(hf_config)
    start = _rss_reset()
    if how == "sharded":
        _, params, _ = load_sharded(lambda: build_model(hf_config, "causal_lm", jnp.float32, 0),
                                    hf_io.WeightReader(Path(folder)), folder, mesh, rules)
    else:  # the load before sharded loading: the whole model on every host, then sharded
        params, _ = load_weights(build_model(hf_config, "causal_lm", jnp.float32, 0), hf_io.read_weights(Path(folder)),
                                 folder)
        params = parallel.put(params, parallel.param_shardings(params, rules, mesh))
    jax.block_until_ready(params)
    peak = _status_kb("VmHWM") * 1024
    held = sum(s.data.nbytes for v in params.values() for s in v.addressable_shards)
    replicated = sum(v.nbytes for v in params.values() if v.sharding.is_fully_replicated)
    return {"growth": peak - start, "held": held, "replicated": replicated}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rss_reset() -> int:
    """Resets the peak-RSS mark (VmHWM) to the current RSS and returns that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


# ---- sharded export ----------------------------------------------------------------------------------------------

def test_export_past_max_shard_size_writes_shards_that_transformers_and_jaxsft_load(tmp_path):
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import transformers as tf

    from jaxsft import hf_io, parallel
    from jaxsft.export import write_weights
    from jaxsft.models import Functional, build_model, load_sharded

    bert = make_tiny_classifier(tmp_path / "bert", num_labels=3)
    hf_config = tf.AutoConfig.from_pretrained(bert)
    mesh = parallel.make_mesh({"data": -1})

    def build():
        return build_model(hf_config, "classification", jnp.float32, 0)

    model, params, _ = load_sharded(build, hf_io.WeightReader(bert), "test", mesh, parallel.rules_for(hf_config))
    # Perturbed so that the test cannot pass by re-reading the original files.
    params = {k: v + 0.01 * jnp.sin(jnp.arange(v.size).reshape(v.shape)) for k, v in params.items()}
    out = tmp_path / "export"
    files = write_weights(params, out, np.float32, "60KB")
    hf_config.save_pretrained(out)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                           for i in range(1, len(shards) + 1)]
    assert set(files) == {*shards, "model.safetensors.index.json"} and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in shards:  # within max_shard_size, unless it holds one larger tensor (as transformers does)
        raw = (out / shard).read_bytes()
        data = len(raw) - 8 - int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, header, data
        assert data <= 60_000 or len([f for f in index["weight_map"].values() if f == shard]) == 1, (shard, data)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.size * 4 for v in params.values())

    ids = np.random.default_rng(0).integers(5, hf_config.vocab_size, (2, 12))
    mask = np.ones_like(ids)
    ours = np.asarray(jax.jit(Functional(model).apply)(params, ids, mask, np.zeros_like(ids)))
    theirs = tf.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    _, again, report = load_sharded(build, hf_io.WeightReader(out), "export", mesh, parallel.rules_for(hf_config))
    assert not report.missing and not report.unexpected
    assert all(np.array_equal(np.asarray(again[k]), np.asarray(jax.device_get(params[k]))) for k in params)

    small = tmp_path / "bf16"  # under max_shard_size: one model.safetensors, as before; bfloat16 by choice
    assert write_weights(params, small, ml_dtypes.bfloat16) == ["model.safetensors"]
    assert hf_io.WeightReader(small).read("classifier.weight").dtype == ml_dtypes.bfloat16


def test_max_shard_size_takes_transformers_units():
    from jaxsft import hf_io
    from jaxsft.errors import UserError

    assert hf_io.parse_size("5GB") == 5 * 10**9 and hf_io.parse_size("200KB") == 200_000
    assert hf_io.parse_size(1234) == 1234
    with pytest.raises(UserError, match="--max_shard_size '5 gigs'"):
        hf_io.parse_size("5 gigs")


if __name__ == "__main__":
    what, *rest = sys.argv[1:]
    result = {"values": _values_worker, "memory": _memory_worker}[what](*rest)
    print(json.dumps(result))


def test_lora_merge_for_export_makes_each_merged_weight_only_when_read(monkeypatch):
    """Export reads one tensor at a time; merging lazily keeps at most one merged weight alive (a device's base
    weight merged on the device, in its sharding; a host one on the host)."""
    import jax
    import jax.numpy as jnp

    from jaxsft.models import lora

    rng = np.random.default_rng(0)
    a_q, b_q, a_o, b_o = (rng.normal(size=s).astype(np.float32) for s in ((6, 2), (2, 4), (4, 2), (2, 3)))
    w_q, w_o = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32), rng.normal(size=(4, 3)).astype(np.float32)
    params = {"q.kernel": w_q, "q.lora_A.kernel": jnp.asarray(a_q), "q.lora_B.kernel": jnp.asarray(b_q),
              "o.weight": w_o, "o.lora_A.kernel": a_o, "o.lora_B.kernel": b_o, "head.bias": np.ones(3, np.float32)}
    calls = []
    real = lora._merge_on_devices
    monkeypatch.setattr(lora, "_merge_on_devices", lambda *args: calls.append(1) or real(*args))
    merged = lora.merge(params, {"q": 0.5, "o": 2.0})
    assert list(merged) == ["q.kernel", "o.weight", "head.bias"] and not calls  # nothing merged yet
    q = merged["q.kernel"]
    assert isinstance(q, jax.Array) and q.sharding == w_q.sharding and len(calls) == 1
    np.testing.assert_allclose(np.asarray(q), np.asarray(w_q) + a_q @ b_q * 0.5, atol=1e-6)
    o = merged["o.weight"]
    assert isinstance(o, np.ndarray) and len(calls) == 1
    np.testing.assert_allclose(o, w_o + a_o @ b_o * 2.0, atol=1e-6)
    assert merged["head.bias"] is params["head.bias"]
