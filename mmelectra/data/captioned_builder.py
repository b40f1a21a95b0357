"""What the real-corpus TFDS builders share: source config, bad-record tally, preparation.

Every real-corpus record holds one image (encoded bytes, or region features) and all of
its captions (`captions`, a 1-D array of UTF-8 strings), so an image is stored once
however many captions it has. After a build, three files land beside the data:

  bad_records.json           what the build skipped, per reason (see bad_records.py)
  caption_counts.<split>.npy captions per record in stored order, so the pipeline can
                             make one example per (record, caption) without a read pass
  tokenizer.json, vocab.txt  WordPiece trained on the train captions, unless the run
                             brings its own (`config.data.tokenizer`)

No TensorFlow anywhere: images stay encoded bytes (decoded with PIL in grain workers),
and every feature is a plain `tfds.features.Tensor`, which ArrayRecord stores and reads
with numpy alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mmelectra.data import bad_records
from mmelectra.data import tokenizer as tokenizer_lib

CAPTION_COUNTS = "caption_counts.{split}.npy"


@dataclasses.dataclass
class SourceConfig(tfds.core.BuilderConfig):
  """Where a builder reads its source files, and what it does with bad ones.

  `source_dir` and `options` decide the data, so they decide the config name (a new
  source never reuses an old build); `on_bad_record` and `vocab_size` do not.
  """
  source_dir: str = ""
  options: tuple = ()
  on_bad_record: str = "error"
  vocab_size: int = 128


def source_config(builder_name: str, source_dir, options: tuple = (), *,
                  on_bad_record: str = "error", vocab_size: int = 128) -> SourceConfig:
  source_dir = os.path.abspath(os.path.expanduser(os.fspath(source_dir)))
  digest = hashlib.sha1(repr((builder_name, source_dir, options)).encode()).hexdigest()[:10]
  base = os.path.basename(source_dir.rstrip(os.sep)) or "root"
  safe = "".join(c if c.isalnum() else "_" for c in base)[:40]
  return SourceConfig(name=f"{safe}_{digest}", source_dir=source_dir, options=tuple(options),
                      on_bad_record=bad_records.check_policy(on_bad_record),
                      vocab_size=vocab_size, description=f"{builder_name} from {source_dir}")


def manual_dir(data_cfg) -> str:
  """`config.data.manual_dir`, else TFDS's default manual directory under data_dir."""
  if data_cfg.manual_dir:
    return os.path.expanduser(os.fspath(data_cfg.manual_dir))
  return os.path.join(os.path.expanduser(os.fspath(data_cfg.data_dir)), "downloads", "manual")


class CaptionedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the real-corpus builders: subclasses set `_info`, `_split_generators`, and
  call `self.tally.bad(...)` for each record they cannot store."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  # As in synthetic_scenes: TFDS's default code_path needs the `importlib_resources`
  # backport for builders inside a package; any file of this package serves.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _create_builder_config(self, builder_config, version):
    # Every config here is made from a source directory (none is registered), so TFDS's
    # look-up would only log "Using custom data configuration" on every instantiation,
    # grain workers included.
    del version
    if not isinstance(builder_config, SourceConfig):
      raise TypeError(f"{type(self).__name__} needs a SourceConfig (see make_builder)")
    return builder_config

  @property
  def source_dir(self) -> str:
    return self.builder_config.source_dir

  @property
  def tally(self) -> bad_records.Tally:
    if not hasattr(self, "_tally"):
      self._tally = bad_records.Tally(self.builder_config.on_bad_record)
    return self._tally

  def _post_download_and_prepare_hook(self) -> None:
    bad_records.write_report(self.tally, self.data_dir)
    finish(self)


def make_builder(cls, data_cfg, options: tuple = ()):
  """An instance of builder class `cls` for `data_cfg` (does not build anything)."""
  config = source_config(cls.name, manual_dir(data_cfg), options,
                         on_bad_record=data_cfg.on_bad_record,
                         vocab_size=0 if data_cfg.tokenizer else data_cfg.vocab_size)
  return cls(config=config, data_dir=os.path.expanduser(os.fspath(data_cfg.data_dir)),
             file_format="array_record")


def caption_counts(builder, split: str) -> np.ndarray:
  """int32 [num_records]: captions of each stored record of `split` (cached on disk)."""
  path = os.path.join(os.fspath(builder.data_dir), CAPTION_COUNTS.format(split=split))
  if os.path.exists(path):
    return np.load(path)
  source = builder.as_data_source(split=split)
  counts = np.array([len(source[i]["captions"]) for i in range(len(source))], np.int32)
  tmp = f"{path}.tmp{os.getpid()}.npy"
  np.save(tmp, counts)
  os.replace(tmp, path)
  return counts


def finish(builder) -> None:
  """Writes what a build leaves beside the data (caption counts, tokenizer) if missing."""
  for split in builder.info.splits:
    caption_counts(builder, split)
  directory = os.fspath(builder.data_dir)
  names = (tokenizer_lib.TOKENIZER_JSON, tokenizer_lib.VOCAB_TXT)
  if builder.builder_config.vocab_size <= 0:  # The run brings its own tokenizer.
    return
  if all(os.path.exists(os.path.join(directory, n)) for n in names):
    return
  source = builder.as_data_source(split="train")
  texts = (c.decode("utf-8") for i in range(len(source)) for c in source[i]["captions"])
  tokenizer = tokenizer_lib.train_wordpiece(texts, builder.builder_config.vocab_size)
  tokenizer_lib.save(tokenizer, directory)


def prepare(make_builder, data_cfg, after_build=None):
  """Builds the data set if missing (cheap when it exists); returns the builder.

  `after_build(builder)` (default `finish`) writes the side files; it runs whether or not
  this call built anything. Written for any local builder (synthetic_scenes.prepare does
  the same): several processes may race on one directory; TFDS builds in a temporary
  directory and renames it, and the rename of every process but the first fails.
  """
  builder = make_builder(data_cfg)
  download_config = tfds.download.DownloadConfig(try_download_gcs=False,
                                                 manual_dir=manual_dir(data_cfg))
  try:
    builder.download_and_prepare(download_config=download_config)
  except OSError:
    builder = make_builder(data_cfg)
    if not builder.is_prepared():
      raise
  (after_build or finish)(builder)  # The build hook does not run when the data existed.
  return builder
