"""The run-folder lock: one writer, clear refusals, stale locks taken over, only rank 0 locks."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest

from semivit.errors import OutputDirError, RunLockedError
from semivit.runtime.lock import LOCK_NAME, RunLock, lock_folder, process_start_ticks, run_lock


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def write_lock(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getppid(), "host": socket.gethostname(), "command": "semivit semi", "started": "t0",
              "start_ticks": None, "token": "theirs", **fields}
    (folder / LOCK_NAME).write_text(json.dumps(record))


def test_the_lock_names_its_holder_and_goes_away(tmp_path):
    with RunLock(tmp_path / "run", "dpt run --config c.yaml") as lock:
        held = json.loads(lock.path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        assert held["command"] == "dpt run --config c.yaml" and held["started"]
        assert held["start_ticks"] == process_start_ticks(os.getpid())
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_live_holder_refuses_a_second_writer(tmp_path):
    write_lock(tmp_path)
    with pytest.raises(RunLockedError, match=rf"in use by pid {os.getppid()} on host .*command 'semivit semi'"):
        RunLock(tmp_path, "x").acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "theirs"  # untouched


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, capsys):
    write_lock(tmp_path, pid=dead_pid())
    with RunLock(tmp_path, "mine", label="semivit semi") as lock:
        assert json.loads(lock.path.read_text())["token"] == lock.token
    assert "semivit semi: warning: taking over" in capsys.readouterr().err
    assert not list(tmp_path.glob(".run.lock.stale.*"))


def test_a_reused_pid_is_stale(tmp_path):
    """The pid runs, but it started at another time than the holder did: another process now."""
    write_lock(tmp_path, start_ticks=-5)
    with RunLock(tmp_path, "mine"):
        pass


def test_a_lock_left_by_an_earlier_life_of_this_pid_is_stale(tmp_path):
    write_lock(tmp_path, pid=os.getpid())
    with RunLock(tmp_path, "mine"):
        pass


def test_another_host_is_never_guessed(tmp_path):
    write_lock(tmp_path, host="other-node", pid=dead_pid())
    with pytest.raises(RunLockedError, match=f"host other-node.*delete '{tmp_path / LOCK_NAME}'"):
        RunLock(tmp_path, "x").acquire()


def test_an_unreadable_old_lock_is_stale_a_fresh_one_is_waited_for(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    os.utime(tmp_path / LOCK_NAME, (0, 0))
    with RunLock(tmp_path, "mine"):
        pass


def test_nested_use_in_one_process_shares_the_lock(tmp_path):
    with RunLock(tmp_path, "outer") as outer:
        with RunLock(tmp_path, "inner") as inner:
            assert inner is outer
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_release_never_removes_someone_elses_lock(tmp_path):
    lock = RunLock(tmp_path, "mine")
    lock.acquire()
    write_lock(tmp_path)  # replaced behind our back
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()


def test_only_rank_zero_locks(tmp_path, monkeypatch):
    write_lock(tmp_path)
    monkeypatch.setenv("RANK", "1")
    with run_lock(tmp_path, "x") as lock:  # a peer of a launch: the folder is its rank 0's
        assert lock is None
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RunLockedError):
        with run_lock(tmp_path, "x"):
            pass


def test_an_unwritable_folder_is_one_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirError, match="cannot be written .it is a file.; set output_dir=DIR"):
        RunLock(tmp_path / "f", "x").acquire()
    with pytest.raises(OutputDirError, match="not a directory"):
        RunLock(tmp_path / "f" / "run", "x").acquire()


def test_lock_folder_is_the_run_folder_for_anything_inside_it(tmp_path):
    run = tmp_path / "run"
    assert lock_folder(run / "synthetic", run) == run.resolve()
    assert lock_folder(run, run) == run.resolve()
    assert lock_folder(tmp_path / "elsewhere", run) == (tmp_path / "elsewhere").resolve()


def _contend(folder, barrier, results):
    lock = RunLock(folder, f"racer {os.getpid()}")
    barrier.wait()
    try:
        lock.acquire()
        results.put("won")
    except RunLockedError:
        results.put("refused")
    barrier.wait()  # the winner stays alive (its lock valid) until every racer has tried
    lock.release()


def test_of_racing_writers_exactly_one_wins(tmp_path):
    """Processes started together on one folder (two `dpt run`): O_EXCL lets exactly one in."""
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(tmp_path, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes == ["refused"] * (n - 1) + ["won"]
