"""Run by test_cluster.py as `torchrun --nproc_per_node 2 tests/fault_worker.py WHERE GRPO_ARGS...`:
grpo.py itself, with rank 1 raising at WHERE (`prompts`: while it counts its share of the prompts'
tokens in check_prompt_lengths; `step`: in the first update's forward, while rank 0 goes on into its
collectives). The message carries the time of the raise, so the test can time the job's end."""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402
import model  # noqa: E402


def fail(*args, **kwargs):
    raise RuntimeError(f"injected fault at {time.time():.3f}")


if __name__ == "__main__":
    where, args = sys.argv[1], sys.argv[2:]
    if os.environ["RANK"] == "1":
        if where == "prompts":
            model.prompt_tokens = fail
        elif where == "step":
            grpo.train_forward = fail
        else:
            raise SystemExit(f"unknown fault {where}")
    grpo.main(args)
