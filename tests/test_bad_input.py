"""Bad input, re-runs and damaged files: each case ends in a clear error naming the row (position and
dataset_index), file or flag, or in a logged skip with its reason and a count, and loses nothing
already computed. Most need no model: the stages check flags, data and --out before anything loads.
The reward case is in test_reward.py, the SFT skip in a real run in test_sft.py, and evaluate.py's
keys in a real run in test_evaluate.py."""
import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from datasets import Dataset, load_from_disk
from PIL import Image

import checkpoints
import curate
import data
import evaluate
import grpo
import model
import rollout
import sft
from conftest import make_eval_rows, make_image, make_toy_rows, run_script


def save(rows: list[dict], path) -> str:
    Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


# ---- curate.py prepare ----

def test_prepare_rejects_each_bad_row_with_its_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # stands in for the 64 MP limit
    make_image(1, (150, 100)).save(tmp_path / "big.png")     # 15,000 pixels: over the limit, under PIL's 2x
    make_image(2, (60, 60)).save(tmp_path / "ok.png")
    good = {"question": "Which organ?", "options": {"A": "Liver", "B": "Lung"}, "answer_label": "B", "answer": "Lung",
            "dataset_name": "mine"}
    lines = [json.dumps({**good, "dataset_index": 10, "images": [str(tmp_path / "ok.png")]}),
             json.dumps({**good, "dataset_index": 11, "images": []}),
             json.dumps({**good, "dataset_index": 10, "question": "Another question?"}),  # repeats row 0's index
             json.dumps({**good, "dataset_index": "abc"}),
             '{"question": "cut off", "opt',                                            # not JSON
             json.dumps({**good, "dataset_index": 15, "question": "   "}),
             json.dumps({**good, "dataset_index": 16, "images": [str(tmp_path / "big.png")]}),
             json.dumps({**good, "dataset_index": 17, "images": [str(tmp_path / "gone.png")]}),
             json.dumps({**good, "dataset_index": 18.0})]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    curate.main(["prepare", "--data", str(tmp_path / "rows.jsonl"), "--out", out])
    assert load_from_disk(out)["dataset_index"] == [10, 11, 18]
    rejects = [json.loads(line) for line in open(out + ".rejects.jsonl")]
    assert [(r["position"], r["dataset_index"], r["reason"]) for r in rejects] == [
        (2, 10, "duplicate dataset_index"), (3, "abc", "dataset_index is not an integer"), (4, None, "not a JSON object"),
        (5, 15, "missing question"), (6, 16, "image too large (decompression bomb)"), (7, 17, "image file not found")]
    assert rejects[0]["first_position"] == 0 and rejects[2]["line"] == 5
    assert rejects[4]["image"] == str(tmp_path / "big.png") and "150x100" in rejects[4]["detail"]
    assert rejects[5]["image"] == str(tmp_path / "gone.png")
    assert "kept 3 rows" in capsys.readouterr().out

    # every row rejected: an error, no dataset, and the reasons written all the same
    (tmp_path / "bad.jsonl").write_text(lines[3] + "\n" + lines[4] + "\n")
    with pytest.raises(SystemExit, match="all 2 rows were rejected"):
        curate.main(["prepare", "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists() and len(open(tmp_path / "none.rejects.jsonl").readlines()) == 2

    # pmc-raw without its csv: the flag is named, not a TypeError
    with pytest.raises(SystemExit):
        curate.main(["prepare", "--source", "pmc-raw", "--images", str(tmp_path), "--out", str(tmp_path / "pmc")])
    assert "--csv" in capsys.readouterr().err


# ---- duplicate dataset_index: refused at every stage's start ----

def test_every_stage_refuses_a_repeated_dataset_index(tiny_path, tmp_path):
    rows = make_toy_rows(4)
    for row in rows:
        row.update(reasoning="a trace", pass_count=1)
    rows[3]["dataset_index"] = 1
    data = save(rows, tmp_path / "dup")
    out = str(tmp_path / "out")
    calls = [(sft.main, ["--model", tiny_path, "--data", data, "--out", out]),
             (grpo.main, ["--model", tiny_path, "--data", data, "--rollout", "hf", "--out", out]),
             (evaluate.main, ["--model", tiny_path, "--data", data, "--rollout", "hf", "--out", out]),
             (curate.main, ["passcount", "--model", tiny_path, "--data", data, "--rollout", "hf", "--out", out]),
             (curate.main, ["distill", "--api-base", "http://127.0.0.1:9/v1", "--data", data, "--out", out]),
             (curate.main, ["filter", "--data", data, "--out", out])]
    for main, argv in calls:
        with pytest.raises(SystemExit, match=r"row 3 \(dataset_index 1\) repeats row 1"):
            main(argv)
    assert not (tmp_path / "out").exists()  # stopped before writing anything


# ---- flags and columns, before anything loads ----

def test_flags_and_columns_are_checked_before_anything_loads(tiny_path, toy_data, tmp_path, capsys):
    for parse, flags, name in [(grpo.parse_args, ["--group-size", "0"], "--group-size"),
                               (grpo.parse_args, ["--lr=-1e-3"], "--lr"), (sft.parse_args, ["--lr=-1e-3"], "--lr"),
                               (grpo.parse_args, ["--resume", "--overwrite"], "--overwrite")]:
        with pytest.raises(SystemExit):
            parse(["--data", toy_data] + flags)
        assert name in capsys.readouterr().err
    missing = str(tmp_path / "runs" / "no-such-model")
    for main in (grpo.main, sft.main, evaluate.main):
        with pytest.raises(SystemExit, match=f"--model {missing}: no such model directory"):
            main(["--model", missing, "--data", toy_data, "--out", str(tmp_path / "out")])
    rows = make_toy_rows(4)
    no_options = save([{k: v for k, v in r.items() if k != "options"} for r in rows], tmp_path / "no-options")
    with pytest.raises(SystemExit, match="no column 'options'"):
        grpo.main(["--model", tiny_path, "--data", no_options, "--out", str(tmp_path / "out")])
    no_reasoning = save([{k: v for k, v in r.items() if k != "reasoning"} for r in rows], tmp_path / "no-reasoning")
    with pytest.raises(SystemExit, match="no column 'reasoning'"):
        sft.main(["--model", tiny_path, "--data", no_reasoning, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ---- sft.py: rows without a trace ----

def test_sft_stops_when_no_row_has_a_trace(tiny_path, toy_data, tmp_path):
    # make_toy_rows' reasoning is None, as prepare and filter leave it: training "<think> None </think>"
    # on them is what must not happen (a real run that skips some rows: test_sft.py)
    with pytest.raises(SystemExit, match="0 of 8 rows have a reasoning trace"):
        sft.main(["--model", tiny_path, "--data", toy_data, "--global-batch", "4", "--out", str(tmp_path / "out")])
    assert sft.rows_with_traces(Dataset.from_list([{"reasoning": r} for r in ("a", None, " ", "b")])) == [0, 3]


# ---- a re-run into an old run's --out ----

def test_training_refuses_a_non_empty_out(tiny_path, toy_data, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000003").mkdir(parents=True)
    metrics = "".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3))
    (out / "metrics.jsonl").write_text(metrics)
    (out / "notes.txt").write_text("mine")
    for main in (grpo.main, sft.main):
        with pytest.raises(SystemExit, match="pass --resume to continue it, --overwrite to replace it"):
            main(["--model", tiny_path, "--data", toy_data, "--out", str(out)])
    assert (out / "metrics.jsonl").read_text() == metrics and (out / "checkpoints" / "step_000003").is_dir()
    data.clear_outputs(out)  # what --overwrite does once every check has passed: the run's files, nothing else
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---- curate.py distill against a failing endpoint ----

class FailingTeacher(BaseHTTPRequestHandler):
    """mode "auth": HTTP 401 for everything. mode "down": row 1 always HTTP 500, the others right."""
    mode, calls = "auth", []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        row = int(body["messages"][0]["content"][-1]["text"].split("lesion ")[1].split(" ")[0])
        FailingTeacher.calls.append(row)
        if FailingTeacher.mode == "auth" or row == 1:
            self.send_response(401 if FailingTeacher.mode == "auth" else 500)
            self.end_headers()
            return
        payload = json.dumps({"choices": [{"message": {"content": f"<think>t{row}</think><answer>{'ABCD'[row % 4]}</answer>"}}]})
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


def test_distill_stops_on_auth_errors_and_never_records_a_failed_row(tmp_path):
    data = save(make_toy_rows(6), tmp_path / "rows")
    server = ThreadingHTTPServer(("127.0.0.1", 0), FailingTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    args = ["distill", "--data", data, "--teacher", "t", "--api-base", f"http://127.0.0.1:{server.server_port}/v1",
            "--samples", "1", "--retries", "1", "--backoff", "0.01", "--concurrency", "1"]
    results = tmp_path / "traces.results.jsonl"
    try:
        auth = run_script("curate.py", args + ["--out", str(tmp_path / "traces")], env={"OPENAI_API_KEY": "sk-wrong"})
        assert auth.returncode != 0 and "HTTP 401" in auth.stderr, auth.stdout + auth.stderr[-3000:]
        assert FailingTeacher.calls == [0], FailingTeacher.calls  # no retries, no other row asked after it
        assert not results.exists() or results.read_text() == ""     # nothing recorded as done
        FailingTeacher.mode, FailingTeacher.calls = "down", []
        down = run_script("curate.py", args + ["--out", str(tmp_path / "traces")])
    finally:
        server.shutdown()
    assert down.returncode != 0 and "HTTP 500" in down.stdout, down.stdout + down.stderr[-3000:]
    assert "1 rows got no answer from the teacher" in down.stderr
    assert FailingTeacher.calls.count(1) == 2  # tried, retried once, then left for a re-run
    assert sorted(json.loads(line)["key"] for line in results.read_text().splitlines()) == \
        ["toy/0", "toy/2", "toy/3", "toy/4", "toy/5"]
    assert load_from_disk(str(tmp_path / "traces"))["dataset_index"] == [0, 2, 3, 4, 5]


# ---- --resume past a damaged checkpoint ----

def small_model(tiny_path: str):
    """The tiny model's architecture with a 256-token vocabulary: checkpoints of a few MB."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(tiny_path)
    config.text_config.update(dict(vocab_size=256, pad_token_id=None, bos_token_id=None, eos_token_id=None))
    return AutoModelForImageTextToText.from_config(config)


def test_resume_falls_back_to_the_last_complete_checkpoint(tiny_path, processor, tmp_path, capsys):
    torch.manual_seed(0)
    m = small_model(tiny_path)
    optimizer = model.adamw(m, 1e-3, (0.9, 0.999), 0.0)
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.1 * step)
        optimizer.step()
        checkpoints.save_training_checkpoint(m, optimizer, processor, ckpts / f"step_{step:06d}", {"step": step},
                                             dtype=torch.float32)
    saved = {k: v.clone() for k, v in m.state_dict().items()}  # after step 3
    shard = ckpts / "step_000003" / "resume" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])                   # truncated (a full disk, a partial copy)
    (ckpts / "step_000002" / "resume" / ".metadata").unlink()  # missing
    fresh = small_model(tiny_path)
    fresh_optimizer = model.adamw(fresh, 1e-3, (0.9, 0.999), 0.0)
    assert checkpoints.load_training_checkpoint(fresh, fresh_optimizer, ckpts) == 1
    printed = capsys.readouterr().out
    assert "skipping" in printed and "step_000003: resume/__0_0.distcp has 1,000 bytes" in printed
    assert "step_000002: resume/.metadata is missing" in printed
    assert all(float(s["step"]) == 1 for s in fresh_optimizer.state.values())
    assert not all(torch.equal(fresh.state_dict()[k], saved[k]) for k in saved)  # step 1's weights, not step 3's
    assert checkpoints.complete_checkpoints(ckpts) == [ckpts / "step_000001"]  # what evaluate.py picks too


# ---- a results file whose last line a kill cut short ----

def test_torn_last_line_is_dropped_and_not_glued_to(tmp_path, capsys):
    rows = make_toy_rows(5)
    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "toy/0", "v": 0}\n{"key": "toy/1", "v": 1}\n{"key": "toy/2", "v"')  # killed mid-write
    asked = []

    def fn(share, positions):
        asked.extend(positions)
        return [{"v": p} for p in positions]

    records = data.resumable_map(fn, rows, path, chunk_rows=2)
    assert asked == [2, 3, 4] and [r["v"] for r in records] == [0, 1, 2, 3, 4]
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == [f"toy/{i}" for i in range(5)]  # every line parses
    assert "last line was cut short" in capsys.readouterr().out
    # a whole last record that only lacks its newline is kept, and the next one starts a line of its own
    path.write_text(path.read_text()[:-1])
    assert data.resumable_map(fn, make_toy_rows(6), path)[5] == {"key": "toy/5", "v": 5}
    assert len([json.loads(line) for line in path.read_text().splitlines()]) == 6


# ---- evaluate.py: results keyed on what produced them ----

class ScriptedEngine:
    """The rollout engine's interface, answering every row with `letter`; counts the rows asked."""

    def __init__(self, letter: str) -> None:
        self.letter, self.asked = letter, 0

    def cannot_run(self, row):
        return None

    def generate(self, rows, n, temperature, max_new_tokens, seed):
        self.asked += len(rows)
        return [[rollout.Completion([1], f"<think>x</think><answer>{self.letter}</answer>", [0.0], "stop")] for _ in rows]


def test_evaluation_results_never_mix_checkpoints_or_settings(tmp_path):
    run_dir, settings = tmp_path / "run", argparse.Namespace(rollout="hf", max_new_tokens=64, seed=42)
    tags = []
    for step in (2, 4):  # step 4 appears after a first evaluation of the run directory
        d = run_dir / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"weights %d" % step)
        checkpoints.write_trainer_state(d, {"step": step})
        tags.append(evaluate.result_tag(model.resolve_model(str(run_dir)), settings))
    old, new = tags
    shorter = evaluate.result_tag(model.resolve_model(str(run_dir)), argparse.Namespace(**{**vars(settings), "max_new_tokens": 32}))
    assert "step_000002@" in old["checkpoint"] and "step_000004@" in new["checkpoint"] and shorter != new
    rows = [r for r in make_eval_rows() if r["dataset_name"] == "pmc_vqa"]  # labels A and D
    results = tmp_path / "eval" / "results.jsonl"
    first = ScriptedEngine("A")
    assert evaluate.summarize(evaluate.run(first, rows, results, tag=old))["pmc_vqa"]["lenient"] == 50.0
    second = ScriptedEngine("D")  # the newer checkpoint: every row is run again, none of the old verdicts reused
    records = evaluate.run(second, rows, results, tag=new)
    assert second.asked == len(rows) and evaluate.summarize(records)["pmc_vqa"]["lenient"] == 50.0
    assert all(r["checkpoint"] == new["checkpoint"] and r["answer"] == "D" for r in records)
    again = ScriptedEngine("B")  # the old checkpoint again: its records are all there
    assert [r["answer"] for r in evaluate.run(again, rows, results, tag=old)] == ["A", "A"] and again.asked == 0
    assert len(results.read_text().splitlines()) == 2 * len(rows)  # both kept in the one file, each with its key
