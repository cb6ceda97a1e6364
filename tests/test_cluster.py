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


def run_until(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str, float]:
    """(exit code or None if it had to be killed at the timeout, stdout + stderr, end time)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**SCRIPT_ENV, **(env or {})})
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.time()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
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
