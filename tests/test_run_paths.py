"""Workdirs may be local directories or buckets (`gs://...`): paths keep their scheme,
and the metrics file is written the same way whether appended to or rewritten whole."""

import json
import os

from mmelectra import workdir as workdir_lib
from mmelectra.metric_writer import MetricWriter


def test_bucket_workdirs_keep_their_scheme():
  assert workdir_lib.checkpoint_dir("gs://bucket/runs/base") == "gs://bucket/runs/base/checkpoints"
  assert os.fspath(workdir_lib.path("gs://bucket/runs/base/")).startswith("gs://bucket/runs/base")
  assert workdir_lib.eval_json_path("gs://bucket/r", 7) == "gs://bucket/r/eval/step_7.json"


def test_local_workdirs_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert workdir_lib.checkpoint_dir("run") == os.path.join(str(tmp_path), "run", "checkpoints")


def test_run_dir_finds_the_workdir_of_a_step_directory(tmp_path):
  (tmp_path / "checkpoints" / "40").mkdir(parents=True)
  (tmp_path / "config.json").write_text("{}")
  assert workdir_lib.run_dir(str(tmp_path / "checkpoints" / "40")) == str(tmp_path)
  assert workdir_lib.run_dir(str(tmp_path / "checkpoints")) == str(tmp_path)


def test_rewritten_metrics_file_equals_the_appended_one(tmp_path):
  files = {}
  for append in (True, False):
    workdir = tmp_path / str(append)
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')  # a resumed run's lines
    writer = MetricWriter(str(workdir), total_steps=10, initial_step=1, progress=False,
                          append=append)
    writer.write(2, {"loss": 2.5, "nan_metric": float("nan")})
    writer.write(3, {"loss": 2.0})
    writer.close()
    files[append] = (workdir / "metrics.jsonl").read_text()
  assert files[True] == files[False]
  assert [json.loads(l)["step"] for l in files[True].splitlines()] == [1, 2, 3]
  assert "nan_metric" not in files[True]
