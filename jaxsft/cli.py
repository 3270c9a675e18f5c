"""What the CLIs share: config file + `--config.key=value` overrides, workdir, --verbose, and --multihost (one job
run by several processes: all of them do the work, process 0 alone writes files and prints results)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from jaxsft import config as config_lib
from jaxsft.errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise UserError(f"{self.prog}: {message}")


def parser(prog: str, description: str) -> Parser:
    p = Parser(prog=prog, description=description)
    p.add_argument("--verbose", action="store_true", help="show tracebacks and library logs")
    return p


def config_from_args(argv: list[str], *, workdir_config: Path | None = None, base=None):
    """(config, other args): `--config FILE`, else a workdir's config.json, else `base`; then `--config.*`."""
    path, overrides, rest = config_lib.split_config_args(argv)
    if path is not None:
        config = config_lib.load_config_file(path)
    elif workdir_config is not None:
        config = config_lib.from_json_file(workdir_config)
    elif base is not None:
        config = base
    else:
        raise UserError("--config FILE is required (--help: usage; --list-keys: every config key and its default)")
    for key, value in overrides:
        config_lib.apply_override(config, key, value)
    return config, rest


CONFIG_HELP = ("a Python file whose get_config() returns the run's ml_collections.ConfigDict (see configs/; start "
               "from jaxsft.defaults.base_config()); required")
OVERRIDE_HELP = ("--config.KEY=VALUE (or --config.KEY VALUE) overrides one key, e.g. --config.learning_rate=1e-4, "
                 "--config.data.text_fields=sentence1,sentence2 (lists: comma-separated, or a Python list); "
                 "--config.KEY=None sets a key whose default is None back to None. --list-keys prints every key, its "
                 "default and what it means; a value without a meaning (out of range, wrong type) exits 2 before "
                 "anything is read or written.")


def add_config_help(p: argparse.ArgumentParser) -> None:
    """`--config FILE` and `--list-keys` in --help (`--config` itself is taken out of argv by config_from_args)."""
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--list-keys", action="store_true", help="print every config key with its default and comment "
                   "(jaxsft/defaults.py) and exit")
    p.epilog = OVERRIDE_HELP


def help_or_keys(p: argparse.ArgumentParser, argv: list[str]) -> bool:
    """Prints --help or --list-keys when asked (no --config needed) and returns True; False otherwise."""
    _, _, rest = config_lib.split_config_args(argv)
    if "-h" in rest or "--help" in rest:
        p.print_help()
        return True
    if "--list-keys" in rest:
        print("\n".join(config_lib.describe_keys()), flush=True)
        return True
    return False


MULTIHOST_HELP = ("one of several processes of one job (every host of a pod runs the same command): "
                  "jax.distributed.initialize (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or "
                  "detected on TPU pods / SLURM); all processes do the work, process 0 alone prints results and writes "
                  "outputs (training: every process also writes its checkpoint shards). Without either flag it is on "
                  "when the environment shows a launch of several processes (JAX_NUM_PROCESSES > 1, a SLURM step of "
                  "several tasks, a TPU slice of several hosts); --no-multihost runs this process alone")


_multihost = False  # start_multihost ran: this process is one of several


def add_multihost(p: argparse.ArgumentParser) -> None:
    p.add_argument("--multihost", action=argparse.BooleanOptionalAction, default=None, help=MULTIHOST_HELP)


def detected_launch(env=None) -> str | None:
    """What in the environment says this process is one of several of one launch (None: nothing does)."""
    env = os.environ if env is None else env

    def count(name: str) -> int:
        try:
            return int(env.get(name) or 0)
        except ValueError:
            return 0

    if count("JAX_NUM_PROCESSES") > 1 and env.get("JAX_COORDINATOR_ADDRESS"):
        return f"JAX_NUM_PROCESSES={count('JAX_NUM_PROCESSES')}"
    tasks = count("SLURM_STEP_NUM_TASKS") or count("SLURM_NTASKS")
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID") is not None and tasks > 1:
        return f"a SLURM step of {tasks} tasks"
    hosts = [h for h in (env.get("TPU_WORKER_HOSTNAMES") or "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"a TPU slice of {len(hosts)} hosts (TPU_WORKER_HOSTNAMES)"
    return None


def start_multihost(enabled: bool | None) -> None:
    """`--multihost` (None, neither flag: when `detected_launch` finds one): join the job's other processes
    (parallel.initialize_distributed). From then on stdout carries results alone: what libraries write to file
    descriptor 1 (gloo's connection lines) goes to stderr, and on processes other than 0 everything does (they
    print no results)."""
    global _multihost
    if enabled is None:
        why = detected_launch()
        if why is not None:
            logging.getLogger("jaxsft").info("multi-host launch detected (%s); --no-multihost runs this process "
                                             "alone", why)
        enabled = why is not None
    if not enabled:
        return
    from jaxsft import parallel

    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no usable stdout / stderr descriptors: leave them alone
        saved = None
    parallel.initialize_distributed()
    _multihost = True
    if saved is None:
        return
    if is_main():
        sys.stdout = open(saved, "w", buffering=1, encoding=sys.stdout.encoding, errors=sys.stdout.errors)
    else:
        os.close(saved)


def is_main() -> bool:
    """True in the process that writes files and prints results: the only one, or process 0 of a multi-host job."""
    if not _multihost:
        return True
    import jax

    return jax.process_index() == 0


def emit(line: str) -> None:
    """Prints one result line on stdout, from process 0 only."""
    if is_main():
        print(line, flush=True)


def all_done(what: str) -> None:
    """With --multihost, every process waits here until all (process 0 writing the outputs included) are done: a
    collective without a deadline, where leaving early would put the others in JAX's exit barrier, which gives up
    after JAXSFT_SHUTDOWN_TIMEOUT_S (a large shard still being written)."""
    if _multihost:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxsft {what} done")


def check_on_main(check: Callable[[], None]) -> None:
    """Runs a bad-input check whose answer may differ between hosts (a host-local output folder only process 0
    writes) on process 0 alone and raises its UserError in every process, so none goes on into a collective the
    others have left. Every process must call it (a collective when there are several)."""
    if not _multihost:
        check()
        return
    from jaxsft import parallel

    message = None
    if is_main():
        try:
            check()
        except UserError as e:
            message = str(e)
    message = parallel.broadcast_text(message)
    if message is not None:
        raise UserError(message)
