"""Linen modules: the LXMERT-architecture encoder, the ELECTRA generator and the heads.

Layout follows Hugging Face `LxmertModel` so the trained encoder exports to PyTorch with
identical outputs (docs/method.md §1): word + position + token-type embeddings with
LayerNorm; visual embedding `(LN(fc(feat)) + LN(fc(box))) / 2`; L language layers, R
region layers, X cross-modality layers (one cross-attention module used in both
directions, then per-modality self-attention, then per-modality FFN); post-LN, erf GELU,
LayerNorm eps 1e-12, pooler on the first text token.

Every parameter carries logical axis names (MaxText style); `config.logical_axis_rules`
maps them to the `(data, fsdp, model)` mesh. Activations carry logical constraints.

The generator (ELECTRA) is the same `Encoder` class at a fraction of the width. It reads
the discriminator's embedding outputs (the word table and visual projection are shared,
not copied) through one dense projection that adapts the width. By default it is
*per modality* (docs/method.md §3): a text stack and a region stack with no
cross-modality layer, so its MLM logits depend on the text alone and its MOC output on the
image alone, and only the discriminator reads the two together.

`model.scan_layers=True` runs each layer stack (L, R, X) as one `nn.scan` over stacked
parameters (`encoder/l_layers/...` with a leading "layers" axis) instead of unrolled
`l_layer_{i}` modules, as MaxText does: XLA then compiles one layer per stack, not every
layer (`compile-check` of base on 8 devices: 23 s instead of 73 s). The unrolled layout
is the canonical one (export, init_from and fine-tuning name parameters by it);
`scan_params` / `unscan_params` convert between the two exactly.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmelectra import errors
from mmelectra.electra import gather

Array = jax.Array
DType = Any

# Mask value added to attention scores at padded keys. Large and finite so a row whose
# keys are all padding stays finite (uniform), as in Hugging Face's implementation.
_MASK_VALUE = -1e9


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Sizes of one LXMERT-architecture encoder stack."""

  hidden_size: int
  num_heads: int
  mlp_dim: int
  l_layers: int
  r_layers: int
  x_layers: int
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  dtype: DType = jnp.float32
  remat: bool = False
  scan_layers: bool = False  # one nn.scan per layer stack (see the module docstring)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def _kernel_init(names):
  # BERT/LXMERT initialise every dense and embedding weight from N(0, 0.02).
  return nn.with_logical_partitioning(nn.initializers.normal(0.02), names)


def _zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def layer_norm(cfg: EncoderConfig, name: str) -> nn.LayerNorm:
  """LayerNorm at the encoder's eps and dtype, initialised as BERT's (1, 0)."""
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name=name,
      scale_init=_ones(("norm",)), bias_init=_zeros(("norm",)))


def dense(features: int, in_name: str, out_name: str, dtype: DType, name: str) -> nn.Dense:
  """A dense layer initialised as BERT's (N(0, 0.02) kernel, zero bias), with logical axis names."""
  return nn.Dense(
      features, dtype=dtype, name=name,
      kernel_init=_kernel_init((in_name, out_name)), bias_init=_zeros((out_name,)))


def gelu(x: Array) -> Array:
  # Exact (erf) GELU, as BERT and LXMERT use; the tanh approximation would break parity.
  # Written with erf, as PyTorch computes it: `jax.nn.gelu(approximate=False)` goes
  # through erfc, whose exp and branches cost XLA on CPU several times erf's polynomial.
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))).astype(x.dtype))


class _Einsum(nn.Module):
  """A dense layer as one einsum with a multi-dimensional kernel.

  `nn.DenseGeneral` initialises a flattened kernel and reshapes it, which breaks
  multi-dimensional logical axis names; this keeps the kernel's true shape throughout.
  """

  equation: str
  kernel_shape: tuple[int, ...]
  kernel_names: tuple[str, ...]
  bias_names: tuple[str, ...]
  dtype: DType

  @nn.compact
  def __call__(self, x: Array) -> Array:
    nb = len(self.bias_names)
    kernel = self.param("kernel", _kernel_init(self.kernel_names), self.kernel_shape, jnp.float32)
    bias = self.param("bias", _zeros(self.bias_names), self.kernel_shape[-nb:], jnp.float32)
    y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class AttentionBlock(nn.Module):
  """Multi-head attention of `x` over `context`, then dense + dropout + residual LayerNorm.

  Hugging Face splits this into `LxmertAttention` (query/key/value) and
  `LxmertAttentionOutput` (dense/LayerNorm). Key and value are one fused projection.
  """

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x: Array, context: Array, context_mask: Array, deterministic: bool) -> Array:
    cfg = self.cfg
    heads, head_dim = cfg.num_heads, cfg.head_dim
    hidden = cfg.hidden_size
    query = _Einsum("...e,ehd->...hd", (hidden, heads, head_dim), ("embed", "heads", "kv"),
                    ("heads", "kv"), cfg.dtype, name="query")(x)
    key_value = _Einsum("...e,ethd->...thd", (hidden, 2, heads, head_dim),
                        ("embed", "qkv", "heads", "kv"), ("qkv", "heads", "kv"), cfg.dtype,
                        name="key_value")(context)
    key, value = key_value[..., 0, :, :], key_value[..., 1, :, :]
    query = nn.with_logical_constraint(query, ("batch", "length", "act_heads", "act_kv"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.sqrt(head_dim).astype(cfg.dtype)
    # Softmax in float32 whatever the compute dtype.
    scores = scores.astype(jnp.float32)
    scores = jnp.where(context_mask[:, None, None, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.attention_dropout_rate)(probs, deterministic=deterministic)
    attended = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(cfg.dtype), value)
    out = _Einsum("...hd,hde->...e", (heads, head_dim, hidden), ("heads", "kv", "embed"),
                  ("embed",), cfg.dtype, name="output")(attended)
    out = nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic)
    return layer_norm(cfg, "output_layer_norm")(out + x)


class FeedForward(nn.Module):
  """Intermediate dense + GELU, output dense + dropout + residual LayerNorm."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.cfg
    h = dense(cfg.mlp_dim, "embed", "mlp", cfg.dtype, "intermediate")(x)
    h = gelu(h)
    h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
    out = dense(cfg.hidden_size, "mlp", "embed", cfg.dtype, "output")(h)
    out = nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic)
    return layer_norm(cfg, "output_layer_norm")(out + x)


class TransformerLayer(nn.Module):
  """One single-modality layer (Hugging Face `LxmertLayer`)."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    x = AttentionBlock(self.cfg, name="attention")(x, x, mask, deterministic)
    return FeedForward(self.cfg, name="ffn")(x, deterministic)


class CrossModalityLayer(nn.Module):
  """One cross-modality layer (Hugging Face `LxmertXLayer`).

  The same cross-attention module serves both directions, and both directions read the
  layer's inputs (not each other's outputs), as LXMERT does.
  """

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, lang: Array, lang_mask: Array, vis: Array, vis_mask: Array,
               deterministic: bool) -> tuple[Array, Array]:
    cross = AttentionBlock(self.cfg, name="cross_attention")
    lang_x = cross(lang, vis, vis_mask, deterministic)
    vis_x = cross(vis, lang, lang_mask, deterministic)
    lang = AttentionBlock(self.cfg, name="lang_self_attention")(lang_x, lang_x, lang_mask, deterministic)
    vis = AttentionBlock(self.cfg, name="visn_self_attention")(vis_x, vis_x, vis_mask, deterministic)
    lang = FeedForward(self.cfg, name="lang_ffn")(lang, deterministic)
    vis = FeedForward(self.cfg, name="visn_ffn")(vis, deterministic)
    return lang, vis


def _maybe_remat(module_cls, cfg: EncoderConfig):
  if cfg.remat:
    # The deterministic flag (the last argument) is static: it selects code, it is not
    # data. nn.remat counts `self` as argument 0 and turns -1 into the wrong index, so
    # count from the front. Inside nn.scan, CSE prevention is unnecessary (flax docs).
    last = len(inspect.signature(module_cls.__call__).parameters) - 1
    return nn.remat(module_cls, static_argnums=(last,), prevent_cse=not cfg.scan_layers)
  return module_cls


_LANG_AXES = ("batch", "length", "act_embed")
_VIS_AXES = ("batch", "regions", "act_embed")


class _ScanTransformerLayer(TransformerLayer):
  """`TransformerLayer` as an `nn.scan` body: `(carry, None)` out, constraint inside.

  A subclass, not a wrapper, so each stacked copy has exactly one layer's parameter tree.
  """

  axes: tuple[str, ...] = _LANG_AXES

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> tuple[Array, None]:
    x = super().__call__(x, mask, deterministic)
    return nn.with_logical_constraint(x, self.axes), None


class _ScanCrossModalityLayer(CrossModalityLayer):
  """`CrossModalityLayer` as an `nn.scan` body over the carry `(lang, vis)`."""

  @nn.compact
  def __call__(self, carry: tuple[Array, Array], lang_mask: Array, vis_mask: Array,
               deterministic: bool) -> tuple[tuple[Array, Array], None]:
    lang, vis = super().__call__(carry[0], lang_mask, carry[1], vis_mask, deterministic)
    lang = nn.with_logical_constraint(lang, _LANG_AXES)
    return (lang, nn.with_logical_constraint(vis, _VIS_AXES)), None


def _scanned(body_cls, cfg: EncoderConfig, length: int, num_broadcast: int):
  """`body_cls` (rematted inside, as MaxText does) scanned `length` times; the parameters
  stack on a leading logical axis "layers" (unsharded: see LOGICAL_AXIS_RULES)."""
  return nn.scan(
      _maybe_remat(body_cls, cfg),
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,) * num_broadcast,  # masks and the (static) deterministic flag
      length=length,
      metadata_params={nn.PARTITION_NAME: "layers"})


class Encoder(nn.Module):
  """L language layers, R region layers, then X cross-modality layers.

  Unrolled (`l_layer_{i}`, `r_layer_{i}`, `x_layer_{i}`), or with `cfg.scan_layers` one
  scanned stack each (`l_layers`, `r_layers`, `x_layers`; none for a stack of 0 layers).
  """

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, lang: Array, lang_mask: Array, vis: Array, vis_mask: Array,
               deterministic: bool, with_unimodal: bool = False):
    """`(lang, vis)` after the cross-modality layers; with `with_unimodal` also the
    single-modality outputs before them, `(lang, vis, lang_unimodal, vis_unimodal)`."""
    cfg = self.cfg
    if cfg.scan_layers:
      if cfg.l_layers:
        lang, _ = _scanned(_ScanTransformerLayer, cfg, cfg.l_layers, 2)(
            cfg, axes=_LANG_AXES, name="l_layers")(lang, lang_mask, deterministic)
      if cfg.r_layers:
        vis, _ = _scanned(_ScanTransformerLayer, cfg, cfg.r_layers, 2)(
            cfg, axes=_VIS_AXES, name="r_layers")(vis, vis_mask, deterministic)
      unimodal = (lang, vis)
      if cfg.x_layers:
        (lang, vis), _ = _scanned(_ScanCrossModalityLayer, cfg, cfg.x_layers, 3)(
            cfg, name="x_layers")((lang, vis), lang_mask, vis_mask, deterministic)
      return (lang, vis) + (unimodal if with_unimodal else ())
    layer_cls = _maybe_remat(TransformerLayer, cfg)
    x_layer_cls = _maybe_remat(CrossModalityLayer, cfg)
    for i in range(cfg.l_layers):
      lang = layer_cls(cfg, name=f"l_layer_{i}")(lang, lang_mask, deterministic)
      lang = nn.with_logical_constraint(lang, _LANG_AXES)
    for i in range(cfg.r_layers):
      vis = layer_cls(cfg, name=f"r_layer_{i}")(vis, vis_mask, deterministic)
      vis = nn.with_logical_constraint(vis, _VIS_AXES)
    unimodal = (lang, vis)
    for i in range(cfg.x_layers):
      lang, vis = x_layer_cls(cfg, name=f"x_layer_{i}")(lang, lang_mask, vis, vis_mask, deterministic)
      lang = nn.with_logical_constraint(lang, _LANG_AXES)
      vis = nn.with_logical_constraint(vis, _VIS_AXES)
    return (lang, vis) + (unimodal if with_unimodal else ())


# --- scanned <-> unrolled parameter layout ---------------------------------------------
# Stack name under `scan_layers` -> the unrolled prefix of its layers (`l_layer_{i}`).
_STACKS = {"l_layers": "l_layer", "r_layers": "r_layer", "x_layers": "x_layer"}
_STACK_OF = {prefix: stack for stack, prefix in _STACKS.items()}
_UNROLLED_LAYER = re.compile(r"^([lrx]_layer)_(\d+)$")


def unscan_params(tree):
  """Stacked layers (`l_layers`, ...) -> one subtree per layer (`l_layer_{i}`, ...),
  wherever they are in the tree (encoder, generator). A tree without stacks comes back
  with the same leaves. Leaves need only `.shape` and `[i]`; the result is plain dicts."""
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for key, sub in tree.items():
    if key in _STACKS and isinstance(sub, Mapping):
      for i in range(jax.tree.leaves(sub)[0].shape[0]):
        out[f"{_STACKS[key]}_{i}"] = jax.tree.map(lambda x, i=i: x[i], sub)
    else:
      out[key] = unscan_params(sub)
  return out


def _stack(xs):
  # numpy in, numpy out (export and LLRD work on host values); jax arrays stay on device.
  return jnp.stack(xs) if any(isinstance(x, jax.Array) for x in xs) else np.stack(xs)


def scan_params(tree):
  """The inverse of `unscan_params`: `l_layer_0 ... l_layer_{n-1}` -> `l_layers` stacked
  on a new leading axis, and so for `r_` and `x_`."""
  if not isinstance(tree, Mapping):
    return tree
  out, layers = {}, {}
  for key, sub in tree.items():
    match = _UNROLLED_LAYER.match(key) if isinstance(sub, Mapping) else None
    if match:
      layers.setdefault(match[1], {})[int(match[2])] = sub
    else:
      out[key] = scan_params(sub)
  for prefix, by_index in layers.items():
    if sorted(by_index) != list(range(len(by_index))):
      raise ValueError(f"cannot stack {prefix}_*: layer indices {sorted(by_index)} are not 0..n-1")
    out[_STACK_OF[prefix]] = jax.tree.map(lambda *xs: _stack(xs), *(by_index[i] for i in range(len(by_index))))
  return out


class TextEmbeddings(nn.Module):
  """word + position + token type, LayerNorm, dropout (Hugging Face `LxmertEmbeddings`)."""

  cfg: EncoderConfig
  vocab_size: int
  max_position: int
  type_vocab_size: int

  def setup(self):
    cfg = self.cfg
    self.word_embeddings = nn.Embed(
        self.vocab_size, cfg.hidden_size, dtype=cfg.dtype,
        embedding_init=_kernel_init(("vocab", "embed")))
    self.position_embeddings = nn.Embed(
        self.max_position, cfg.hidden_size, dtype=cfg.dtype,
        embedding_init=_kernel_init(("position", "embed")))
    self.token_type_embeddings = nn.Embed(
        self.type_vocab_size, cfg.hidden_size, dtype=cfg.dtype,
        embedding_init=_kernel_init(("token_type", "embed")))
    self.layer_norm = layer_norm(cfg, "layer_norm")
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, ids: Array, deterministic: bool) -> Array:
    if ids.shape[1] > self.max_position:
      raise ValueError(f"text length {ids.shape[1]} exceeds model.max_position={self.max_position}")
    positions = jnp.arange(ids.shape[1])[None, :]
    x = (self.word_embeddings(ids) + self.position_embeddings(positions)
         + self.token_type_embeddings(jnp.zeros_like(ids)))
    x = self.layer_norm(x)
    return self.dropout(x, deterministic=deterministic)

  def attend(self, x: Array) -> Array:
    """Logits against the word table (the tied MLM decoder)."""
    return self.word_embeddings.attend(x)


class VisualEmbeddings(nn.Module):
  """`(LN(fc(feat)) + LN(fc(box))) / 2`, dropout (Hugging Face `LxmertVisualFeatureEncoder`)."""

  cfg: EncoderConfig

  def setup(self):
    cfg = self.cfg
    # Masked and padded regions have all-zero features, so fc(feat) is the bias alone and
    # LayerNorm(eps=1e-12) of a constant vector has a ~1e6 gradient: a zero-initialised
    # bias gives one parameter a gradient norm of ~1e4, and global-norm clipping then
    # starves every other parameter. A small random bias keeps that LayerNorm conditioned.
    self.visn_fc = nn.Dense(cfg.hidden_size, dtype=cfg.dtype, name="visn_fc",
                            kernel_init=_kernel_init(("visual_feat", "embed")),
                            bias_init=_kernel_init(("embed",)))
    self.visn_layer_norm = layer_norm(cfg, "visn_layer_norm")
    self.box_fc = dense(cfg.hidden_size, "box", "embed", cfg.dtype, "box_fc")
    self.box_layer_norm = layer_norm(cfg, "box_layer_norm")
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def project_features(self, feats: Array) -> Array:
    """LN(fc(feat)): the region-feature embedding, also the key of MOC `sample` candidates."""
    return self.visn_layer_norm(self.visn_fc(feats))

  def __call__(self, feats: Array | None, boxes: Array, deterministic: bool,
               projected: Array | None = None) -> Array:
    """`projected`, if given, is `project_features(feats)` computed by the caller (who
    shares it between passes); `feats` is then unused."""
    projected = self.project_features(feats) if projected is None else projected.astype(self.cfg.dtype)
    x = (projected + self.box_layer_norm(self.box_fc(boxes))) / 2
    return self.dropout(x, deterministic=deterministic)


class TiedMLMHead(nn.Module):
  """dense + GELU + LayerNorm to the embedding width, then the tied word table + bias."""

  cfg: EncoderConfig
  embed_dim: int
  vocab_size: int

  @nn.compact
  def __call__(self, x: Array, embeddings: TextEmbeddings) -> Array:
    h = dense(self.embed_dim, "hidden", "embed", self.cfg.dtype, "transform")(x)
    h = gelu(h)
    h = nn.LayerNorm(epsilon=self.cfg.layer_norm_eps, dtype=self.cfg.dtype, name="transform_layer_norm",
                     scale_init=_ones(("norm",)), bias_init=_zeros(("norm",)))(h)
    logits = embeddings.attend(h)
    bias = self.param("bias", _zeros(("vocab",)), (self.vocab_size,), jnp.float32)
    return logits.astype(jnp.float32) + bias


class MOCHead(nn.Module):
  """Masked-object head. Output depends on the mode (docs/method.md §5).

  sample: a query in the embedding width, scored against candidate region embeddings;
  regress: the region feature itself; classify: logits over object classes.
  """

  cfg: EncoderConfig
  mode: str
  out_dim: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = dense(self.cfg.hidden_size, "embed", "hidden", self.cfg.dtype, "transform")(x)
    h = gelu(h)
    h = nn.LayerNorm(epsilon=self.cfg.layer_norm_eps, dtype=self.cfg.dtype, name="transform_layer_norm",
                     scale_init=_ones(("norm",)), bias_init=_zeros(("norm",)))(h)
    out_name = {"sample": "embed", "regress": "visual_feat", "classify": "classes"}[self.mode]
    out = dense(self.out_dim, "hidden", out_name, self.cfg.dtype, "output")(h)
    return out.astype(jnp.float32)


class BinaryHead(nn.Module):
  """ELECTRA discriminator head: dense + GELU + dense to one logit per position."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = gelu(dense(self.cfg.hidden_size, "embed", "hidden", self.cfg.dtype, "dense")(x))
    return dense(1, "hidden", "classes", self.cfg.dtype, "logit")(h)[..., 0].astype(jnp.float32)


class Pooler(nn.Module):
  """tanh(dense(first text token)), Hugging Face `LxmertPooler`."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, lang: Array) -> Array:
    return jnp.tanh(dense(self.cfg.hidden_size, "embed", "hidden", self.cfg.dtype, "dense")(lang[:, 0]))


# `model.generator`: what the ELECTRA generator reads (docs/method.md §3).
#   per_modality  text stack -> MLM, region stack -> MOC; neither sees the other modality
#   crossmodal    a narrow copy of the whole LXMERT encoder (cross layers included)
#   tied          the discriminator's own encoder (ELECTRA's "tie all weights"), own heads
GENERATORS = ("per_modality", "crossmodal", "tied")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that fixes the parameter shapes of `MMElectra`."""

  encoder: EncoderConfig
  generator: EncoderConfig | None  # None for objective "mlm"
  vocab_size: int
  max_position: int
  type_vocab_size: int
  visual_feat_dim: int
  moc_mode: str  # sample | regress | classify
  num_object_classes: int
  generator_kind: str = "per_modality"  # one of GENERATORS (objective "electra")
  # Corrective LM (COCO-LM) on the discriminator: at each masked text slot the fusion
  # encoder also predicts the original word (`clm_head`). See objectives.electra_losses.
  corrective_lm: bool = False
  # Its region half: at each masked region the fusion encoder predicts the original
  # region (`cmoc_head`, the MOC head's form), reading the caption to do so.
  corrective_moc: bool = False
  # RTD reads the corrective LM (docs/method.md §9): the RTD logit of a word is the binary
  # head's plus -log p_CLM(the word), the corrective LM evaluated at every position. A word
  # the (image-reading) corrective LM finds unlikely in this pair is more likely replaced,
  # so RTD starts from the CLM's grounding instead of having to find "word disagrees with
  # image" (no first-order signal) by itself. Adds no parameter; needs `corrective_lm`.
  rtd_reads_clm: bool = False
  # Image-text contrastive alignment (ALBEF's "align before fuse") on the fusion encoder's
  # own single-modality outputs: the width of the shared embedding space, 0 for none.
  contrastive_dim: int = 0

  @property
  def generator_tied(self) -> bool:
    return self.generator is not None and self.generator_kind == "tied"

  def moc_out_dim(self) -> int:
    return {"sample": self.encoder.hidden_size, "regress": self.visual_feat_dim,
            "classify": self.num_object_classes}[self.moc_mode]


def model_config_from(config) -> ModelConfig:
  """Builds the static `ModelConfig` from the ml_collections run config."""
  m = config.model
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[m.dtype]
  enc = EncoderConfig(
      hidden_size=m.hidden_size, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
      l_layers=m.l_layers, r_layers=m.r_layers, x_layers=m.x_layers,
      layer_norm_eps=m.layer_norm_eps, dropout_rate=m.dropout_rate,
      attention_dropout_rate=m.attention_dropout_rate, dtype=dtype, remat=m.remat,
      scan_layers=bool(m.scan_layers))
  gen = None
  kind = m.generator
  if kind not in GENERATORS:
    raise errors.InvalidInput(f"config.model.generator must be one of {GENERATORS}, got {kind!r}")
  if config.objective == "electra":
    gen = generator_config(enc, kind, m.generator_width_ratio)
  elif config.objective != "mlm":
    raise errors.InvalidInput(f"config.objective must be 'electra' or 'mlm', got {config.objective!r}")
  if m.hidden_size % m.num_heads:
    raise errors.InvalidInput(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
  if m.moc_mode not in ("sample", "regress", "classify"):
    raise errors.InvalidInput(f"model.moc_mode must be sample|regress|classify, got {m.moc_mode!r}")
  if config.objective == "electra" and m.rtd_reads_clm and not config.loss_weights.clm > 0:
    raise errors.InvalidInput("model.rtd_reads_clm=True reads the corrective LM: set "
                              "loss_weights.clm > 0, or model.rtd_reads_clm=False")
  return ModelConfig(
      encoder=enc, generator=gen, generator_kind=kind, vocab_size=m.vocab_size,
      max_position=m.max_position, type_vocab_size=m.type_vocab_size,
      visual_feat_dim=m.visual_feat_dim, moc_mode=m.moc_mode,
      num_object_classes=m.num_object_classes,
      corrective_lm=config.objective == "electra" and config.loss_weights.clm > 0,
      corrective_moc=config.objective == "electra" and config.loss_weights.cmoc > 0,
      rtd_reads_clm=config.objective == "electra" and bool(m.rtd_reads_clm),
      contrastive_dim=(m.contrastive_dim if config.objective == "electra"
                       and config.loss_weights.itc > 0 else 0))


def generator_config(enc: EncoderConfig, kind: str, width_ratio: float) -> EncoderConfig:
  """The generator's encoder sizes for `model.generator` = `kind`.

  `tied` is the discriminator's encoder itself. The others are `width_ratio` of its width,
  heads and MLP. `crossmodal` keeps the discriminator's L/R/X depths; `per_modality` has
  no cross-modality layer and gives each modality the depth its stream has in the
  discriminator (L + X text layers, R + X region layers).
  """
  if kind == "tied":
    return enc
  width = max(int(round(enc.hidden_size * width_ratio)), 1)
  heads = max(int(round(enc.num_heads * width_ratio)), 1)
  if width % heads:
    raise errors.InvalidInput(f"generator width {width} is not divisible by its {heads} heads; "
                              f"change model.generator_width_ratio={width_ratio}")
  gen = dataclasses.replace(enc, hidden_size=width, num_heads=heads,
                            mlp_dim=max(int(round(enc.mlp_dim * width_ratio)), 1))
  if kind == "per_modality":
    gen = dataclasses.replace(gen, l_layers=enc.l_layers + enc.x_layers,
                              r_layers=enc.r_layers + enc.x_layers, x_layers=0)
  return gen


class MMElectra(nn.Module):
  """Shared embeddings, discriminator (= deployed encoder), generator and heads.

  Methods are entry points for `apply(..., method=...)`; the method's orchestration
  (masking, sampling, replacing, losses) lives in pure functions in `electra.py` and
  `objectives.py`.
  """

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    enc = cfg.encoder
    self.embeddings = TextEmbeddings(enc, cfg.vocab_size, cfg.max_position, cfg.type_vocab_size)
    self.visual_embeddings = VisualEmbeddings(enc)
    self.encoder = Encoder(enc)
    self.pooler = Pooler(enc)
    self.itm_head = dense(2, "hidden", "classes", enc.dtype, "itm_head")
    if cfg.contrastive_dim:
      self.itc_text_projection = dense(cfg.contrastive_dim, "embed", "hidden", enc.dtype,
                                        "itc_text_projection")
      self.itc_image_projection = dense(cfg.contrastive_dim, "embed", "hidden", enc.dtype,
                                         "itc_image_projection")
      # CLIP/ALBEF: a learned inverse temperature, kept as its log, starting at 1/0.07.
      self.itc_log_scale = self.param(
          "itc_log_scale", nn.with_logical_partitioning(
              nn.initializers.constant(math.log(1 / 0.07)), ()), (), jnp.float32)
    if cfg.generator is None:
      # Objective "mlm": the encoder itself predicts masked words and regions.
      self.mlm_head = TiedMLMHead(enc, enc.hidden_size, cfg.vocab_size)
      self.moc_head = MOCHead(enc, cfg.moc_mode, cfg.moc_out_dim())
    else:
      gen = cfg.generator
      self.rtd_head = BinaryHead(enc)
      self.r2d_head = BinaryHead(enc)
      if not cfg.generator_tied:
        self.generator_projection = dense(gen.hidden_size, "embed", "hidden", gen.dtype,
                                           "generator_projection")
        self.generator = Encoder(gen)
      self.generator_mlm_head = TiedMLMHead(gen, enc.hidden_size, cfg.vocab_size)
      self.generator_moc_head = MOCHead(gen, cfg.moc_mode, cfg.moc_out_dim())
      if cfg.corrective_lm:
        self.clm_head = TiedMLMHead(enc, enc.hidden_size, cfg.vocab_size)
      if cfg.corrective_moc:
        self.cmoc_head = MOCHead(enc, cfg.moc_mode, cfg.moc_out_dim())

  # --- shared pieces -------------------------------------------------------------------
  def _embed(self, text_ids, region_feats, region_boxes, deterministic, region_embeds=None):
    lang = self.embeddings(text_ids, deterministic)
    vis = self.visual_embeddings(region_feats, region_boxes, deterministic, projected=region_embeds)
    return lang, vis

  def candidate_embeddings(self, region_feats: Array) -> Array:
    """`LN(fc(feat))` in float32: the keys of MOC `sample` candidates, and the
    `region_embeds` that the entry points below accept in place of `region_feats`."""
    return self.visual_embeddings.project_features(region_feats).astype(jnp.float32)

  # Every entry point takes either `region_feats` or `region_embeds`, the latter being
  # `candidate_embeddings(region_feats)` computed once by the objective and shared by its
  # passes (the projection of 2048-d detector features is the largest matmul per region).
  def encode(self, text_ids, text_mask, region_feats, region_boxes, region_mask,
             deterministic: bool = True, region_embeds=None):
    """The deployed model: (language output, vision output, pooled output)."""
    lang, vis = self._embed(text_ids, region_feats, region_boxes, deterministic, region_embeds)
    lang, vis = self.encoder(lang, text_mask, vis, region_mask, deterministic)
    return lang, vis, self.pooler(lang)

  def itm_logits(self, pooled: Array) -> Array:
    return self.itm_head(pooled).astype(jnp.float32)

  def contrastive_embeddings(self, lang_unimodal, vis_unimodal, region_mask):
    """Unit-norm text and image embeddings `[B, C]` from the single-modality outputs (the
    first text token; the mean of the real regions), and the inverse temperature.

    A pure dual encoder: the text embedding never reads the image nor the image's the
    text, so a whole pool could be ranked by one matrix product (not yet used by
    `evaluate`, which scores pairs with the ITM head).
    """
    # The first token ([CLS]) summarises the text, as the pooler's does.
    text = self.itc_text_projection(lang_unimodal[:, 0]).astype(jnp.float32)
    m = region_mask[..., None].astype(jnp.float32)
    vis = (vis_unimodal.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    image = self.itc_image_projection(vis).astype(jnp.float32)
    normalize = lambda x: x * jax.lax.rsqrt(jnp.maximum((x * x).sum(-1, keepdims=True), 1e-12))
    # Clipped at 100, as CLIP does, so the logits cannot run away.
    scale = jnp.exp(jnp.minimum(self.itc_log_scale, math.log(100.0)))
    return normalize(text), normalize(image), scale

  def dual_encode(self, text_ids, text_mask, region_feats, region_boxes, region_mask,
                  deterministic: bool = True, region_embeds=None):
    """Contrastive embeddings of texts and images, each read alone: `(text, image, scale)`.

    Only the single-modality outputs are used, so under `jit` XLA drops the cross layers.
    """
    lang, vis = self._embed(text_ids, region_feats, region_boxes, deterministic, region_embeds)
    out = self.encoder(lang, text_mask, vis, region_mask, deterministic, with_unimodal=True)
    return self.contrastive_embeddings(out[2], out[3], region_mask)

  # --- ELECTRA --------------------------------------------------------------------------
  def generate(self, text_ids, text_mask, region_feats, region_boxes, region_mask,
               text_positions, region_positions, deterministic: bool, with_itm: bool = False,
               region_embeds=None):
    """Generator predictions at the masked positions only.

    Returns MLM logits `[B, Mt, V]` and the MOC output `[B, Mr, D]` (see `MOCHead`), and
    with `with_itm` (tied generator only: its encoder is the deployed fusion encoder) the
    ITM logits `[B, 2]` of the masked pair.
    Gathering before the vocabulary projection keeps the head's cost at the masked 15%.
    """
    lang, vis = self._embed(text_ids, region_feats, region_boxes, deterministic, region_embeds)
    if self.cfg.generator_tied:
      lang, vis = self.encoder(lang, text_mask, vis, region_mask, deterministic)
    else:
      if with_itm:
        raise ValueError("ITM on the masked pair needs model.generator='tied'")
      # per_modality: the generator encoder has no cross layer (x_layers=0), so the text
      # stack never reads the regions and the region stack never reads the text.
      lang, vis = self.generator_projection(lang), self.generator_projection(vis)
      lang, vis = self.generator(lang, text_mask, vis, region_mask, deterministic)
    lang_m, vis_m = gather(lang, text_positions), gather(vis, region_positions)
    out = (self.generator_mlm_head(lang_m, self.embeddings), self.generator_moc_head(vis_m))
    if with_itm:
      out += (self.itm_logits(self.pooler(lang)),)
    return out

  def discriminate(self, text_ids, text_mask, region_feats, region_boxes, region_mask,
                   deterministic: bool, region_embeds=None, text_positions=None,
                   region_positions=None):
    """A dict of outputs on the fused features: `rtd` logits `[B, T]`, `r2d` logits
    `[B, K]`, `itm` logits `[B, 2]`; with `text_positions` (and the corrective-LM head)
    `clm`, logits `[B, Mt, V]` for the original word at those slots; with
    `region_positions` (and the corrective-MOC head) `cmoc`, the MOC output there; with
    contrastive alignment `itc`, `contrastive_embeddings` of the single-modality outputs."""
    lang, vis = self._embed(text_ids, region_feats, region_boxes, deterministic, region_embeds)
    lang, vis, lang_uni, vis_uni = self.encoder(lang, text_mask, vis, region_mask, deterministic,
                                                with_unimodal=True)
    out = {"rtd": self.rtd_head(lang), "r2d": self.r2d_head(vis),
           "itm": self.itm_logits(self.pooler(lang))}
    if self.cfg.rtd_reads_clm:
      # The corrective LM at every position: RTD adds -log p(the word read there).
      clm = self.clm_head(lang, self.embeddings)
      log_p = jnp.take_along_axis(jax.nn.log_softmax(clm, axis=-1), text_ids[..., None], -1)[..., 0]
      out["rtd"] = out["rtd"] - log_p
      if text_positions is not None:
        out["clm"] = gather(clm, text_positions)
    elif text_positions is not None:
      out["clm"] = self.clm_head(gather(lang, text_positions), self.embeddings)
    if region_positions is not None:
      out["cmoc"] = self.cmoc_head(gather(vis, region_positions))
    if self.cfg.contrastive_dim:
      out["itc"] = self.contrastive_embeddings(lang_uni, vis_uni, region_mask)
    return out

  # --- MLM baseline ---------------------------------------------------------------------
  def predict_masked(self, text_ids, text_mask, region_feats, region_boxes, region_mask,
                     text_positions, region_positions, deterministic: bool, region_embeds=None):
    """Objective "mlm": MLM logits, MOC output at masked positions and ITM logits."""
    lang, vis, pooled = self.encode(text_ids, text_mask, region_feats, region_boxes,
                                    region_mask, deterministic, region_embeds)
    lang_m, vis_m = gather(lang, text_positions), gather(vis, region_positions)
    return self.mlm_head(lang_m, self.embeddings), self.moc_head(vis_m), self.itm_logits(pooled)

  def __call__(self, text_ids, text_mask, region_feats, region_boxes, region_mask,
               text_positions, region_positions, deterministic: bool = True):
    """Touches every parameter; used by `init`."""
    out = {"candidates": self.candidate_embeddings(region_feats)}
    if self.cfg.generator is None:
      out["mlm"] = self.predict_masked(text_ids, text_mask, region_feats, region_boxes,
                                       region_mask, text_positions, region_positions, deterministic)
    else:
      out["generator"] = self.generate(text_ids, text_mask, region_feats, region_boxes,
                                       region_mask, text_positions, region_positions, deterministic)
      out["discriminator"] = self.discriminate(
          text_ids, text_mask, region_feats, region_boxes, region_mask, deterministic,
          text_positions=text_positions if self.cfg.corrective_lm else None,
          region_positions=region_positions if self.cfg.corrective_moc else None)
    return out


# Parameters that the deployed model keeps (docs/method.md §11): shared embeddings,
# encoder, pooler and ITM head. Everything else is pretraining-only.
DEPLOYED_PARAM_PREFIXES = ("embeddings", "visual_embeddings", "encoder", "pooler", "itm_head")


def deployed_params(params: dict) -> dict:
  """Drops the generator and the RTD/R2D/MLM/MOC heads."""
  return {k: v for k, v in params.items() if k in DEPLOYED_PARAM_PREFIXES}
