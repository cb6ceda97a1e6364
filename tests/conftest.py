"""Shared fixtures: the tiny real-architecture model (built once, cached on disk) and sample rows."""
import fcntl
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The environment for the scripts the tests start, taken before any test runs: model.init_distributed
# later sets RANK, MASTER_PORT, ... in this process (a one-rank group), which a child must not inherit.
SCRIPT_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# For scripts whose peak RSS a test measures: glibc's heap otherwise keeps freed blocks of up to 32 MB (its
# dynamic mmap threshold rises to the largest block freed) in the RSS, tens of MB of slack that is the
# allocator's, not the program's, and varies from run to run (a load's rank 1 read 290 MB with this, 330-380
# without). A fixed threshold turns the dynamic one off.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# Files that take minutes, slowest first (measured with --durations): `make test`'s two workers take
# whole files in collection order, so these start first and the short ones fill in at the end.
SLOW_FIRST = ["test_demo.py", "test_evaluate.py", "test_sft.py", "test_grpo.py", "test_curate.py", "test_rollout.py",
              "test_cluster.py", "test_rollout_dist.py", "test_model.py", "test_fsdp.py", "test_plan.py",
              "test_gpu_check.py"]


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: a file's own order kept


def run_script(script: str, args: list[str], ranks: int = 1, env: dict | None = None):
    """`python SCRIPT ARGS`, or under `torchrun --nproc_per_node RANKS`; output captured."""
    import subprocess

    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
              if ranks > 1 else [sys.executable])
    return subprocess.run(launch + [str(ROOT / script)] + args, capture_output=True, text=True, timeout=900,
                          env={**SCRIPT_ENV, **(env or {})})


def kill_when(script: str, args: list[str], ready, timeout: float = 600) -> None:
    """Run `python SCRIPT ARGS`, and SIGKILL it as soon as `ready()` is true (or at the timeout)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, str(ROOT / script)] + args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=SCRIPT_ENV)
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def make_image(seed: int, size: tuple[int, int] = (112, 112)):
    """A deterministic noise image (different seeds give different images)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def make_rows() -> list[dict]:
    """An image row, a two-image row and a text-only row, in the unified schema."""
    return [
        {"images": [make_image(1)], "question": "Which organ is shown?", "options": '{"A": "Liver", "B": "Lung"}',
         "answer_label": "B", "answer": "Lung", "dataset_name": "pmc_vqa", "dataset_index": 0},
        {"images": [make_image(2, (84, 140)), make_image(3, (140, 56))], "question": "Do the scans match?",
         "options": {"A": "Yes", "B": "No"}, "answer_label": "A", "answer": "Yes",
         "dataset_name": "MMMU-medical", "dataset_index": 1},
        {"images": [], "question": "First-line therapy for X?",
         "options": '{"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "None"}',
         "answer_label": "C", "answer": "Warfarin", "dataset_name": "m23k", "dataset_index": 2},
    ]


@pytest.fixture(scope="session")
def tiny_path() -> str:
    import model

    return model.resolve_model("tiny")


@pytest.fixture(scope="session")
def qwen3_path() -> str:
    """The tiny Qwen3-VL (tiny.py): the second model family."""
    import model

    return model.resolve_model("tiny-qwen3-vl")


@pytest.fixture(scope="session")
def processor(tiny_path):
    import model

    return model.load_processor(tiny_path)


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    import model

    return model.load_model(tiny_path)


@pytest.fixture()
def rows() -> list[dict]:
    return make_rows()


TOY_OPTIONS = {"A": "Left", "B": "Right", "C": "Both", "D": "Neither"}


def make_toy_rows(k: int = 8) -> list[dict]:
    """Unified-schema rows, half with an image, four options each."""
    return [{"images": [make_image(100 + i)] if i % 2 == 0 else [], "question": f"Which side is lesion {i} on?",
             "options": json.dumps(TOY_OPTIONS), "answer_label": "ABCD"[i % 4], "answer": TOY_OPTIONS["ABCD"[i % 4]],
             "reasoning": None, "dataset_name": "toy", "dataset_index": i} for i in range(k)]


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> str:
    from datasets import Dataset

    path = tmp_path_factory.mktemp("data") / "toy"
    Dataset.from_list(make_toy_rows()).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="session")
def sft_tiny(tiny_path, processor) -> str:
    """The tiny model taught the answer format on the toy rows, with two letters per question, so
    that its samples are sometimes right and sometimes wrong (GRPO then has non-zero advantages).
    Built once per machine (cached next to the tiny model), ~1.5 minutes."""
    import model
    import tiny

    path = model.CACHE_DIR / f"tiny-{tiny.TINY_VERSION}-grpo-start-v2"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:  # pytest-xdist: one worker builds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "trainer_state.json").exists():
            build_sft_tiny(path, tiny_path, processor)
    return str(path)


def build_sft_tiny(path, tiny_path: str, processor) -> None:
    import torch

    import checkpoints
    import model

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # both cores (shared with the other pytest-xdist worker, if any)
    m = model.load_model(tiny_path).train()
    rows = make_toy_rows()[:4]
    tok = processor.tokenizer
    pairs = [(row, tok(f"<think> look </think>\n<answer> {letter} </answer><|im_end|>")["input_ids"])
             for row in rows for letter in (row["answer_label"], "ABCD"[("ABCD".index(row["answer_label"]) + 1) % 4])]
    batch = model.build_batch(processor, [r for r, _ in pairs], [ids for _, ids in pairs])
    opt = model.adamw(m, 3e-3, (0.9, 0.999), 0.01)  # torch's AdamW defaults, fused like the stages'
    for _ in range(SFT_STEPS):
        (-model.token_logprobs(m, batch).sum() / batch["completion_mask"].sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    checkpoints.save_checkpoint(m, processor, path, {"steps": SFT_STEPS}, dtype=torch.float32)
    torch.set_num_threads(threads)


SFT_STEPS = 70


def make_eval_rows() -> list[dict]:
    """Two rows per benchmark of the paper, with single-image, two-image and text-only rows."""
    yes_no = json.dumps({"A": "Yes", "B": "No"})
    five = json.dumps({"A": "CT", "B": "MRI", "C": "X-ray", "D": "Ultrasound", "E": "PET"})
    specs = [("pmc_vqa", json.dumps(TOY_OPTIONS), 1), ("MMMU-medical", five, 2), ("MMMU-medical", five, 0),
             ("MedXpertQA-MM", five, 1), ("pathvqa_closed", yes_no, 1), ("slake_closed", yes_no, 1),
             ("vqa_rad_closed", yes_no, 1)]
    rows = []
    for i, (name, options, n_images) in enumerate(specs * 2):
        labels = list(json.loads(options))
        label = labels[i % len(labels)]
        rows.append({"images": [make_image(200 + 10 * i + k, (84 + 28 * k, 112)) for k in range(n_images)],
                     "question": f"Question {i} about {name}?", "options": options, "answer_label": label,
                     "answer": json.loads(options)[label], "reasoning": None, "dataset_name": name,
                     "dataset_index": i})
    return rows


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> str:
    from datasets import Dataset

    path = tmp_path_factory.mktemp("eval") / "eval"
    Dataset.from_list(make_eval_rows()).save_to_disk(str(path))
    return str(path)
