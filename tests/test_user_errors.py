"""What a user types or feeds in: help, one-line errors (exit 2), config validation, run
directories no command damages, checkpoint fallback, VQA records, image modes, text that
is not UTF-8. The command-line checks run `mmelectra` from a directory outside the
repository, as an installed package runs."""

import io
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, micro_config
from configs import finetune_retrieval, finetune_vqa, pretrain
from mmelectra import config_lib, errors, evaluate, export_hf, import_hf, metric_writer, train
from mmelectra.data import bad_records, image_text_folder, images
from mmelectra.data import vqa as vqa_data
from mmelectra import workdir as workdir_lib

CONFIG = f"--config={ROOT}/configs/pretrain.py:size=tiny,runlocal"


def _cli(args, cwd, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PYTHONPATH", None)  # the installed package, not the checkout
  return subprocess.run([sys.executable, "-m", "mmelectra.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _error_line(result) -> str:
  """The one line a user error prints; no traceback before it."""
  assert result.returncode == errors.EXIT_USER_ERROR, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  return result.stderr.strip().splitlines()[-1]


# --- help and the command line ------------------------------------------------------------
def test_help_lists_commands_and_each_command_its_own_flags(tmp_path):
  out = _cli(["--help"], tmp_path)
  assert out.returncode == 0
  for command in ("train", "evaluate", "finetune", "export", "import-hf", "compile-check", "tokenizer"):
    assert f"  {command} " in out.stdout, command
  assert "mmelectra train --config=configs/pretrain.py" in out.stdout  # an example
  out = _cli(["export", "--help"], tmp_path)
  assert out.returncode == 0
  assert "--out" in out.stdout and "--verify (default: False)" in out.stdout
  assert "--config" not in out.stdout and "jax_" not in out.stdout  # only its own flags
  assert "--strict (default: False)" in _cli(["train", "--help"], tmp_path).stdout
  line = _error_line(_cli([], tmp_path))
  assert line == "mmelectra: error: expected a command"
  assert _error_line(_cli(["evalute", "--workdir=x"], tmp_path)) == \
      "mmelectra: error: unknown command 'evalute'; did you mean 'evaluate'?"


@pytest.mark.parametrize("overrides,named", [
    (["--config.checkpoint_every=0", "--config.batch_size=0", "--config.text_mask_rate=1.5",
      "--config.total_steps=-5"],
     ["config.checkpoint_every=0 (allowed: an integer >= 1)",
      "config.batch_size=0 (allowed: an integer >= 1)",
      "config.text_mask_rate=1.5 (allowed: a number in [0, 1))",
      "config.total_steps=-5 (allowed: an integer >= 1)"]),
    (["--config.checkpoint_evry=5"],
     ["--config.checkpoint_evry: the config has no field 'checkpoint_evry'; "
      "did you mean 'checkpoint_every'?"]),
])
def test_bad_config_values_are_one_line_before_anything_is_written(tmp_path, overrides, named):
  workdir = tmp_path / "run"
  line = _error_line(_cli(["train", CONFIG, f"--workdir={workdir}", *overrides], tmp_path))
  assert line.startswith("mmelectra train: error: "), line
  for text in named:
    assert text in line, (text, line)
  assert not workdir.exists()


def test_missing_workdir_is_one_line(tmp_path):
  line = _error_line(_cli(["evaluate", f"--workdir={tmp_path / 'nope'}"], tmp_path))
  assert "config.json not found" in line


def test_validate_accepts_every_preset_and_names_every_bad_key():
  for arg in ("", "runlocal", "size=base", "objective=mlm,regions=crops", "generator=tied"):
    config_lib.validate(pretrain.get_config(arg))
  for module in (finetune_vqa, finetune_retrieval):
    for arg in ("", "runlocal"):
      config_lib.validate(module.get_config(arg), config_lib.FINETUNE_RULES)
  c = ml_collections.ConfigDict(pretrain.get_config("runlocal").to_dict())
  c.update(max_nonfinite_steps=-1, region_mask_rate=1.0)
  c.model.update(generator="both", dropout_rate=float("nan"))
  c.mesh.update(data=-1, fsdp=-1)
  with pytest.raises(errors.InvalidInput) as e:
    config_lib.validate(c)
  for key in ("max_nonfinite_steps", "region_mask_rate", "model.generator", "model.dropout_rate"):
    assert f"config.{key}=" in str(e.value), key
  c.update(max_nonfinite_steps=0, region_mask_rate=0.15)
  c.model.update(generator="tied", dropout_rate=0.1)
  with pytest.raises(errors.InvalidInput, match="discriminator_clean_fraction=0 makes none"):
    config_lib.validate(ml_collections.ConfigDict({
        **pretrain.get_config("runlocal").to_dict(), "discriminator_clean_fraction": 0.0}))
  with pytest.raises(errors.InvalidInput, match="scores_clean=False leaves the clean .* makes none"):
    config_lib.validate(ml_collections.ConfigDict({
        **pretrain.get_config("runlocal").to_dict(), "discriminator_clean_fraction": 0.0,
        "discriminator_clean_uniform_masking": False, "discriminator_scores_clean": False}))
  for objective in ("objective=mlm", "objective=electra"):
    raw = pretrain.get_config(f"runlocal,{objective}").to_dict()
    raw["loss_weights"]["cmoc"] = 0.0  # no corrective MOC (mlm has none to begin with)
    with pytest.raises(errors.InvalidInput, match="cmoc_corrupted_weight=1.0 weighs .* there is none"):
      config_lib.validate(ml_collections.ConfigDict({**raw, "cmoc_corrupted_weight": 1.0}))
  with pytest.raises(errors.InvalidInput, match="itm_intact_fraction=0.25 reads .* objective='electra'"):
    config_lib.validate(ml_collections.ConfigDict({
        **pretrain.get_config("runlocal,objective=mlm").to_dict(), "itm_intact_fraction": 0.25}))
  with pytest.raises(errors.InvalidInput, match=r"config.cmoc_corrupted_weight=-2.0 \(allowed"):
    config_lib.validate(ml_collections.ConfigDict({
        **pretrain.get_config("runlocal").to_dict(), "cmoc_corrupted_weight": -2.0}))
  with pytest.raises(errors.InvalidInput, match="clean_floor=0.5 is where .* cannot be above .*"
                     "clean_fraction=0.25"):
    config_lib.validate(ml_collections.ConfigDict({
        **pretrain.get_config("runlocal").to_dict(), "discriminator_clean_fraction": 0.25,
        "discriminator_clean_floor": 0.5}))
  with pytest.raises(errors.InvalidInput, match="clean_floor=0.25 ends .*_decay_steps=0 gives it none"):
    config_lib.validate(ml_collections.ConfigDict({
        **pretrain.get_config("runlocal").to_dict(), "discriminator_clean_floor": 0.25,
        "discriminator_mask_hold_steps": 0, "discriminator_mask_decay_steps": 0}))
  with pytest.raises(errors.InvalidInput, match="at most one axis may be -1"):
    config_lib.validate(c)
  c.mesh.update(fsdp=1)
  c.model.update(num_heads=3)
  with pytest.raises(errors.InvalidInput, match="hidden_size=128 is not divisible"):
    config_lib.validate(c)
  c.model.update(num_heads=4)
  c.update(grad_accum_steps=3)
  c.data.update(max_text_len=600)
  with pytest.raises(errors.InvalidInput, match=r"batch_size=32 is not divisible by "
                     r"config.grad_accum_steps=3; config.data.max_text_len=600 exceeds"):
    config_lib.finalize(c)  # finalize validates first


# --- run directories ------------------------------------------------------------------------
def _files(workdir):
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def test_no_command_damages_a_run_it_was_not_asked_to_write(tiny_pretrained_run, tmp_path):
  run = str(tmp_path / "run")
  shutil.copytree(tiny_pretrained_run, run)
  before = _files(run)
  # export into the run itself (or any run) is refused before anything is restored
  for out in (run, tiny_pretrained_run):
    with pytest.raises(errors.InvalidInput, match="is a mmelectra run directory"):
      export_hf.export_workdir(run, out)
  # a resume with another model size is refused, and leaves every file as it was
  config = ml_collections.ConfigDict(workdir_lib.load_config(run).to_dict())
  config.model.hidden_size = 64
  with pytest.raises(errors.InvalidInput, match="does not match the config"):
    train.train_and_evaluate(config, run)
  # fine-tuning into a pretraining run, or importing over it, is refused
  with pytest.raises(errors.InvalidInput, match="holds a pretraining run"):
    workdir_lib.check_kind(run, "finetune")
  with pytest.raises(errors.InvalidInput, match="already holds a run"):
    import_hf.import_hf(str(tmp_path / "no_hf"), run, pretrain.get_config())
  assert _files(run) == before
  # pretraining into a Hugging Face export's directory is refused too
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({"model_type": "lxmert"}))
  with pytest.raises(errors.InvalidInput, match="not a mmelectra run's"):
    train.train_and_evaluate(config, str(hf))
  assert os.listdir(hf) == ["config.json"]


def test_resumed_metrics_keep_one_row_per_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)] + [{"step": 3, "loss": 9.0}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')  # cut by a kill
  writer = metric_writer.MetricWriter(str(tmp_path), total_steps=6, initial_step=2, progress=False)
  writer.write(3, {"loss": 3.5})
  writer.close()
  assert [json.loads(l) for l in path.read_text().splitlines()] == [
      {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.5}]


def test_an_unreadable_newest_checkpoint_falls_back_unless_strict(tiny_pretrained_run, tmp_path, caplog):
  run = str(tmp_path / "run")
  shutil.copytree(tiny_pretrained_run, run)
  ckpts = os.path.join(run, "checkpoints")
  shutil.copytree(os.path.join(ckpts, "3"), os.path.join(ckpts, "5"))
  # Every array file cut in half: evaluate reads the parameters only, so damage to the
  # optimizer state's files alone would (rightly) go unnoticed.
  data = os.path.join(ckpts, "5", "state", "ocdbt.process_0", "d")
  for name in os.listdir(data):
    os.truncate(os.path.join(data, name), os.path.getsize(os.path.join(data, name)) // 2)
  _, _, step, state = evaluate.restore_workdir(run)
  assert step == 3 and set(state) == {"params"}
  assert any("checkpoint step 5" in r.getMessage() and "cannot be read" in r.getMessage()
             for r in caplog.records)
  with pytest.raises(errors.InvalidInput, match=r"checkpoint step 5 in .* cannot be read"):
    evaluate.restore_workdir(run, strict=True)
  assert os.path.isdir(os.path.join(ckpts, "5"))  # read-only commands move nothing


# --- VQA JSONL ---------------------------------------------------------------------------
def _vqa_file(tmp_path, lines):
  Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red.png")
  path = tmp_path / "vqa.jsonl"
  path.write_bytes(b"".join(l if isinstance(l, bytes) else (l + "\n").encode() for l in lines))
  return str(path)


GOOD = json.dumps({"image": "red.png", "question": "what colour?", "answers": ["red"] * 3})
BAD_LINES = {
    "empty answers": (json.dumps({"image": "red.png", "question": "q?", "answers": []}),
                      "malformed_record", "'answers' must be a non-empty list"),
    "answers as a string": (json.dumps({"image": "red.png", "question": "q?", "answers": "red"}),
                            "malformed_record", "'answers' must be a non-empty list"),
    "not json": ('{"image": "red.png", "question": ', "malformed_record", "not JSON"),
    "missing image": (json.dumps({"image": "gone.png", "question": "q?", "answers": ["a"]}),
                      "missing_image_file", "gone.png does not exist"),
    "not utf-8": (b'{"image": "red.png", "question": "caf\xe9?", "answers": ["a"]}\n',
                  "malformed_record", "byte 0xe9 at column"),
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_vqa_jsonl_bad_lines_are_named_or_skipped(tmp_path, name):
  line, reason, message = BAD_LINES[name]
  path = _vqa_file(tmp_path, [GOOD, "", line, GOOD])
  with pytest.raises(bad_records.BadRecordError, match=rf"vqa.jsonl:3: .*{message}") as e:
    vqa_data._jsonl_examples(path, bad_records.Tally("error"))
  assert e.value.reason == reason
  tally = bad_records.Tally("skip")
  examples = vqa_data._jsonl_examples(path, tally)
  assert len(examples) == 2 and tally.counts == {reason: 1}


def test_a_bad_vqa_test_file_stops_finetuning_before_it_starts(tiny_pretrained_run, tmp_path):
  good = _vqa_file(tmp_path, [GOOD] * 4)
  bad = tmp_path / "test.jsonl"
  bad.write_text(GOOD + "\n" + BAD_LINES["missing image"][0] + "\n")
  config = ml_collections.ConfigDict(finetune_vqa.get_config("runlocal").to_dict())
  config.init_from = tiny_pretrained_run
  config.vqa.update(train_jsonl=good, test_jsonl=str(bad))
  workdir = tmp_path / "ft"
  with pytest.raises(bad_records.BadRecordError, match="test.jsonl:2: .*gone.png"):
    from mmelectra import finetune
    finetune.finetune(config, str(workdir))
  assert not workdir.exists()


# --- images and text ---------------------------------------------------------------------
def _png(array, mode=None) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array, mode).save(out, "PNG")
  return out.getvalue()


def test_sixteen_bit_png_keeps_its_full_range():
  ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
  rgb = images.decode_resized(_png(ramp), 32)
  assert rgb.dtype == np.uint8 and rgb.min() == 0 and rgb.max() == 255
  assert abs(rgb.mean() - 127.5) < 2  # PIL's own convert("RGB") gives ~254: all white


@pytest.mark.parametrize("mode,value,rgb", [
    ("1", 1, (255, 255, 255)), ("L", 100, (100, 100, 100)), ("LA", (100, 255), (100, 100, 100)),
    ("RGB", (10, 20, 30), (10, 20, 30)), ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ("RGBX", (10, 20, 30, 0), (10, 20, 30)), ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("HSV", (0, 255, 255), (255, 0, 0)), ("YCbCr", (76, 85, 255), (254, 0, 0)),
    ("I;16", 32896, (128, 128, 128)), ("I", 65535, (255, 255, 255)), ("F", 0.5, (128, 128, 128)),
    ("LAB", (255, 128, 128), (255, 255, 255)), ("La", (100, 255), (100, 100, 100)),
    ("RGBa", (10, 20, 30, 255), (10, 20, 30)),
])
def test_every_mode_becomes_8_bit_rgb(mode, value, rgb):
  out = np.asarray(images.to_rgb8(Image.new(mode, (4, 4), value)))
  assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
  assert np.abs(out[0, 0].astype(int) - rgb).max() <= 2, (mode, out[0, 0])


def test_palette_and_out_of_range_modes():
  p = Image.new("P", (4, 4), 1)
  p.putpalette([0, 0, 0, 250, 5, 5] + [0] * 762)
  assert tuple(np.asarray(images.to_rgb8(p))[0, 0]) == (250, 5, 5)
  for image in (Image.new("F", (4, 4), 3.0), Image.new("I", (4, 4), 70000)):
    with pytest.raises(images.UnreadableImageError, match="range|beyond 16 bits"):
      images.to_rgb8(image)


def test_caption_lines_that_are_not_utf8_are_bad_records(tmp_path):
  for name, good, bad, line in (
      ("captions.jsonl", b'{"image": "a.png", "caption": "a red cube"}\n',
       b'{"image": "b.png", "caption": "un caf\xe9"}\n', 2),
      ("captions.csv", b'image,caption\na.png,a red cube\n', b'b.png,un caf\xe9\n', 3)):
    path = tmp_path / name
    path.write_bytes(good + bad)
    with pytest.raises(bad_records.BadRecordError, match=rf"{name}:{line}: byte 0xe9 at column"):
      image_text_folder.parse_annotations(str(path), bad_records.Tally("error"))
    tally = bad_records.Tally("skip")
    splits = image_text_folder.parse_annotations(str(path), tally)
    assert [e[1] for e in splits["train"]] == ["a.png"] and tally.counts == {"malformed_record": 1}
