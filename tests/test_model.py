"""Model structure: logical axis names, generator/discriminator sharing, deployed subset."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SPECIAL_IDS, micro_config, random_batch
from mmelectra import errors, objectives, optim
from mmelectra import metrics as metrics_lib
from mmelectra.model import DEPLOYED_PARAM_PREFIXES, MMElectra, deployed_params, model_config_from
from mmelectra import setup as setup_lib

# Micro models: XLA's compile time dominates their run time.
pytestmark = pytest.mark.usefixtures("fast_compile")


def _jit_grad(f):
  # Jitted: JAX's op-by-op dispatch of the whole objective's gradient took about a minute
  # on CPU, one compile of it takes seconds.
  return jax.jit(jax.grad(f))


def _boxed_params(config):
  init = lambda r: setup_lib._init_state(r, model=MMElectra(model_config_from(config)),
                                         tx=optim.make_optimizer(config)[0], config=config)
  return jax.eval_shape(init, jax.random.key(0))["params"]


def test_every_parameter_has_logical_axis_names():
  for objective, moc in [("electra", "sample"), ("electra", "classify"), ("mlm", "regress")]:
    boxed = _boxed_params(micro_config(objective, moc))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
      assert isinstance(leaf, nn.LogicallyPartitioned), leaf
      assert len(leaf.names) == leaf.value.ndim and all(n is not None for n in leaf.names)


def test_generator_is_narrower_and_shares_the_embeddings():
  for kind in ("per_modality", "crossmodal"):
    config = micro_config(**{"model.generator": kind})
    params = nn.unbox(_boxed_params(config))
    hidden = config.model.hidden_size
    gen_width = params["generator_projection"]["kernel"].shape[1]
    assert gen_width < hidden
    assert params["generator"]["l_layer_0"]["ffn"]["intermediate"]["kernel"].shape[0] == gen_width
    layers = sorted(params["generator"])
    if kind == "per_modality":  # L + X text layers, R + X region layers, no cross layer
      assert layers == ["l_layer_0", "l_layer_1", "r_layer_0", "r_layer_1"]
    else:
      assert layers == ["l_layer_0", "r_layer_0", "x_layer_0"]
  # One word table and one visual projection in the whole tree.
  paths = ["/".join(str(getattr(p, "key", p)) for p in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert sum("word_embeddings" in p for p in paths) == 1
  assert sum("visn_fc" in p for p in paths) == 2  # kernel + bias


@pytest.mark.parametrize("trains_embeddings", [True, False])
def test_generator_reads_the_discriminators_embedding_arrays(trains_embeddings):
  config = micro_config(generator_trains_embeddings=trains_embeddings)
  setup = setup_lib.build(config, SPECIAL_IDS)
  state = setup_lib.init_state(setup, 0)
  batch = jax.tree.map(jnp.asarray, random_batch(config))

  # Only the generator's losses (MLM, MOC).
  weights = {k: 0.0 for k in setup.ocfg.weights} | {"mlm": 1.0, "moc": 1.0}
  only_generator = dataclasses.replace(setup.ocfg, loss_weights=tuple(weights.items()))
  gen_loss = lambda p, ocfg=only_generator: objectives.compute_losses(
      setup.model, p, batch, jax.random.key(0), ocfg, True)[0]

  # By default (ELECTRA) their gradient reaches the shared word table and visual projection
  # (the same arrays the discriminator reads); with generator_trains_embeddings=False it
  # stops there.
  grads = _jit_grad(gen_loss)(state["params"])
  total = lambda tree: sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(tree))
  for name in objectives.SHARED_EMBEDDINGS:
    assert (total(grads[name]) > 0) == trains_embeddings, name
  assert (float(jnp.abs(grads["embeddings"]["word_embeddings"]["embedding"]).sum()) > 0) == trains_embeddings
  assert (float(jnp.abs(grads["visual_embeddings"]["visn_fc"]["kernel"]).sum()) > 0) == trains_embeddings
  # The generator's own layers and heads train either way ...
  for name in ("generator_projection", "generator", "generator_mlm_head", "generator_moc_head"):
    assert total(grads[name]) > 0, name
  # ... and not the discriminator's own layers or heads.
  assert float(jnp.abs(grads["rtd_head"]["logit"]["kernel"]).sum()) == 0
  assert float(jnp.abs(grads["encoder"]["l_layer_0"]["ffn"]["output"]["kernel"]).sum()) == 0
  # The switch changes the gradient only, not the loss.
  flipped = dataclasses.replace(only_generator, generator_trains_embeddings=not trains_embeddings)
  np.testing.assert_allclose(float(jax.jit(gen_loss)(state["params"])),
                             float(jax.jit(gen_loss, static_argnums=1)(state["params"], flipped)),
                             rtol=1e-6)


def test_per_modality_generator_reads_one_modality_per_head():
  """MLM logits do not move when the image changes; MOC outputs do not move when the
  text changes. The crossmodal generator's do (the control)."""
  b = random_batch(micro_config())
  other = random_batch(micro_config(), seed=1)
  positions = np.array([[1, 2]] * 8, np.int32)
  for kind in ("per_modality", "crossmodal"):
    config = micro_config(**{"model.generator": kind})
    setup = setup_lib.build(config, SPECIAL_IDS)
    params = setup_lib.init_state(setup, 0)["params"]
    @jax.jit
    def generate(text, image):
      return setup.model.apply(
          {"params": params}, text["text_ids"], text["text_mask"], image["region_feats"],
          image["region_boxes"], image["region_mask"], positions, positions, True,
          method=MMElectra.generate)

    mlm, moc = generate(b, b)
    mlm_new_image, moc_new_image = generate(b, other)
    mlm_new_text, moc_new_text = generate(other, b)
    image_moves_mlm = float(jnp.abs(mlm_new_image - mlm).max())
    text_moves_moc = float(jnp.abs(moc_new_text - moc).max())
    assert float(jnp.abs(moc_new_image - moc).max()) > 1e-3  # each head reads its own input
    assert float(jnp.abs(mlm_new_text - mlm).max()) > 1e-3
    if kind == "per_modality":
      assert image_moves_mlm == 0.0 and text_moves_moc == 0.0
    else:
      assert image_moves_mlm > 1e-4 and text_moves_moc > 1e-4


def test_corrective_lm_trains_the_discriminator_to_predict_the_original_words_and_regions():
  config = micro_config(**{"loss_weights.clm": 1.0, "loss_weights.cmoc": 1.0})
  params = nn.unbox(_boxed_params(config))
  # Its own heads at full width; the word table stays the one shared table.
  assert params["clm_head"]["transform"]["kernel"].shape[0] == config.model.hidden_size
  assert params["cmoc_head"]["transform"]["kernel"].shape[0] == config.model.hidden_size
  off = micro_config(**{"loss_weights.clm": 0.0, "loss_weights.cmoc": 0.0, "model.rtd_reads_clm": False})
  assert not {"clm_head", "cmoc_head"} & set(nn.unbox(_boxed_params(off)))
  setup = setup_lib.build(config, SPECIAL_IDS)
  state = setup_lib.init_state(setup, 0)
  batch = jax.tree.map(jnp.asarray, random_batch(config))
  ocfg = setup.ocfg
  weights = {k: 0.0 for k in ocfg.weights} | {"clm": 1.0}
  only_clm = objectives.ObjectiveConfig(**{**ocfg.__dict__, "loss_weights": tuple(weights.items())})
  clm_fn = lambda p: objectives.compute_losses(setup.model, p, batch, jax.random.key(0), only_clm, True)
  loss, sums = jax.jit(clm_fn)(state["params"])
  # At initialisation the head is near uniform over the vocabulary.
  np.testing.assert_allclose(float(loss), np.log(config.model.vocab_size), rtol=0.1)
  assert "clm_acc" in sums and "clm_loss" in sums
  grads = _jit_grad(lambda p: clm_fn(p)[0])(state["params"])
  # It trains the fusion encoder (cross layers included) and not the generator.
  assert float(jnp.abs(grads["encoder"]["x_layer_0"]["lang_ffn"]["output"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["generator"]["l_layer_0"]["ffn"]["output"]["kernel"]).sum()) == 0
  assert float(jnp.abs(grads["cmoc_head"]["output"]["kernel"]).sum()) == 0
  # The region half: the vision stream's FFN and its own head, not the generator.
  only_cmoc = objectives.ObjectiveConfig(**{**ocfg.__dict__, "loss_weights": tuple(
      ({k: 0.0 for k in ocfg.weights} | {"cmoc": 1.0}).items())})
  cmoc_fn = lambda p: objectives.compute_losses(setup.model, p, batch, jax.random.key(0), only_cmoc, True)
  loss, sums = jax.jit(cmoc_fn)(state["params"])
  assert "cmoc_acc" in sums and float(loss) > 0
  grads = _jit_grad(lambda p: cmoc_fn(p)[0])(state["params"])
  assert float(jnp.abs(grads["encoder"]["x_layer_0"]["visn_ffn"]["output"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["cmoc_head"]["output"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["generator"]["r_layer_0"]["ffn"]["output"]["kernel"]).sum()) == 0


def test_rtd_reading_the_corrective_lm_adds_minus_log_p_of_the_word_read():
  on = micro_config()
  assert on.model.rtd_reads_clm and on.loss_weights.clm > 0  # the per-modality default
  off = micro_config(**{"model.rtd_reads_clm": False})
  setup = setup_lib.build(on, SPECIAL_IDS)
  params = setup_lib.init_state(setup, 0)["params"]
  b = random_batch(on)
  positions = jnp.asarray(np.tile(np.arange(1, 4), (on.batch_size, 1)), jnp.int32)

  def discriminate(model):
    return jax.jit(lambda p: model.apply(
        {"params": p}, b["text_ids"], b["text_mask"], b["region_feats"], b["region_boxes"],
        b["region_mask"], True, text_positions=positions, method=MMElectra.discriminate))(params)

  read = discriminate(setup.model)
  alone = discriminate(MMElectra(model_config_from(off)))  # the same parameters, head only
  full_clm = jax.jit(lambda p: setup.model.apply(
      {"params": p}, b["text_ids"], b["text_mask"], b["region_feats"], b["region_boxes"],
      b["region_mask"], True, text_positions=jnp.asarray(np.tile(np.arange(on.data.max_text_len),
                                                               (on.batch_size, 1)), jnp.int32),
      method=MMElectra.discriminate))(params)["clm"]
  log_p = np.take_along_axis(np.asarray(jax.nn.log_softmax(full_clm, -1)),
                             np.asarray(b["text_ids"])[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(read["rtd"]), np.asarray(alone["rtd"]) - log_p, atol=1e-4)
  # The corrective LM at the masked slots is the same head either way.
  np.testing.assert_allclose(np.asarray(read["clm"]), np.asarray(alone["clm"]), atol=1e-5)
  with pytest.raises(errors.InvalidInput, match="rtd_reads_clm"):
    model_config_from(micro_config(**{"loss_weights.clm": 0.0}))


def test_contrastive_alignment_reads_each_modality_alone_and_trains_below_the_cross_layers():
  config = micro_config(**{"loss_weights.itc": 1.0})
  setup = setup_lib.build(config, SPECIAL_IDS)
  params = setup_lib.init_state(setup, 0)["params"]
  b, other = random_batch(config), random_batch(config, seed=1)
  @jax.jit
  def embed(text, image):
    return setup.model.apply({"params": params}, text["text_ids"], text["text_mask"],
                             image["region_feats"], image["region_boxes"], image["region_mask"],
                             method=MMElectra.dual_encode)

  text, image, scale = embed(b, b)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(text), axis=-1), 1.0, rtol=1e-5)
  assert text.shape == (8, config.model.contrastive_dim)
  np.testing.assert_allclose(float(scale), 1 / 0.07, rtol=1e-5)
  # The text embedding does not read the image, nor the image embedding the text.
  text_new_image, image_new_image, _ = embed(b, other)
  text_new_text, image_new_text, _ = embed(other, b)
  assert float(jnp.abs(text_new_image - text).max()) == 0.0
  assert float(jnp.abs(image_new_text - image).max()) == 0.0
  assert float(jnp.abs(image_new_image - image).max()) > 1e-3
  ocfg = setup.ocfg
  only_itc = objectives.ObjectiveConfig(**{**ocfg.__dict__, "loss_weights": tuple(
      ({k: 0.0 for k in ocfg.weights} | {"itc": 1.0}).items())})
  batch = jax.tree.map(jnp.asarray, b)
  loss_fn = lambda p: objectives.compute_losses(setup.model, p, batch, jax.random.key(0), only_itc, True)
  loss, sums = jax.jit(loss_fn)(params)
  assert "itc_acc" in sums and float(loss) > 0
  grads = _jit_grad(lambda p: loss_fn(p)[0])(params)
  assert float(jnp.abs(grads["encoder"]["l_layer_0"]["ffn"]["output"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["encoder"]["r_layer_0"]["ffn"]["output"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["encoder"]["x_layer_0"]["lang_ffn"]["output"]["kernel"]).sum()) == 0
  assert float(jnp.abs(grads["itc_log_scale"])) > 0


def test_discriminator_mask_fraction_reads_masked_slots_masked_on_a_schedule():
  config = micro_config(discriminator_mask_fraction=1.0, discriminator_region_mask_fraction=1.0,
                        discriminator_mask_decay_steps=100,
                        **{"loss_weights.clm": 1.0, "loss_weights.cmoc": 1.0})
  setup = setup_lib.build(config, SPECIAL_IDS)
  ocfg = setup.ocfg
  fraction = lambda step, o=ocfg: float(objectives.discriminator_mask_fraction(
      o, None if step is None else jnp.asarray(step)))
  assert [fraction(0), fraction(50), fraction(100), fraction(500), fraction(None)] == [1.0, 0.5, 0.0, 0.0, 0.0]
  held = dataclasses.replace(ocfg, discriminator_mask_hold_steps=40)
  assert [fraction(s, held) for s in (0, 40, 90, 140)] == [1.0, 1.0, 0.5, 0.0]
  # A floor: the share falls to it, not to 0, and evaluation (step None) reads it.
  floor = lambda step: float(objectives.discriminator_mask_fraction(
      held, None if step is None else jnp.asarray(step), 1.0, 0.25))
  assert [floor(s) for s in (0, 40, 90, 140, 1000, None)] == [1.0, 1.0, 0.625, 0.25, 0.25, 0.25]
  params = setup_lib.init_state(setup, 0)["params"]
  batch = jax.tree.map(jnp.asarray, random_batch(config))

  def sums_at(step):
    return objectives.compute_losses(setup.model, params, batch, jax.random.key(0), ocfg, True,
                                     step=jnp.asarray(step))[1]

  start, end = sums_at(0), sums_at(100)
  # At the start every masked word and region is read masked, as the baseline reads them:
  # nothing counts as replaced, and RTD/R2D see only untouched positions.
  assert float(start["text_replaced_frac"][1]) == 0 and float(start["region_replaced_frac"][1]) == 0
  assert float(start["rtd_loss"][1]) < float(end["rtd_loss"][1])
  assert float(start["r2d_loss"][1]) < float(end["r2d_loss"][1])
  # At the end it is ELECTRA: every masked slot holds the generator's sample.
  assert float(end["text_replaced_frac"][1]) > 0 and float(end["region_replaced_frac"][1]) > 0
  # The corrective heads are trained at every masked slot either way.
  assert float(start["clm_loss"][1]) == float(end["clm_loss"][1]) > 0
  # Words and regions have a share each: every masked word replaced, no region.
  for words, regions in ((0.0, 1.0), (1.0, 0.0)):
    split = dataclasses.replace(ocfg, discriminator_mask_fraction=words,
                                discriminator_region_mask_fraction=regions,
                                discriminator_mask_decay_steps=0)
    sums = objectives.compute_losses(setup.model, params, batch, jax.random.key(0), split, True)[1]
    assert (float(sums["text_replaced_frac"][1]) > 0) == (words == 0.0)
    assert (float(sums["region_replaced_frac"][1]) > 0) == (regions == 0.0)


@pytest.fixture(scope="module")
def corrective():
  """(config, setup, params) of the micro electra with the corrective LM/MOC on and every
  masked region replaced: the clean-share and witness tests' model."""
  config = micro_config(discriminator_region_mask_fraction=0.0,
                        **{"loss_weights.clm": 1.0, "loss_weights.cmoc": 1.0})
  setup = setup_lib.build(config, SPECIAL_IDS)
  return config, setup, setup_lib.init_state(setup, 0)["params"]


def _sums_with(setup, params, batch, **fields):
  """The metric sums of one batch under the run's objective config with `fields` changed."""
  ocfg = dataclasses.replace(setup.ocfg, **fields)
  return objectives.compute_losses(setup.model, params, batch, jax.random.key(0), ocfg, True)[1]


def test_clean_pairs_are_read_as_the_baselines_masked_pair(corrective):
  config, setup, params = corrective
  batch = jax.tree.map(jnp.asarray, random_batch(config))

  sums_with = lambda fraction: _sums_with(setup, params, batch, discriminator_clean_fraction=fraction)
  none, every = sums_with(0.0), sums_with(1.0)
  # Every example clean: no masked word or region is replaced, so RTD and R2D count only the
  # untouched positions; the corrective heads still train at every masked slot.
  assert float(none["text_replaced_frac"][1]) > 0 and float(none["region_replaced_frac"][1]) > 0
  assert float(every["text_replaced_frac"][1]) == 0 and float(every["region_replaced_frac"][1]) == 0
  assert float(every["rtd_loss"][1]) < float(none["rtd_loss"][1])
  assert float(every["r2d_loss"][1]) < float(none["r2d_loss"][1])
  assert float(every["clm_loss"][1]) == float(none["clm_loss"][1]) > 0
  assert float(every["cmoc_loss"][1]) == float(none["cmoc_loss"][1]) > 0
  # With clean examples the corrective LM/MOC and ITM are also reported per kind of pair:
  # the two kinds add up to the whole, and an all-clean batch has no corrupted part.
  assert not any(k.startswith(("clean_", "corrupted_")) for k in none)
  half = sums_with(0.5)
  for name in ("clm_loss", "clm_acc", "cmoc_loss", "cmoc_acc", "itm_acc"):
    np.testing.assert_allclose(np.asarray(every[f"clean_{name}"]), np.asarray(every[name]))
    assert float(every[f"corrupted_{name}"][1]) == 0, name
    parts = np.asarray(half[f"clean_{name}"]) + np.asarray(half[f"corrupted_{name}"])
    np.testing.assert_allclose(parts, np.asarray(half[name]), rtol=1e-6, err_msg=name)
    assert 0 < float(half[f"clean_{name}"][1]) < float(half[name][1]), name
  # On a schedule the clean share holds, then hands over to corrupted pairs.
  held = dataclasses.replace(setup.ocfg, discriminator_clean_fraction=1.0,
                             discriminator_mask_hold_steps=40, discriminator_mask_decay_steps=20)
  at = {step: objectives.compute_losses(setup.model, params, batch, jax.random.key(0), held,
                                        True, step=jnp.asarray(step))[1] for step in (40, 60)}
  assert float(at[40]["text_replaced_frac"][1]) == float(at[40]["region_replaced_frac"][1]) == 0
  assert float(at[60]["text_replaced_frac"][1]) > 0 and float(at[60]["region_replaced_frac"][1]) > 0
  # With a floor the hand-over stops there: long after it a quarter of the examples stay
  # clean, in training and in evaluation (step None); without one, none.
  wide = jax.tree.map(jnp.asarray, random_batch(config, batch_size=256))
  clean_share = lambda ocfg, step: float(objectives._prepare(
      wide, jax.random.key(1), ocfg, None if step is None else jnp.asarray(step)).clean.mean())
  floored = dataclasses.replace(held, discriminator_clean_floor=0.25)
  assert clean_share(held, 1000) == clean_share(held, None) == 0
  assert 0.15 < clean_share(floored, 1000) < 0.35 and 0.15 < clean_share(floored, None) < 0.35


def test_clean_pairs_can_leave_rtd_and_r2d(corrective):
  config, setup, params = corrective
  batch = jax.tree.map(jnp.asarray, random_batch(config, batch_size=32))

  sums_with = lambda fraction, scores_clean: _sums_with(
      setup, params, batch, discriminator_clean_fraction=fraction,
      discriminator_scores_clean=scores_clean)

  # Every example clean and left out: RTD and R2D have no target at all; the corrective
  # heads and ITM read the same pairs as when RTD/R2D score them.
  scored, left = sums_with(1.0, True), sums_with(1.0, False)
  assert float(scored["rtd_loss"][1]) > 0 and float(scored["r2d_loss"][1]) > 0
  assert float(left["rtd_loss"][1]) == float(left["r2d_loss"][1]) == 0
  for name in ("clm_loss", "cmoc_loss", "itm_loss", "mlm_loss", "moc_loss"):
    np.testing.assert_allclose(np.asarray(left[name]), np.asarray(scored[name]), err_msg=name)
  total = lambda sums: float(sums["loss"][0] / sums["loss"][1])
  dropped = sum(setup.ocfg.weights[k] * float(scored[f"{k}_loss"][0] / scored[f"{k}_loss"][1])
                for k in ("rtd", "r2d"))
  assert dropped > 0
  np.testing.assert_allclose(total(left), total(scored) - dropped, rtol=1e-5)
  # Half clean: only the clean examples leave; the corrupted ones keep every target.
  half_scored, half_left = sums_with(0.5, True), sums_with(0.5, False)
  for name in ("rtd_loss", "r2d_loss"):
    assert 0 < float(half_left[name][1]) < float(half_scored[name][1]), name
  np.testing.assert_allclose(float(half_left["text_replaced_frac"][1]),
                             float(half_scored["text_replaced_frac"][1]))
  # Without clean examples the switch changes nothing.
  np.testing.assert_allclose(np.asarray(sums_with(0.0, False)["rtd_loss"]),
                             np.asarray(sums_with(0.0, True)["rtd_loss"]))


def test_intact_pairs_are_read_unmasked_and_only_uncontradicted_pairs_teach_itm(corrective):
  config, setup, params = corrective
  batch = jax.tree.map(jnp.asarray, random_batch(config, batch_size=32))
  rng = jax.random.key(0)
  none = _sums_with(setup, params, batch)
  every = _sums_with(setup, params, batch, itm_intact_fraction=1.0)
  # Every example intact: the discriminator finds nothing replaced or masked, so RTD, R2D
  # and the corrective heads count nothing; the generator's losses are untouched and ITM
  # counts every example.
  for name in ("rtd_loss", "r2d_loss", "clm_loss", "cmoc_loss"):
    assert float(none[name][1]) > 0 and float(every[name][1]) == 0, name
  for name in ("mlm_loss", "moc_loss"):
    np.testing.assert_allclose(np.asarray(every[name]), np.asarray(none[name]), err_msg=name)
  assert float(every["itm_loss"][1]) == float(none["itm_loss"][1]) > 0
  # ... and ITM reads the original pair: its loss is the encoder's on the unmasked pair.
  x = objectives._prepare(batch, jax.random.split(rng, 5)[0], setup.ocfg)
  embeds, _ = objectives._region_embeddings(setup.model, params, x)
  out = setup.model.apply({"params": params}, x.text_ids, x.text_mask, None, x.boxes, x.region_mask,
                          True, region_embeds=embeds, method=MMElectra.discriminate)
  expected = metrics_lib.cross_entropy(out["itm"], x.matched.astype(jnp.int32), x.example)
  np.testing.assert_allclose(np.asarray(every["itm_loss"]), np.asarray(expected), rtol=1e-5)
  # Some intact, some clean: ITM learns from both kinds and skips the corrupted rest.
  mixed = _sums_with(setup, params, batch, itm_intact_fraction=0.3, discriminator_clean_fraction=0.3)
  intact, clean = float(mixed["intact_itm_acc"][1]), float(mixed["clean_itm_acc"][1])
  corrupted = float(mixed["corrupted_itm_acc"][1])
  assert intact > 0 and clean > 0 and corrupted > 0
  assert float(mixed["itm_acc"][1]) == float(mixed["itm_loss"][1]) == intact + clean
  assert intact + clean + corrupted == float(none["itm_acc"][1])


def test_corrective_moc_can_weigh_corrupted_pairs_apart(corrective):
  config, setup, params = corrective
  batch = jax.tree.map(jnp.asarray, random_batch(config, batch_size=32))
  total = lambda sums: float(sums["loss"][0] / sums["loss"][1])
  mean = lambda pair: float(pair[0] / pair[1])
  weight = setup.ocfg.weights["cmoc"]

  def sums_with(fraction, corrupted_weight):
    return _sums_with(setup, params, batch, discriminator_clean_fraction=fraction,
                      cmoc_corrupted_weight=corrupted_weight)

  plain = {fraction: sums_with(fraction, None) for fraction in (0.0, 0.5, 1.0)}
  for fraction, same in plain.items():
    # The corrupted examples' terms at 3 where the rest stay at loss_weights.cmoc: the total
    # gains 2x their share of the mean; every reported metric, cmoc_loss included, is the
    # same as without the switch.
    apart = sums_with(fraction, 3.0 * weight)
    corrupted = same.get("corrupted_cmoc_loss", same["cmoc_loss"])
    gained = 2.0 * weight * float(corrupted[0]) / float(same["cmoc_loss"][1])
    assert (gained > 0) == (fraction < 1.0), fraction
    np.testing.assert_allclose(total(apart), total(same) + gained, rtol=1e-5, err_msg=str(fraction))
    for name in same:
      if name != "loss":
        np.testing.assert_allclose(np.asarray(apart[name]), np.asarray(same[name]), err_msg=name)
    # At the same weight as loss_weights.cmoc the switch changes nothing.
    np.testing.assert_allclose(total(sums_with(fraction, weight)), total(same), rtol=1e-6)
  # At 0 the corrupted pairs leave the corrective MOC's term, and without clean pairs the
  # whole term goes.
  same = plain[0.0]
  np.testing.assert_allclose(total(sums_with(0.0, 0.0)),
                             total(same) - weight * mean(same["cmoc_loss"]), rtol=1e-5)


def test_clean_rows_can_be_masked_uniformly_under_salience_weights():
  config = micro_config()
  setup = setup_lib.build(config, SPECIAL_IDS)
  batch = jax.tree.map(jnp.asarray, random_batch(config, batch_size=64))
  ids = np.asarray(batch["text_ids"])
  words = ids[~np.isin(ids, list(SPECIAL_IDS.values())) & np.asarray(batch["text_mask"], bool)]
  favourite = int(np.bincount(words).argmax())
  log_weights = np.zeros(config.model.vocab_size)
  log_weights[favourite] = 50.0  # salience that always masks it where it is

  def prepare(fraction, uniform):
    ocfg = objectives.ObjectiveConfig(**{
        **setup.ocfg.__dict__, "objective": "electra", "text_mask_log_weights": tuple(log_weights),
        "discriminator_clean_fraction": fraction, "discriminator_clean_uniform_masking": uniform})
    x = objectives._prepare(batch, jax.random.key(3), ocfg)
    first = np.take_along_axis(np.asarray(x.text_ids), np.asarray(x.text_positions)[:, :1], 1)[:, 0]
    holds = (np.asarray(x.text_ids) == favourite).any(axis=1)
    clean = np.zeros(ids.shape[0], bool) if x.clean is None else np.asarray(x.clean)
    return first == favourite, holds, clean

  hit, holds, clean = prepare(0.0, True)
  assert not clean.any() and hit[holds].all()  # no clean rows: the weights decide
  hit, holds, clean = prepare(0.5, False)
  assert clean.any() and hit[holds].all()  # clean rows, masked by the same weights
  hit, holds, clean = prepare(0.5, True)
  assert clean.any() and (~clean).any()
  assert hit[holds & ~clean].all()  # the corrupted rows keep the weights
  assert not hit[holds & clean].all()  # the clean rows are masked uniformly


def _corruption(setup, params, x, ocfg):
  """The pair `objectives._corrupt` writes for the prepared batch `x` under `ocfg`: the
  generator's pass on the masked pair, its samples written back."""
  embeds, masked = objectives._region_embeddings(setup.model, params, x)
  generated = setup.model.apply(
      {"params": params}, x.masked_ids, x.text_mask, None, x.boxes, x.region_mask,
      x.text_positions, x.region_positions, True, False, region_embeds=masked,
      method=setup.model.generate)
  scores = objectives._moc_terms(generated[1], embeds, x, x.region_weights, ocfg)[2]
  return objectives._corrupt(setup.model, params, x, jax.random.key(1), jax.random.key(2),
                             generated[0], generated[1], scores, embeds, masked, ocfg, None)


def test_a_witness_is_read_unmasked_and_leaves_the_corrective_heads(corrective):
  config, setup, params = corrective
  batch = jax.tree.map(jnp.asarray, random_batch(config, batch_size=32))
  x = objectives._prepare(batch, jax.random.split(jax.random.key(0), 5)[0], setup.ocfg)

  # Every example a witness, words kept masked in a share as well: each example has one
  # side exactly as the data has it (no [MASK], no replacement) and the other corrupted.
  ocfg = objectives.ObjectiveConfig(**{**setup.ocfg.__dict__, "discriminator_witness_fraction": 1.0,
                                       "discriminator_mask_fraction": 0.5})
  c = _corruption(setup, params, x, ocfg)
  text_side, region_side = np.asarray(c.witness_text), np.asarray(c.witness_regions)
  assert (text_side ^ region_side).all() and text_side.any() and region_side.any()
  same_text = (np.asarray(c.ids) == np.asarray(x.text_ids)).all(axis=1)
  same_regions = np.isclose(np.asarray(c.feats), np.asarray(x.feats)).all(axis=(1, 2))
  np.testing.assert_array_equal(same_text[text_side], True)
  np.testing.assert_array_equal(same_regions[region_side], True)
  assert not np.asarray(c.kept_masked)[text_side].any()
  assert not same_text[region_side].all() and not same_regions[text_side].all()

  sums_with = lambda fraction: _sums_with(setup, params, batch, discriminator_witness_fraction=fraction)
  none, every = sums_with(0.0), sums_with(1.0)
  # A witness's slots leave the corrective LM/MOC and the replaced shares.
  for name in ("clm_loss", "cmoc_loss", "text_replaced_frac", "region_replaced_frac"):
    assert 0 < float(every[name][1]) < float(none[name][1]), name


@pytest.mark.parametrize("on_clean", [True, False])
def test_a_witness_falls_on_clean_examples_only_where_asked(corrective, on_clean):
  config, setup, params = corrective
  batch = jax.tree.map(jnp.asarray, random_batch(config, batch_size=32))
  ocfg = dataclasses.replace(setup.ocfg, discriminator_witness_fraction=1.0,
                             discriminator_clean_fraction=0.5,
                             discriminator_witness_on_clean=on_clean)
  x = objectives._prepare(batch, jax.random.key(3), ocfg)
  c = _corruption(setup, params, x, ocfg)
  clean = np.asarray(x.clean)
  witness = np.asarray(c.witness_text) | np.asarray(c.witness_regions)
  assert clean.any() and (~clean).any()
  # Every corrupted example is a witness (fraction 1); a clean one only where asked, and
  # otherwise it stays the baseline's masked pair: no word read as the original.
  assert witness[~clean].all()
  assert witness[clean].all() == on_clean and witness[clean].any() == on_clean
  if not on_clean:
    masked_words = np.asarray(c.ids)[clean] == np.asarray(x.masked_ids)[clean]
    assert masked_words.all()


def test_tied_generator_runs_the_discriminators_encoder():
  config = micro_config(**{"model.generator": "tied"})
  params = nn.unbox(_boxed_params(config))
  assert "generator" not in params and "generator_projection" not in params
  # Its heads are its own, at full width.
  assert params["generator_mlm_head"]["transform"]["kernel"].shape[0] == config.model.hidden_size
  setup = setup_lib.build(config, SPECIAL_IDS)
  state = setup_lib.init_state(setup, 0)
  batch = jax.tree.map(jnp.asarray, random_batch(config))
  ocfg = setup.ocfg
  weights = dict(ocfg.weights, moc=0.0, r2d=0.0, rtd=0.0, itm=0.0)
  ocfg = objectives.ObjectiveConfig(**{**ocfg.__dict__, "loss_weights": tuple(weights.items())})
  grads = _jit_grad(lambda p: objectives.compute_losses(setup.model, p, batch, jax.random.key(0),
                                                       ocfg, True)[0])(state["params"])
  # The generator's MLM loss alone now trains the shared encoder's layers.
  assert float(jnp.abs(grads["encoder"]["x_layer_0"]["lang_ffn"]["output"]["kernel"]).sum()) > 0


def test_an_unknown_mask_count_is_an_error_naming_the_key():
  import pytest
  with pytest.raises(ValueError, match="config.mask_count"):
    objectives.objective_config_from(micro_config(mask_count="round"), SPECIAL_IDS)


def test_itm_on_the_masked_pair_needs_a_tied_generator_and_reads_its_pass():
  import pytest
  with pytest.raises(ValueError, match="generator='tied'"):
    objectives.objective_config_from(micro_config(itm_input="masked"), SPECIAL_IDS)
  config = micro_config(itm_input="masked", **{"model.generator": "tied"})
  setup = setup_lib.build(config, SPECIAL_IDS)
  state = setup_lib.init_state(setup, 0)
  batch = jax.tree.map(jnp.asarray, random_batch(config))
  ocfg = setup.ocfg
  assert ocfg.itm_input == "masked"
  weights = dict(ocfg.weights, moc=0.0, mlm=0.0, r2d=0.0, rtd=0.0)
  ocfg = objectives.ObjectiveConfig(**{**ocfg.__dict__, "loss_weights": tuple(weights.items())})
  loss_fn = lambda p: objectives.compute_losses(setup.model, p, batch, jax.random.key(0), ocfg, True)[0]
  grads = _jit_grad(loss_fn)(state["params"])
  assert float(jnp.abs(grads["itm_head"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["encoder"]["x_layer_0"]["lang_ffn"]["output"]["kernel"]).sum()) > 0
  # The ITM loss reads the masked pair: which tokens the generator writes back (here
  # changed through the sampling temperature, same masks) does not change it, whereas
  # the default ITM on the corrupted pair does change.
  def itm_loss(ocfg, temperature):
    ocfg = objectives.ObjectiveConfig(**{**ocfg.__dict__, "text_temperature": temperature,
                                         "region_temperature": temperature})
    sums = objectives.compute_losses(setup.model, state["params"], batch, jax.random.key(0), ocfg, True)[1]
    return float(sums["itm_loss"][0])
  assert itm_loss(ocfg, 0.01) == itm_loss(ocfg, 100.0)
  corrupted = objectives.ObjectiveConfig(**{**ocfg.__dict__, "itm_input": "corrupted"})
  assert itm_loss(corrupted, 0.01) != itm_loss(corrupted, 100.0)


def test_deployed_model_has_no_generator_or_discriminator_heads():
  params = nn.unbox(_boxed_params(micro_config()))
  kept = deployed_params(params)
  assert set(kept) == set(DEPLOYED_PARAM_PREFIXES)
  assert not any(k.startswith(("generator", "rtd", "r2d")) for k in kept)
  # The deployed subset alone runs the encoder.
  config = micro_config()
  setup = setup_lib.build(config, SPECIAL_IDS)
  kept = deployed_params(setup_lib.init_state(setup, 0)["params"])
  b = random_batch(config)
  lang, vis, pooled = setup.model.apply({"params": kept}, b["text_ids"], b["text_mask"], b["region_feats"],
                                  b["region_boxes"], b["region_mask"], method=MMElectra.encode)
  assert lang.shape == (8, 12, 32) and vis.shape == (8, 6, 32) and pooled.shape == (8, 32)
  assert np.isfinite(np.asarray(pooled)).all()


def test_bfloat16_compute_keeps_float32_parameters():
  config = micro_config(**{"model.dtype": "bfloat16"})
  setup = setup_lib.build(config, SPECIAL_IDS)
  state = setup_lib.init_state(setup, 0)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
  b = random_batch(config)
  lang, _, _ = setup.model.apply({"params": state["params"]}, b["text_ids"], b["text_mask"],
                                 b["region_feats"], b["region_boxes"], b["region_mask"],
                                 method=MMElectra.encode)
  assert lang.dtype == jnp.bfloat16


def test_gradient_at_init_is_well_conditioned_with_masked_regions():
  # Masked and padded regions are all-zero features; with a zero visn_fc bias their
  # LayerNorm(eps=1e-12) input is constant and the bias gradient was ~1e4, which global
  # clipping turned into no learning for every other parameter.
  config = micro_config()
  setup = setup_lib.build(config, SPECIAL_IDS)
  state = setup_lib.init_state(setup, 0)
  batch = jax.tree.map(jnp.asarray, random_batch(config))
  grads = _jit_grad(lambda p: objectives.compute_losses(setup.model, p, batch, jax.random.key(0),
                                                       setup.ocfg, True)[0])(state["params"])
  norms = {jax.tree_util.keystr(k): float(jnp.linalg.norm(v))
           for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
  assert max(norms.values()) < 100, max(norms.items(), key=lambda kv: kv[1])
