"""The rollout engine under real torchrun (2 gloo ranks): sharded policy, per-rank engines, sync."""
import json

from conftest import run_script


def test_two_ranks_sync_their_own_engines(qwen3_path, tmp_path):
    """Qwen3-VL (DeepStack: the text-only rank's blank image feeds its early layers too); Qwen2.5-VL's
    sharded policy and per-rank engines are test_grpo's two-rank run."""
    proc = run_script("tests/rollout_worker.py", [qwen3_path, str(tmp_path)], ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank, n_rows in ((0, 2), (1, 1)):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(r)
        assert r["rows"] == n_rows
        assert max(r["gaps_before"]) < 1e-4 and max(r["gaps_after"]) < 1e-4  # engine == sharded trainer
        assert all(r["changed"])  # the new weights reached this rank's engine
        assert all(r["hf_equal"])  # generate on the sharded model, uneven rows per rank
