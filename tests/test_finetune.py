"""Fine-tuning: synthetic VQA questions, answer scores, LLRD, and VQA/retrieval fine-tuning
from a tiny pretrained run (exact loaded/new/dropped parameter lists, loss falls)."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import finetune_retrieval, finetune_vqa
from mmelectra import finetune
from mmelectra.data import synthetic_vqa
from mmelectra.data import vqa as vqa_data
from mmelectra.model import DEPLOYED_PARAM_PREFIXES
from mmelectra import workdir as workdir_lib


# Compile time dominates these tiny programs (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


# A hand-made scene: red circle top-left (small), blue square below it (large),
# green circle top-right (small). Shapes: circle=0, square=1; colours: red=0, green=1, blue=2.
SCENE = {
    "boxes": np.array([[0.0, 0.0, 0.2, 0.2], [0.1, 0.6, 0.4, 0.9], [0.7, 0.0, 0.9, 0.2]], np.float32),
    "shape": np.array([0, 1, 0]), "colour": np.array([0, 2, 1]), "size": np.array([0, 1, 0]),
}


def test_synthetic_questions_have_the_right_answers():
  q = {t: dict(v) for t, v in synthetic_vqa.candidate_questions(SCENE).items()}
  # "circle" names two objects, so no colour question about circles; the square is unique.
  assert q["colour"] == {"what colour is the square": "blue"}
  assert q["shape"] == {"what shape is the red one": "circle", "what shape is the blue one": "square",
                        "what shape is the green one": "circle"}
  assert q["size"]["is the blue square small or large"] == "large"
  assert q["count"]["count the shapes"] == "three"
  assert q["count"]["count the circles"] == "two" and q["count"]["count the crosses"] == "zero"
  assert q["position"]["where is the red circle relative to the blue square"] == "above"
  assert q["position"]["where is the red circle relative to the green circle"] == "left"
  assert q["position"]["where is the blue square relative to the green circle"] == "below"


def test_scene_questions_are_deterministic_distinct_and_mixed():
  a = synthetic_vqa.scene_questions(SCENE, seed=0, image_id=7, num_questions=5)
  assert a == synthetic_vqa.scene_questions(SCENE, seed=0, image_id=7, num_questions=5)
  assert a != synthetic_vqa.scene_questions(SCENE, seed=0, image_id=8, num_questions=5)
  assert len({x["question"] for x in a}) == 5
  assert {x["type"] for x in a} == set(synthetic_vqa.QUESTION_TYPES)  # one of each kind
  assert all(x["answers"] == [x["answers"][0]] * synthetic_vqa.ANNOTATORS for x in a)


def test_answer_vocabulary_soft_scores_and_accuracy():
  examples = [{"answers": ["red"] * 3 + ["blue"]}, {"answers": ["two"] * 2}, {"answers": ["blue"]}]
  vocab = vqa_data.answer_vocabulary(examples, top_k=2)
  assert vocab == ["red", "blue"]  # 3 red, 2 blue, 2 two: ties broken by text
  index = {a: i for i, a in enumerate(vocab)}
  np.testing.assert_allclose(vqa_data.soft_scores(["red"] * 3 + ["blue"], index), [1.0, 1 / 3])
  np.testing.assert_allclose(vqa_data.soft_scores(["two", "two"], index), [0.0, 0.0])
  assert vqa_data.vqa_accuracy(["a"] * 2 + ["b"] * 8, "a") == pytest.approx(2 / 3)
  assert vqa_data.vqa_accuracy(["a"] * 4, "a") == 1.0 and vqa_data.vqa_accuracy(["a"], "z") == 0.0


def test_layer_wise_learning_rate_multipliers():
  from mmelectra.model import EncoderConfig
  enc = EncoderConfig(hidden_size=8, num_heads=2, mlp_dim=8, l_layers=3, r_layers=1, x_layers=2)
  params = {"embeddings": {"w": 0}, "visual_embeddings": {"w": 0},
            "encoder": {"l_layer_0": {"w": 0}, "l_layer_2": {"w": 0}, "r_layer_0": {"w": 0},
                        "x_layer_0": {"w": 0}, "x_layer_1": {"w": 0}},
            "pooler": {"w": 0}, "itm_head": {"w": 0}, "vqa_head": {"a": {"w": 0}}}
  m = finetune.lr_multipliers(params, enc, layer_decay=0.5, head="vqa_head", head_multiplier=10.0)
  # 3 + 2 = 5 layers; the top (pooler, ITM head) is depth 6.
  assert m["pooler"]["w"] == 1.0 and m["itm_head"]["w"] == 1.0
  assert m["encoder"]["x_layer_1"]["w"] == 0.5 and m["encoder"]["x_layer_0"]["w"] == 0.25
  assert m["encoder"]["l_layer_2"]["w"] == 0.125 and m["encoder"]["l_layer_0"]["w"] == 0.5 ** 5
  assert m["encoder"]["r_layer_0"]["w"] == 0.5 ** 5
  assert m["embeddings"]["w"] == 0.5 ** 6 and m["vqa_head"]["a"]["w"] == 10.0


def _config(module, init_from, workdir_steps=12, **overrides):
  c = ml_collections.ConfigDict(module.get_config().to_dict())
  c.init_from = init_from
  c.update(total_steps=workdir_steps, log_every=4, batch_size=6)
  c.optimizer.update(warmup_steps=2, learning_rate=2e-3)
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  c.lock()
  return c


def test_the_vqa_presets_fine_tune_as_measured():
  # The recipe of docs/findings.md (sample efficiency; 2026-12-06 (g) for the quick one's
  # length): the encoder at 1e-4, the new head at 10x, and the quick preset long enough
  # that a pretrained encoder's lead over random initialisation shows.
  for arg, steps in ((None, 3000), ("runlocal", 1000)):
    c = finetune_vqa.get_config(arg)
    assert (c.optimizer.learning_rate, c.optimizer.head_learning_rate) == (1e-4, 1e-3)
    assert c.total_steps == steps
  assert finetune_retrieval.get_config("runlocal").total_steps == 500


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_vqa_finetune_loads_exactly_the_encoder_and_loss_falls(tiny_pretrained_run, tmp_path):
  workdir = str(tmp_path / "vqa")
  cfg = _config(finetune_vqa, tiny_pretrained_run, **{"vqa.questions_per_image": 2, "eval.batch_size": 6,
                                                      "optimizer.layer_decay": 0.8,
                                                      "optimizer.head_learning_rate": 4e-3})
  results = finetune.finetune(cfg, workdir)
  with open(os.path.join(workdir, "init_from.json")) as f:
    report = json.load(f)
  # Loaded: every deployed parameter, nothing else; new: the VQA head only; dropped: the
  # generator and the pretraining heads, nothing of the deployed model.
  assert report["loaded"] and all(n.split("/")[0] in DEPLOYED_PARAM_PREFIXES for n in report["loaded"])
  assert {n.split("/")[0] for n in report["loaded"]} == set(DEPLOYED_PARAM_PREFIXES)
  assert report["new"] and all(n.startswith("vqa_head/") for n in report["new"])
  dropped_tops = {n.split("/")[0] for n in report["dropped"]}
  assert {"generator", "rtd_head", "r2d_head", "generator_mlm_head"} <= dropped_tops
  assert not dropped_tops & set(DEPLOYED_PARAM_PREFIXES)
  assert not report["mismatched"]
  rows = _rows(workdir)
  assert rows[-1]["loss"] < 0.6 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
  assert results["split"] == "test" and results["num_examples"] == 10  # 5 scenes x 2 questions
  assert 0.0 <= results["vqa_acc"] <= 1.0
  assert any(k.startswith("vqa_acc_") for k in results)
  with open(os.path.join(workdir, "eval", "step_12.json")) as f:
    assert json.load(f)["vqa_acc"] == results["vqa_acc"]


def test_retrieval_finetune_with_hard_negatives(tiny_pretrained_run, tmp_path):
  workdir = str(tmp_path / "retrieval")
  cfg = _config(finetune_retrieval, tiny_pretrained_run, workdir_steps=4,
                **{"retrieval.num_candidates": 5, "eval.retrieval_pool": 5,
                   "eval.retrieval_pairs_per_call": 9, "init_mode": "random"})
  results = finetune.finetune(cfg, workdir)
  assert not os.path.exists(os.path.join(workdir, "init_from.json"))  # random: nothing loaded
  for key in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r10"):
    assert 0.0 <= results[key] <= 1.0
  assert results["t2i_r5"] == 1.0  # a pool of 5
  assert "itm_acc" in _rows(workdir)[-1]


def test_hard_negatives_are_never_the_positive():
  from conftest import micro_config, random_batch
  from mmelectra import sharding
  import dataclasses
  import flax.linen as nn
  from mmelectra.model import MMElectra, model_config_from
  config = micro_config()
  model = MMElectra(dataclasses.replace(model_config_from(config), generator=None))
  cfg = ml_collections.ConfigDict({"retrieval": {"num_candidates": 3}})
  task = finetune.Task(cfg, config, model, None, [], sharding.make_mesh(config), sharding.axis_rules(config))
  batch = random_batch(config, batch_size=6, seed=2)
  batch["text_ids"][4] = batch["text_ids"][1]  # a duplicate caption is no negative
  batch["example_mask"][5] = False  # nor is padding
  pos = np.zeros((6, 1), np.int32)
  params = nn.unbox(model.init(jax.random.key(0), batch["text_ids"], batch["text_mask"], batch["region_feats"],
                               batch["region_boxes"], batch["region_mask"], pos, pos)["params"])
  mine = jax.jit(lambda p, b, r: finetune.mine_hard_negatives(task, p, b, r, 3))
  for seed in range(2):
    hard_img, hard_txt, has_img, has_txt = mine(params, batch, jax.random.key(seed))
    for i in range(5):
      if has_img[i]:
        assert hard_img[i] != i and hard_img[i] != 5 and {i, int(hard_img[i])} != {1, 4}
      if has_txt[i]:
        assert hard_txt[i] != i and hard_txt[i] != 5 and {i, int(hard_txt[i])} != {1, 4}


def test_init_from_may_name_one_checkpoint(tiny_pretrained_run):
  step_dir = os.path.join(tiny_pretrained_run, "checkpoints", "3")
  assert os.path.isdir(step_dir)
  for path in (tiny_pretrained_run, os.path.join(tiny_pretrained_run, "checkpoints"), step_dir):
    assert workdir_lib.run_dir(path) == os.path.normpath(tiny_pretrained_run)
  assert workdir_lib.run_dir("/no/such/run") == "/no/such/run"  # load() then names it
  task, data = finetune.build_task(_config(finetune_vqa, step_dir, **{"vqa.questions_per_image": 1}))
  assert task.pre_config.model.hidden_size == 32 and set(data) == {"train", "test"}


def test_a_finetune_stopped_by_sigterm_resumes_to_the_uninterrupted_parameters(
    tiny_pretrained_run, tmp_path, monkeypatch):
  """The loop pretraining uses: a SIGTERM saves at the next step boundary, a rerun resumes
  from that checkpoint (state and data position) and ends where an uninterrupted run ends."""
  import signal

  import orbax.checkpoint as ocp

  from mmelectra import metric_writer

  cfg = _config(finetune_vqa, tiny_pretrained_run, workdir_steps=6,
                **{"vqa.questions_per_image": 2, "eval.batch_size": 6, "log_every": 1,
                   "checkpoint_every": 4, "max_checkpoints_to_keep": None})
  ref = str(tmp_path / "ref")
  want = finetune.finetune(cfg, ref)

  run = str(tmp_path / "run")
  real_advance = metric_writer.MetricWriter.advance

  def advance(self, step, last):
    real_advance(self, step, last)
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's notice during step 4's input

  monkeypatch.setattr(metric_writer.MetricWriter, "advance", advance)
  assert finetune.finetune(cfg, run) == {"step": 3, "preempted": True}
  monkeypatch.undo()
  assert sorted(ocp.path.step.checkpoint_steps(os.path.join(run, "checkpoints"))) == [3]
  got = finetune.finetune(cfg, run)  # the same command again: resumes at step 3

  assert got["vqa_acc"] == want["vqa_acc"]
  read = lambda w: ocp.StandardCheckpointer().restore(os.path.join(w, "checkpoints", "6", "state"))
  a, b = read(ref), read(run)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
  ref_rows, run_rows = _rows(ref), _rows(run)
  assert [r["step"] for r in run_rows] == list(range(1, 7))
  assert [r["loss"] for r in run_rows] == [r["loss"] for r in ref_rows]
