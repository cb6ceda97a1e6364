"""FSDP2 under real torchrun (2 gloo ranks on CPU): loading reads the files on rank 0 alone, and training is
bit-identical to one process."""
import json

import pytest

from conftest import MEASURE_ENV, run_script


@pytest.mark.parametrize("family", ["tiny_path", "qwen3_path"])  # Qwen2.5-VL, Qwen3-VL (DeepStack)
def test_fsdp2_two_ranks_bit_identical_to_one_process(family, request, tmp_path):
    proc = run_script("tests/fsdp_worker.py", [request.getfixturevalue(family), str(tmp_path)], ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    print(result)
    assert result["world"] == 2 and result["keys_equal"]
    # loading: rank 1 (meta device, shards from rank 0) ends up with exactly a plain load's weights and
    # buffers (the rotary inv_freq, in no state dict, included), and the same generation defaults
    assert result["load_keys_equal"] and result["load_identical"] == result["tensors"]
    assert result["buffers"] == 4 and result["buffers_identical"] == [result["buffers"]] * 2
    assert result["generation_config_equal"] == [True, True]
    # a no-grad forward leaves the root unit gathered (no backward to reshard it); model.reshard frees it
    assert result["gathered_after_no_grad"] and result["sharded_after_reshard"]
    assert result["moved"] == result["tensors"]  # every weight trained
    assert result["identical"] == result["tensors"], result["max_diff"]
    assert result["saved_identical"] == result["tensors"]
    # the norm itself is summed in another order over shards: equal to float rounding
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(result["norms"], result["ref_norms"]))


def test_only_rank0_reads_the_checkpoint(tmp_path):
    """load_sharded_model on a ~520 MB checkpoint with tied embeddings (like the 3B): rank 1, built on
    the meta device, grows by about its half of the weights while loading; rank 0 by more than a full
    copy. Both end with exactly a plain load's weights and buffers, and the embeddings still tied."""
    import shutil

    ckpt = tmp_path / "ckpt"
    proc = run_script("tests/load_worker.py", ["build", str(ckpt)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        proc = run_script("tests/load_worker.py", ["load", str(ckpt), str(tmp_path)], ranks=2, env=MEASURE_ENV)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    finally:
        shutil.rmtree(ckpt)
    result = json.loads((tmp_path / "load.json").read_text())
    print(result)
    assert result["keys_equal"] and result["identical"] == result["tensors"]
    assert result["buffers_identical"] == [True, True] and result["tied"] == [True, True]
    # measured: rank 0 ~810 MB, rank 1 ~291 MB (its 261 MB of shards + one tensor in flight), model 522 MB
    rank0, rank1 = result["grew_mb"]
    assert rank1 < 0.7 * result["model_mb"] < result["model_mb"] < rank0
