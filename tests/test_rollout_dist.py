"""The rollout engine under real torchrun (2 gloo ranks): sharded policy, per-rank engines, sync."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_two_ranks_sync_their_own_engines(tiny_path, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "rollout_worker.py"), tiny_path, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank, n_rows in ((0, 2), (1, 1)):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(r)
        assert r["rows"] == n_rows
        assert max(r["gaps_before"]) < 1e-4 and max(r["gaps_after"]) < 1e-4  # engine == sharded trainer
        assert all(r["changed"])  # the new weights reached this rank's engine
        assert all(r["hf_equal"])  # generate on the sharded model, uneven rows per rank
