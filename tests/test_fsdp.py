"""FSDP2 under real torchrun (2 gloo ranks on CPU): training is bit-identical to one process."""
import json

from conftest import run_script


def test_fsdp2_two_ranks_bit_identical_to_one_process(tiny_path, tmp_path):
    proc = run_script("tests/fsdp_worker.py", [tiny_path, str(tmp_path)], ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    print(result)
    assert result["world"] == 2 and result["keys_equal"]
    assert result["moved"] == result["tensors"]  # every weight trained
    assert result["identical"] == result["tensors"], result["max_diff"]
    assert result["saved_identical"] == result["tensors"]
    # the norm itself is summed in another order over shards: equal to float rounding
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(result["norms"], result["ref_norms"]))
