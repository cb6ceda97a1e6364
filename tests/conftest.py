"""Shared fixtures: the tiny real-architecture model (built once, cached on disk) and sample rows."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
