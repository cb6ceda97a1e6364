"""--report-to: every metrics record also goes to tensorboard (read back with tensorboard's own reader)
or wandb (offline: its local run files), from rank 0 only; a resumed run continues the same tracker run."""
import json
import time
from argparse import Namespace

import data


def tracked(report_to: str) -> Namespace:
    return Namespace(report_to=report_to, run_name="demo-run", wandb_project="medvlt-tests", lr=0.5)


def log_and_resume(out, report_to: str) -> None:
    """Three steps (an evaluation at step 1), then a resume from step 2 that logs step 3 again."""
    first = data.Metrics(out, 0, tracked(report_to), rank=0)
    first.log({"step": 1, "loss": 2.0, "mfu": None, "device": "cpu", "eval": {"Avg.": {"lenient": 75.0}}})
    first.log({"step": 2, "loss": 1.5})
    first.log({"step": 3, "loss": 1.0})  # lost with the kill: logged again after the resume
    first.close()
    time.sleep(1.1)  # wandb names a run's directory by the second it starts: a resume within it would reuse it
    data.Metrics(out.parent / "other", 0, tracked(report_to), rank=1).log({"step": 1, "loss": 9.0})  # no-op
    resumed = data.Metrics(out, 2, tracked(report_to), rank=0)
    resumed.log({"step": 3, "loss": 0.5})
    resumed.close()
    assert [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2.0, 1.5, 0.5]
    assert not (out.parent / "other").exists()


def test_scalars_flatten_the_numbers():
    assert data.scalars({"step": 3, "loss": 1, "ok": True, "mfu": None, "eval": {"Avg.": {"lenient": 75}}}) == \
        {"loss": 1.0, "eval/Avg./lenient": 75.0}


def test_tensorboard_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    out.mkdir()
    log_and_resume(out, "tensorboard")
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0), (2, 1.5), (3, 0.5)]  # step 3 purged once
    assert [(e.step, e.value) for e in events.Scalars("eval/Avg./lenient")] == [(1, 75.0)]
    assert "mfu" not in events.Tags()["scalars"]
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"lr": 0.5' in config


def test_a_resume_before_the_first_checkpoint_starts_the_curves_again(tmp_path):
    """Killed before any checkpoint (SFT's first epoch), --resume starts at step 0: the killed run's
    records, its step-0 evaluation included, are dropped from metrics.jsonl and from tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    killed = data.Metrics(tmp_path, 0, tracked("tensorboard"), rank=0)
    for step, loss in enumerate([3.0, 2.0, 1.0]):
        killed.log({"step": step, "loss": loss})
    killed.close()
    resumed = data.Metrics(tmp_path, 0, tracked("tensorboard"), rank=0)
    resumed.log({"step": 0, "loss": 3.5})
    resumed.log({"step": 1, "loss": 2.5})
    resumed.close()
    assert [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3.5, 2.5]
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 3.5), (1, 2.5)]


def wandb_records(path) -> list:
    """The records of a wandb offline run file (run-ID.wandb): wandb's own protobuf Records in LevelDB's
    log framing (after a 7-byte file header: 32 KiB blocks of chunks, each with a 7-byte header of crc,
    little-endian length and type, 1 a whole record, 2-4 its first, middle and last parts)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, block, records, parts = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        parts += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(parts))
            parts = b""
    return records


def finished_records(path, timeout: float = 60.0) -> list:
    """wandb_records once the file ends with the run's exit record: wandb's finish() returns before its
    service has written everything (read at once, a loaded machine saw a resumed run's file empty)."""
    deadline = time.time() + timeout
    while True:
        try:
            records = wandb_records(path)
            if records and records[-1].WhichOneof("record_type") == "exit":
                return records
        except Exception:  # a record still being written
            pass
        assert time.time() < deadline, f"{path}: no exit record after {timeout:.0f} s"
        time.sleep(0.2)


def test_wandb_offline_run_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    out.mkdir()
    log_and_resume(out, "wandb")
    run_id = (out / "wandb_run_id").read_text()
    files = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # the resume continued the same run
    records = [r for f in files for r in finished_records(f)]
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {(r.run_id, r.display_name, r.project) for r in runs} == {(run_id, "demo-run", "medvlt-tests")}
    assert json.loads({i.key: i.value_json for i in runs[0].config.update}["lr"]) == 0.5
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["loss"]) for h in history] == [(1, 2), (2, 1.5), (3, 1), (3, 0.5)]
    assert history[0]["eval/Avg./lenient"] == 75 and "mfu" not in history[0]
