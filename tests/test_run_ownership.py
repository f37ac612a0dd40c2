"""One writer per run directory, ranks that die with their launcher, and a watchdog that turns a
frozen rank into stacks on disk and a non-zero exit (issue 21, parts 2 and 5)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from repa.train import checkpoint as ckpt
from repa.train.logging import read_metrics
from repa.train.loop import train
from repa.train.runlock import LOST_LEASE_EXIT, RunLock, RunLockedError
from repa.train.watchdog import HANG_EXIT
from tests.test_train import _process_tree, _train_command, shards, tiny_config  # noqa: F401 (fixture)

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_a_second_lock_on_a_run_directory_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "run", stale_after=60)
    assert first.acquire() is None
    try:
        with pytest.raises(
            RunLockedError, match=rf"in use by {socket.gethostname()} pid {os.getpid()}.*heartbeat"
        ):
            RunLock(tmp_path / "run", stale_after=60).acquire()
    finally:
        first.release()
    assert not (tmp_path / "run" / "lease.json").exists()
    second = RunLock(tmp_path / "run", stale_after=60)
    assert second.acquire() is None  # free again once released
    second.release()


def _lease(path, host, age):
    path.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (path / "lease.json").write_text(
        json.dumps({"host": host, "pid": 4242, "started": now - 3600, "heartbeat": now - age})
    )


def test_a_lease_from_another_machine_holds_until_its_heartbeat_is_stale(tmp_path):
    _lease(tmp_path / "run", "node-17", age=5)
    with pytest.raises(RunLockedError, match="node-17 pid 4242"):
        RunLock(tmp_path / "run", stale_after=60).acquire()
    _lease(tmp_path / "run", "node-17", age=120)
    lock = RunLock(tmp_path / "run", stale_after=60)
    note = lock.acquire()
    assert "taking over" in note and "node-17 pid 4242" in note and "no heartbeat for 120 s" in note
    assert json.loads((tmp_path / "run" / "lease.json").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_holder_whose_lease_was_taken_over_exits_without_writing(tmp_path):
    script = (
        "import sys, time\n"
        "from repa.train.runlock import RunLock\n"
        "lock = RunLock(sys.argv[1], stale_after=0.5, heartbeat_every=0.1)\n"
        "lock.acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(30)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run")], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert holder.stdout.readline().strip() == b"held"
    holder.send_signal(signal.SIGSTOP)  # frozen: its heartbeat ages
    time.sleep(1.0)
    taker = RunLock(tmp_path / "run", stale_after=0.5)
    assert "taking over" in taker.acquire()
    holder.send_signal(signal.SIGCONT)
    assert holder.wait(timeout=10) == LOST_LEASE_EXIT
    assert b"taken over" in holder.stderr.read()
    taker.release()


@pytest.mark.slow
def test_the_same_run_started_twice_refuses_then_a_killed_holder_is_taken_over(shards, tmp_path):  # noqa: F811
    config_file = tmp_path / "run.yaml"
    # long enough to be still running when the second start comes (~15 s here)
    command = _train_command(shards, tmp_path, config_file, steps=1500, ranks=1, checkpointing_steps=500)
    first = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "run"
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").is_file():
        time.sleep(0.05)
    second = subprocess.run(command, env=ENV, capture_output=True, timeout=120)
    assert second.returncode == 2
    assert f"in use by {socket.gethostname()} pid {first.pid}" in second.stderr.decode()
    assert first.wait(timeout=300) == 0  # the first one finishes untouched
    steps = [record["step"] for record in read_metrics(run_dir)]
    assert steps == list(range(1, 1501))  # one writer: no second run interleaved in the log
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step-00001500"

    # A holder that dies without releasing (SIGKILL, with its loader worker): the rerun takes
    # over at once (its process is gone) and resumes from the last complete checkpoint.
    command = _train_command(shards, tmp_path, config_file, steps=3000, ranks=1, checkpointing_steps=20)
    holder = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step-00001500":
        time.sleep(0.05)
    tree = _process_tree(holder.pid)
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(tree, timeout=10)
    killed_at = int(ckpt.latest_checkpoint(run_dir / "checkpoints").name.split("-")[1])
    assert json.loads((run_dir / "lease.json").read_text())["pid"] == holder.pid  # left behind
    config = tiny_config(shards, tmp_path, max_train_steps=killed_at + 4)
    config.data.num_workers = 1
    assert train(config).step == killed_at + 4


@pytest.mark.slow
def test_killing_only_the_launcher_ends_every_rank(shards, tmp_path):  # noqa: F811
    command = _train_command(shards, tmp_path, tmp_path / "run.yaml", steps=2000, ranks=2)
    launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "run"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 3
    ):
        time.sleep(0.05)
    tree = _process_tree(launcher.pid)
    assert len(tree) == 5  # torchrun, two ranks, a loader worker each
    launcher.kill()  # kill -9 of torchrun alone: the ranks live in sessions of their own
    gone, alive = psutil.wait_procs(tree, timeout=25)
    assert not alive, alive
    # they stopped as on a scheduler's SIGTERM: a checkpoint at the stop step
    assert ckpt.latest_checkpoint(run_dir / "checkpoints") is not None


def test_a_watchdog_that_runs_out_writes_the_stacks_and_exits(tmp_path):
    script = (
        "import sys, time\n"
        "from repa.train.watchdog import StepWatchdog\n"
        "def stuck_in_a_collective():\n"
        "    time.sleep(60)\n"
        "watchdog = StepWatchdog(sys.argv[1], rank=3, describe_checkpoint=lambda: 'step-00000040')\n"
        "watchdog.expect(1.0, 'training step 41')\n"
        "stuck_in_a_collective()\n"
    )
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=ENV, capture_output=True, timeout=60
    )
    assert done.returncode == HANG_EXIT and time.time() - started < 20
    message = done.stderr.decode()
    assert "rank 3 made no progress for 1 s while training step 41" in message and "step-00000040" in message
    stacks = (tmp_path / "hang-rank3.txt").read_text()
    assert "stuck_in_a_collective" in stacks


def test_a_watchdog_that_is_fed_stays_quiet_and_leaves_no_report(tmp_path):
    from repa.train.watchdog import StepWatchdog

    watchdog = StepWatchdog(tmp_path, rank=0)
    for step in range(6):
        watchdog.expect(1.0, f"training step {step}")
        time.sleep(0.3)
    watchdog.stop()
    assert not (tmp_path / "hang-rank0.txt").exists()


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_with_stacks_and_the_rerun_resumes(shards, tmp_path):  # noqa: F811
    command = _train_command(
        shards, tmp_path, tmp_path / "run.yaml", steps=2000, ranks=2, checkpointing_steps=5
    )
    command += ["--step-timeout", "10"]  # a tiny step takes milliseconds, even on the slow CPUs
    launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_dir = tmp_path / "run"
    deadline = time.time() + 120
    while time.time() < deadline and ckpt.latest_checkpoint(run_dir / "checkpoints") is None:
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(launcher.pid).children() if "repa" in " ".join(p.cmdline())]
    tree = _process_tree(launcher.pid)
    frozen = max(ranks, key=lambda p: p.pid)
    frozen.suspend()  # SIGSTOP: a stuck file system, a wedged driver
    stopped_at = time.time()
    gone, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, alive
    assert time.time() - stopped_at < 60
    assert launcher.returncode != 0
    # the rank that could still run wrote its stacks (the frozen one's file stays empty)
    reports = [path.read_text() for path in run_dir.glob("hang-rank*.txt")]
    assert any("no progress for 10 s" in text and "File" in text for text in reports), reports
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    config = tiny_config(shards, tmp_path, max_train_steps=int(last.name.split("-")[1]) + 2)
    assert train(config).step == config.run.max_train_steps
