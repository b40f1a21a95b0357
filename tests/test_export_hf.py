"""Hugging Face LXMERT export/import: key coverage, parity, tokenizer, round trip."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from configs import pretrain  # noqa: E402
from conftest import tiny_data_cfg  # noqa: E402
from mmelectra import checkpoint, evaluate, export_hf, hf_params, hf_parity, import_hf  # noqa: E402
from mmelectra import model as model_lib  # noqa: E402
from mmelectra.data import pipeline, synthetic_scenes  # noqa: E402
from mmelectra import setup as setup_lib
from mmelectra import workdir as workdir_lib


def _config(data_dir, objective="electra"):
  c = ml_collections.ConfigDict(pretrain.get_config(f"size=tiny,objective={objective}").to_dict())
  c.model.update(hidden_size=32, num_heads=2, mlp_dim=64, l_layers=1, r_layers=1, x_layers=1,
                 generator_width_ratio=0.5, max_position=32)
  # Crops: scenes with fewer objects than max_regions give padded regions.
  c.data = tiny_data_cfg(data_dir, regions="crops")
  c.update(batch_size=8, total_steps=3)
  c.lock()
  return c


# Compile time dominates these tiny programs (conftest.fast_compile).
pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A micro electra run's workdir whose checkpoint (step 3) has every parameter moved off
  its initial value (LayerNorm scales, biases, all of them): the parity check must hold for
  any values, and the map must not get lucky on ones and zeros. (Training steps would do
  the same at the cost of compiling the train step; `make demo` exports a trained model.)
  """
  root = tmp_path_factory.mktemp("export")
  data = setup_lib.prepare_data(_config(str(root / "tfds")))
  config, special_ids = data.config, data.special_ids
  workdir = str(root / "run")
  os.makedirs(workdir)
  workdir_lib.save_config(config, workdir)
  setup = setup_lib.build_for_run(data, workdir)
  state = setup_lib.init_state(setup, seed=0)
  leaves, treedef = jax.tree.flatten(state["params"])
  rng = np.random.default_rng(0)
  state["params"] = jax.tree.unflatten(
      treedef, [np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32) for x in leaves])
  state["step"] = np.int32(3)
  manager = workdir_lib.training_manager(workdir)
  checkpoint.save(manager, 3, state)
  manager.wait_until_finished()
  manager.close()
  return workdir


@pytest.fixture(scope="module")
def restored(trained):
  """(setup, data context, step, {"params": ...}) of the run, as export reads it."""
  return evaluate.restore_workdir(trained)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("hf") / "hf")
  step, diffs = export_hf.export_workdir(trained, out, check=True, export_heads=True)
  return out, step, diffs


def test_param_map_is_exact_and_covers_both_hf_classes():
  for objective in ("electra", "mlm"):
    from conftest import micro_config
    config = micro_config(objective)
    cfg = model_lib.model_config_from(config)
    hf_config = hf_params.hf_config_from(cfg)
    hf_keys = {k: tuple(v.shape) for k, v in transformers.LxmertForPreTraining(hf_config).state_dict().items()}
    entries = hf_params.pretraining_param_map(cfg)
    setup = setup_lib.build(config, {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4})
    params = jax.tree.map(lambda s: np.random.default_rng(0).normal(size=s.shape).astype(np.float32),
                          setup.abstract_state["params"])
    sd = hf_params.params_to_hf(params, entries)
    # Every key of LxmertForPreTraining but the tied decoder (and, for electra, the MLM
    # head ELECTRA does not have) comes from a trained parameter, with the right shape.
    expected = {k for k in hf_keys if k != "cls.predictions.decoder.weight"}
    if objective == "electra":
      expected = {k for k in expected if not k.startswith("cls.predictions.")}
    assert set(sd) == expected
    assert {k: v.shape for k, v in sd.items()} == {k: hf_keys[k] for k in sd}
    # The map covers every deployed parameter (plus the MLM head for "mlm"), nothing else.
    mapped = {e.path for e in entries}
    leaves = {tuple(p.key for p in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    deployed = {p for p in leaves if p[0] in model_lib.DEPLOYED_PARAM_PREFIXES
                or (objective == "mlm" and p[0] == "mlm_head")}
    assert mapped == deployed
    # The layout changes are exact inverses.
    back = hf_params.params_from_hf(sd, entries)
    for path in mapped:
      np.testing.assert_array_equal(hf_params.get_path(back, path), hf_params.get_path(params, path))


def test_export_loads_in_both_classes_with_parity(restored, exported):
  out, step, diffs = exported
  assert step == 3
  hf_model, hf_pretraining = hf_parity.load_hf_models(out)  # raises on missing/unexpected keys
  cfg = hf_model.config
  saved = restored[0].config
  assert (cfg.l_layers, cfg.r_layers, cfg.x_layers) == (1, 1, 1)
  assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (32, 2, 64)
  assert cfg.visual_feat_dim == saved.model.visual_feat_dim == 4 * 4 * 3
  assert cfg.visual_pos_dim == 4 and cfg.vocab_size == saved.model.vocab_size
  # The tied decoder really is the word table.
  assert hf_pretraining.cls.predictions.decoder.weight.data_ptr() == \
      hf_pretraining.lxmert.embeddings.word_embeddings.weight.data_ptr()
  assert set(diffs) == {"random", "validation"}
  for name, d in diffs.items():
    assert set(d) == {"language_output", "vision_output", "pooled_output", "itm_logits"}
    for out_name, v in d.items():
      assert v <= hf_parity.PARITY_BOUND, (name, out_name, v)
  info = json.load(open(os.path.join(out, export_hf.EXPORT_INFO_FILE)))
  assert info["untrained_keys"] and all(k.startswith("cls.predictions.") for k in info["untrained_keys"])
  heads = load_file(os.path.join(out, export_hf.HEADS_FILE))
  assert heads["rtd_head.dense.weight"].shape == (32, 32) and heads["r2d_head.logit.weight"].shape == (1, 32)
  card = open(os.path.join(out, "README.md")).read()
  assert "(x1, y1, x2, y2)" in card and "crops" in card


def test_parity_inputs_have_padding_and_the_check_can_fail(restored, tmp_path):
  setup, data, _, state = restored
  batch = export_hf.validation_batch(data, 16)
  real = batch["example_mask"]
  assert (~batch["text_mask"][real]).any() and (~batch["region_mask"][real]).any()
  rand = hf_parity.random_inputs(setup.model.cfg, {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4},
                                 8, setup.config.data.max_text_len, setup.config.model.num_regions)
  assert (~rand["text_mask"]).any() and (~rand["region_mask"]).any()
  # A wrong map (key and value swapped in one layer) is caught.
  params = jax.device_get(state["params"])
  kv = params["encoder"]["x_layer_0"]["cross_attention"]["key_value"]
  kv["kernel"] = kv["kernel"][:, ::-1]
  bad = str(tmp_path / "bad")
  tok = pipeline.load_tokenizer(setup.config.data)
  export_hf.export(params, setup.config, tok, bad)
  diffs = hf_parity.verify(bad, setup.model, jax.device_get(state["params"]), {"random": rand})
  assert hf_parity.parity_failures(diffs)


def test_tokenizer_matches_mmelectra(restored, exported):
  out, _, _ = exported
  setup, _, _, _ = restored
  data = setup.config.data
  tok = pipeline.load_tokenizer(data)
  special = {k: tok.token_to_id(t) for k, t in
             dict(pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]").items()}
  source = synthetic_scenes.builder(data).as_data_source(split="validation")
  captions = [source[i]["caption"] for i in range(len(source))]
  captions = [c.decode() if isinstance(c, bytes) else c for c in captions]
  # Case, punctuation, an unknown word, and one longer than max_text_len (truncation).
  captions += ["There is a LARGE Red Circle, and a zebra!", " ".join(captions[:4])]
  hf_tok = transformers.LxmertTokenizerFast.from_pretrained(out)
  enc = hf_tok(captions, padding="max_length", max_length=data.max_text_len, truncation=True)
  for i, caption in enumerate(captions):
    ids, mask = pipeline.encode_caption(caption, tok, data.max_text_len, special)
    assert enc["input_ids"][i] == ids.tolist(), caption
    assert enc["attention_mask"][i] == mask.astype(int).tolist(), caption
  assert transformers.AutoTokenizer.from_pretrained(out)(captions[0])["input_ids"] == enc["input_ids"][0][
      :sum(enc["attention_mask"][0])]


def _random_hf_dir(path, tokenizer, visual_feat_dim, vocab_size):
  """A randomly initialised LxmertForPreTraining with LXMERT's extra heads, saved locally."""
  torch.manual_seed(0)
  hf_config = transformers.LxmertConfig(
      vocab_size=vocab_size, hidden_size=32, num_attention_heads=4, intermediate_size=48,
      l_layers=2, r_layers=1, x_layers=2, visual_feat_dim=visual_feat_dim,
      max_position_embeddings=40, num_qa_labels=7, num_object_labels=9, num_attr_labels=5)
  model = transformers.LxmertForPreTraining(hf_config)
  with torch.no_grad():  # move LayerNorms and biases off their initial 1/0
    for name, p in model.named_parameters():
      if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  # The run's own tokenizer, so the special ids are known.
  export_hf.save_hf_tokenizer(tokenizer, path, 32)
  return model.eval()


def test_import_reproduces_hf_and_round_trip_is_exact(restored, tmp_path):
  setup, _, _, _ = restored
  data_cfg = setup.config.data
  hf_dir = str(tmp_path / "hf_in")
  hf = _random_hf_dir(hf_dir, pipeline.load_tokenizer(data_cfg), setup.config.model.visual_feat_dim,
                      setup.config.model.vocab_size)
  workdir = str(tmp_path / "imported")
  base = _config(data_cfg.data_dir, objective="mlm")
  summary = import_hf.import_hf(hf_dir, workdir, base)
  assert "mlm_head/bias" in summary["loaded"] and "itm_head/kernel" in summary["loaded"]
  assert any(p.startswith("moc_head/") for p in summary["initialised"])
  assert any(k.startswith("answer_head.") for k in summary["hf_keys_not_used"])
  assert any(k.startswith("obj_predict_head.") for k in summary["hf_keys_not_used"])
  # mmelectra's encoder, restored from the imported workdir, reproduces the HF model.
  setup2, _, step, state = evaluate.restore_workdir(workdir)
  assert step == 0 and setup2.config.model.l_layers == 2 and setup2.config.model.num_heads == 4
  assert set(state) == {"params"} and "generator" not in state["params"]  # parameters only
  batch = hf_parity.random_inputs(setup2.model.cfg, {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4},
                                  6, data_cfg.max_text_len, setup2.config.model.num_regions, seed=1)
  diffs = hf_parity.max_abs_diffs(hf_parity.jax_outputs(setup2.model, state["params"], batch),
                                  hf_parity.hf_outputs(hf.lxmert, hf, batch), batch)
  assert not hf_parity.parity_failures({"random": diffs}), diffs
  # A new run can start from it with init_from: every encoder parameter comes across.
  params, report = workdir_lib.load_pretrained_params(workdir, jax.device_get(state["params"]))
  assert not report.new and not report.mismatched
  assert set(summary["loaded"]) <= set(report.loaded)
  # export(import(x)) == x: every tensor of the original that mmelectra keeps, bit for bit.
  out = str(tmp_path / "hf_out")
  export_hf.export_workdir(workdir, out)
  original, exported = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(
      os.path.join(out, "model.safetensors"))
  kept = {k for k in original if not k.startswith(("answer_head.", "obj_predict_head."))}
  assert set(exported) == kept
  for k in kept:
    np.testing.assert_array_equal(exported[k], original[k], err_msg=k)


def test_import_hf_command_works_from_outside_the_repository(exported, tmp_path):
  """`mmelectra import-hf` as installed: no `configs` on the path, its default config
  from the package (configs/ installs as mmelectra_configs)."""
  import subprocess
  import sys
  out_dir, _, _ = exported
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PYTHONPATH", None)
  result = subprocess.run([sys.executable, "-m", "mmelectra.main", "import-hf",
                           f"--hf_dir={out_dir}", "--workdir=imported"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "imported" in result.stdout and (tmp_path / "imported" / "checkpoints" / "0").is_dir()
  assert json.loads((tmp_path / "imported" / "config.json").read_text())["objective"] == "electra"
