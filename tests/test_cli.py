"""What the CLIs share: multi-host detection from the launch environment."""

from __future__ import annotations

import pytest

from jaxsft import cli


@pytest.mark.parametrize("env, found", [
    ({}, None),
    ({"JAX_NUM_PROCESSES": "4", "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_NUM_PROCESSES=4"),
    ({"JAX_NUM_PROCESSES": "1", "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, None),  # one process: alone
    ({"JAX_NUM_PROCESSES": "4"}, None),  # no coordinator to meet at
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8"}, "a SLURM step of 8 tasks"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, None),  # the batch script itself, not an srun step
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3"}, "a TPU slice of 4 hosts (TPU_WORKER_HOSTNAMES)"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    ({"JAX_NUM_PROCESSES": "many", "JAX_COORDINATOR_ADDRESS": "x:1"}, None),
])
def test_a_launch_of_several_processes_is_detected_from_the_environment(env, found):
    assert cli.detected_launch(env) == found


def test_multihost_flag_is_on_off_or_left_to_detection():
    p = cli.parser("jaxsft.test", "")
    cli.add_multihost(p)
    assert [p.parse_args(a).multihost for a in ([], ["--multihost"], ["--no-multihost"])] == [None, True, False]


def test_no_multihost_keeps_a_detected_launch_alone(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    cli.start_multihost(False)  # would wait for a coordinator that is not there if it joined
    assert not cli._multihost
