"""Behaviour on clusters, on CPU ranks: a rank that raises ends the whole job at once, with its
traceback; a multi-node run stops at start when --out is not one shared directory."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SCRIPT_ENV


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of their own)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        kill_tree(int(child))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_until(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str, float]:
    """(exit code or None if it had to be killed at the timeout, stdout + stderr, end time)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**SCRIPT_ENV, **(env or {})})
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.time()
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        return None, out, time.time()


@pytest.mark.parametrize("where", ["prompts", "step"])
def test_a_failing_rank_ends_the_job_at_once(where, tiny_path, toy_data, tmp_path):
    args = ["--model", tiny_path, "--data", toy_data, "--max-steps", "2", "--rollout", "hf", "--kl-coef", "0",
            "--prompts-per-step", "4", "--group-size", "2", "--mini-batch", "4", "--micro-batch", "2",
            "--max-response-tokens", "8", "--out", str(tmp_path / "run")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "fault_worker.py"), where] + args
    code, out, end = run_until(cmd, timeout=300)
    assert code is not None, "the job hung after rank 1 failed:\n" + out[-4000:]
    assert code != 0
    raised = re.search(r"\[rank 1\] RuntimeError: injected fault at ([0-9.]+)", out)
    assert raised, out[-4000:]
    assert "[rank 1] Traceback" in out and "fault_worker.py" in out  # the failed rank's own traceback
    assert end - float(raised.group(1)) < 60, f"the job took {end - float(raised.group(1)):.0f} s to end"


def two_nodes(args_of_node: list[list[str]], timeout: float = 300) -> list[tuple[int | None, str, float]]:
    """grpo.py as two torchrun "nodes" of one rank each on this machine (static rendezvous, node ranks
    0 and 1), node k with args_of_node[k]: a multi-node job (WORLD_SIZE 2, LOCAL_WORLD_SIZE 1)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(k), "--nproc-per-node",
             "1", "--master-addr", "127.0.0.1", "--master-port", str(port), str(ROOT / "grpo.py")] + args
            for k, args in enumerate(args_of_node)]
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda cmd: run_until(cmd, timeout), cmds))


def test_multi_node_runs_need_one_shared_out(tiny_path, toy_data, tmp_path):
    args = ["--model", tiny_path, "--data", toy_data, "--max-steps", "1", "--rollout", "hf", "--kl-coef", "0",
            "--prompts-per-step", "2", "--group-size", "2", "--mini-batch", "2", "--micro-batch", "2",
            "--max-response-tokens", "4", "--save-every", "1"]
    # node-local disks: each node's --out is a directory of its own
    local = two_nodes([args + ["--out", str(tmp_path / f"node{k}")] for k in range(2)])
    for code, out, _ in local:
        assert code not in (0, None), out[-3000:]
    assert "is not one directory that every node sees: rank 1" in local[1][1], local[1][1][-3000:]
    assert not (tmp_path / "node0" / "checkpoints").exists()  # stopped before any step
    # one directory both see: the run goes on, and its checkpoint holds both ranks' optimizer shards
    shared = two_nodes([args + ["--out", str(tmp_path / "shared")]] * 2)
    for code, out, _ in shared:
        assert code == 0, out[-3000:]
    step = tmp_path / "shared" / "checkpoints" / "step_000001"
    assert (step / "trainer_state.json").exists() and not list((tmp_path / "shared").glob(".shared-check-*"))
    assert len(list((step / "resume").glob("*.distcp"))) == 2  # one file of optimizer shards per rank
