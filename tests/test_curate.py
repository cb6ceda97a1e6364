"""curate.py: PMC-VQA preparation and its rejects, the resize rule, pass counts (resumable, rank
independent), the difficulty filter, distillation against a local OpenAI-compatible server, toy data."""
import csv
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from datasets import Dataset, load_from_disk
from PIL import Image

import curate
from conftest import kill_when, run_script, make_toy_rows



def cli(args: list[str], ranks: int = 1, **kw):
    return run_script("curate.py", args, ranks, **kw)


@pytest.mark.parametrize("size,expected", [((10, 300), (28, 840)), ((20, 20), (28, 28)), ((2048, 1024), (1024, 512)),
                                           ((300, 4000), (77, 1024)), ((500, 400), (500, 400)), ((28, 1024), (28, 1024))])
def test_resize_rule(size, expected):
    assert curate.resize_rule(Image.new("RGB", size)).size == expected


def write_pmc(tmp_path) -> tuple[str, str]:
    images = tmp_path / "figures"
    images.mkdir()
    for name, size in (("ok1.jpg", (200, 150)), ("ok2.jpg", (10, 300)), ("big.png", (1500, 1500))):
        Image.new("RGB", size, (120, 30, 30)).save(images / name)
    (images / "broken.jpg").write_bytes(Image.new("RGB", (64, 64)).tobytes()[:100])  # not an image
    header = ["Figure_path", "Question", "Answer", "Answer_label", "Choice A", "Choice B", "Choice C", "Choice D"]
    records = [
        ["ok1.jpg", ' "What is shown?"\xa0', "Focal uptake", "B", "A:Diffuse uptake", "B:Focal uptake", "C:None", "D: ratio 1:2"],
        ["ok2.jpg", "Which modality?\u200a", " MRI ", "A", " A:MRI", "B:CT", "C:PET", "D:X-ray"],
        ["ok1.jpg", "What is shown?", "Focal uptake", "B", "A:Diffuse uptake", "B:Focal uptake", "C:None", "D:Other"],
        ["ok1.jpg", "Bad prefix?", "CT", "B", "A:MRI", "X:CT", "C:PET", "D:X-ray"],
        ["ok1.jpg", "Bad label?", "CT", "E", "A:MRI", "B:CT", "C:PET", "D:X-ray"],
        ["ok1.jpg", "Wrong answer?", "PET", "B", "A:MRI", "B:CT", "C:PET", "D:X-ray"],
        ["missing.jpg", "No file?", "CT", "B", "A:MRI", "B:CT", "C:PET", "D:X-ray"],
        ["broken.jpg", "Corrupt?", "CT", "B", "A:MRI", "B:CT", "C:PET", "D:X-ray"],
        ["big.png", "Bomb?", "CT", "B", "A:MRI", "B:CT", "C:PET", "D:X-ray"],
    ]
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(records)
    return str(tmp_path / "train.csv"), str(images)


def test_prepare_pmc_raw_rows_and_rejects(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # big.png (2.25 M pixels) counts as a bomb
    csv_path, images = write_pmc(tmp_path)
    out = str(tmp_path / "pmc")
    curate.main(["prepare", "--source", "pmc-raw", "--csv", csv_path, "--images", images, "--out", out])
    rows = load_from_disk(out)
    assert [r["dataset_index"] for r in rows] == [0, 1, 2]
    first, second = rows[0], rows[1]
    assert first["question"] == "What is shown?" and first["answer_label"] == "B" and first["answer"] == "Focal uptake"
    assert json.loads(first["options"]) == {"A": "Diffuse uptake", "B": "Focal uptake", "C": "None", "D": "ratio 1:2"}
    assert second["question"] == "Which modality?" and second["answer"] == "MRI"
    assert second["images"][0].size == (28, 840)  # thin image resized by the rule
    rejects = [json.loads(line) for line in open(out + ".rejects.jsonl")]
    assert [(r["position"], r["reason"]) for r in rejects] == [
        (3, "choice B has prefix 'X'"), (4, "answer_label not among options"), (5, "answer != options[answer_label]"),
        (6, "image file not found"), (7, "image does not decode (UnidentifiedImageError)"),
        (8, "image too large (decompression bomb)")]
    assert rejects[3]["image"] == str(tmp_path / "figures" / "missing.jpg")  # the reject names the file
    assert rejects[5]["image"].endswith("big.png") and "pixels" in rejects[5]["detail"]
    printed = capsys.readouterr().out
    assert "kept 3 rows" in printed and "duplicate questions (same question and answer): 1" in printed


def test_prepare_generic_rows(tmp_path, capsys):
    rows = make_toy_rows(4)
    rows[1]["options"] = "{not json"
    rows[2]["answer_label"] = "Z"
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({**r, "images": []}) + "\n" for r in rows))
    curate.main(["prepare", "--data", str(path), "--out", str(tmp_path / "out.parquet")])
    kept = Dataset.from_parquet(str(tmp_path / "out.parquet"))
    assert kept["dataset_index"] == [0, 3]
    reasons = [json.loads(line)["reason"] for line in open(tmp_path / "out.parquet.rejects.jsonl")]
    assert reasons[0].startswith("malformed (JSONDecodeError") and reasons[1] == "answer_label not among options"


def test_filter_band_and_easy_to_hard(tmp_path):
    rows = make_toy_rows(8)
    counts = [0, 1, 7, 8, 3, 16, 1, None]
    data = Dataset.from_list([{**r, "images": [], "pass_count": c} for r, c in zip(rows, counts)])
    data.save_to_disk(str(tmp_path / "pc"))
    curate.main(["filter", "--data", str(tmp_path / "pc"), "--out", str(tmp_path / "mid")])
    assert load_from_disk(str(tmp_path / "mid"))["dataset_index"] == [1, 2, 4, 6]
    curate.main(["filter", "--data", str(tmp_path / "pc"), "--out", str(tmp_path / "ordered"), "--easy-to-hard"])
    ordered = load_from_disk(str(tmp_path / "ordered"))
    assert ordered["pass_count"] == [7, 3, 1, 1]
    curate.main(["filter", "--data", str(tmp_path / "pc"), "--out", str(tmp_path / "all"), "--min", "0", "--max", "16"])
    assert len(load_from_disk(str(tmp_path / "all"))) == 7  # the row with no result is dropped


def test_toy_is_deterministic_and_needs_the_image(tmp_path):
    curate.main(["toy", "--out", str(tmp_path / "a"), "--train", "24", "--test", "8"])
    curate.main(["toy", "--out", str(tmp_path / "b"), "--train", "24", "--test", "8"])
    a, b = load_from_disk(str(tmp_path / "a" / "train")), load_from_disk(str(tmp_path / "b" / "train"))
    assert a["answer_label"] == b["answer_label"] and a["reasoning"] == b["reasoning"]
    assert all(x["images"][0].tobytes() == y["images"][0].tobytes() for x, y in zip(a, b))
    assert len(set(a["question"])) == 1 and len(set(a["options"])) == 1  # the text alone says nothing
    assert set(a["answer_label"]) == set("ABCD")
    assert len(load_from_disk(str(tmp_path / "a" / "all"))["test"]) == 8
    # the imperfect teacher of the sft split: right about B, C and D; H&E (A) mostly called C
    sft = load_from_disk(str(tmp_path / "a" / "sft"))
    assert [r["images"][0].tobytes() for r in sft] == [r["images"][0].tobytes() for r in a]
    assert all(s == t if t in "BCD" else s in "AC" for t, s in zip(a["answer_label"], sft["answer_label"]))
    said = "".join(s for t, s in zip(a["answer_label"], sft["answer_label"]) if t == "A")
    assert said == "AACCC" * (len(said) // 5) + "AACCC"[:len(said) % 5]


def test_passcount_resumes_and_is_rank_independent(sft_tiny, toy_data, tmp_path):
    args = ["passcount", "--model", sft_tiny, "--data", toy_data, "--rollout", "hf", "--max-new-tokens", "20"]
    one = cli(args + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    counts = load_from_disk(str(tmp_path / "one"))["pass_count"]
    assert all(0 <= c <= 16 for c in counts) and 0 < sum(counts) < 16 * len(counts)
    assert "pass counts of 8 rows (16 samples each)" in one.stdout
    two = cli(args + ["--out", str(tmp_path / "two")], ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert load_from_disk(str(tmp_path / "two"))["pass_count"] == counts
    # killed after its first chunk, then run again: nothing lost, nothing twice, same counts
    out = tmp_path / "killed"
    results = tmp_path / "killed.results.jsonl"
    kill_when("curate.py", args + ["--out", str(out), "--chunk-rows", "2"],
              lambda: results.exists() and len(results.read_text().splitlines()) >= 2, timeout=300)
    assert 2 <= len(results.read_text().splitlines()) < 8
    again = cli(args + ["--out", str(out), "--chunk-rows", "2"])
    assert again.returncode == 0 and "already done" in again.stdout, again.stderr[-3000:]
    keys = [json.loads(line)["key"] for line in results.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 8
    assert load_from_disk(str(out))["pass_count"] == counts


class Teacher(BaseHTTPRequestHandler):
    """Scripted chat completions: row 0 right on the 2nd sample, row 1 never right, row 2 an error
    (HTTP 500) on the first request, then right."""
    calls: dict = {}
    auth: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"][-1]["text"]
        row = int(text.split("lesion ")[1].split(" ")[0])
        Teacher.calls[row] = Teacher.calls.get(row, 0) + 1
        Teacher.auth.append(self.headers.get("Authorization"))
        if row == 2 and Teacher.calls[row] == 1:
            self.send_response(500)
            self.end_headers()
            return
        label = "ABCD"[row % 4]
        wrong = "ABCD"[(row + 1) % 4]
        answers = {0: [wrong, label, label], 1: [wrong, wrong, wrong], 2: [label, wrong, wrong]}[row]
        images = sum(part["type"] == "image_url" for part in body["messages"][0]["content"])
        choices = [{"message": {"content": f"<think>trace {row}.{k} with {images} image</think><answer>{a}</answer>"}}
                   for k, a in enumerate(answers[:body["n"]])]
        payload = json.dumps({"choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_distill_against_a_local_server(tmp_path):
    Dataset.from_list(make_toy_rows(3)).save_to_disk(str(tmp_path / "rows"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    args = ["distill", "--data", str(tmp_path / "rows"), "--out", str(tmp_path / "traces"),
            "--api-base", f"http://127.0.0.1:{server.server_port}/v1", "--backoff", "0.05", "--concurrency", "2"]
    key = {"OPENAI_API_KEY": "sk-test-secret"}
    try:
        run = cli(args + ["--teacher", "scripted"], env=key)
        calls = dict(Teacher.calls)
        same = cli(args + ["--teacher", "scripted"], env=key)  # every row done: nothing asked again
        other = cli(args + ["--teacher", "scripted-2"], env=key)  # another teacher's traces are not these
    finally:
        server.shutdown()
    assert run.returncode == 0, run.stderr[-3000:]
    traces = load_from_disk(str(tmp_path / "traces"))
    assert traces["dataset_index"] == [0, 2]
    assert traces["reasoning"] == ["trace 0.1 with 1 image", "trace 2.0 with 1 image"]
    assert calls == {0: 1, 1: 1, 2: 2}  # one retry, for the error
    assert same.returncode == 0 and other.returncode == 0, same.stderr[-3000:] + other.stderr[-3000:]
    assert Teacher.calls == {0: 2, 1: 2, 2: 3} and "3 records of other runs or settings kept, not used" in other.stdout
    assert set(Teacher.auth) == {"Bearer sk-test-secret"}
    assert "sk-test-secret" not in run.stdout + run.stderr
    assert "2 of 3 rows got a correct trace" in run.stdout
