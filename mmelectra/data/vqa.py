"""VQA data: answer vocabulary, soft scores, and batches of (image regions, question, scores).

Two sources give the same examples `{question, answers: [..], record | image}`:
  - the synthetic scenes' VQA derivative (`synthetic_vqa`, the default): the image is
    the scene record `record` of the prepared synthetic-scenes split;
  - a JSONL file per split (`config.vqa.<split>_jsonl`), one `{"image": path, "question":
    str, "answers": [str, ...]}` per line; the image path is relative to the file, and
    the image is resized to `config.data.image_size` and cut into patches
    (`config.data.regions` must be "patches").

Answers follow VQA v2: the vocabulary is the top-K most frequent training answers, an
example's target is the soft score min(1, count / 3) of each vocabulary answer, and
predicting answer a scores min(1, count(a) / 3).
"""

from __future__ import annotations

import collections
import functools
import json
import os

import grain
import numpy as np
from PIL import Image

from mmelectra.data import pipeline
from mmelectra.data import synthetic_vqa
from mmelectra.data import tokenizer as tokenizer_lib

VQA_KEYS = ("text_ids", "text_mask", "region_feats", "region_boxes", "region_mask",
            "answer_scores", "answer_target", "example_mask")


# --- answers (pure) ---------------------------------------------------------------------
def answer_vocabulary(examples, top_k: int) -> list[str]:
  """The `top_k` most frequent answers (every annotation counts), ties by the answer text."""
  counts = collections.Counter(a for e in examples for a in e["answers"])
  return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]


def soft_scores(answers, answer_index: dict[str, int]) -> np.ndarray:
  """float32 [A]: min(1, count / 3) per vocabulary answer (answers outside it are lost)."""
  scores = np.zeros(len(answer_index), np.float32)
  for answer, count in collections.Counter(answers).items():
    if answer in answer_index:
      scores[answer_index[answer]] = min(1.0, count / 3)
  return scores


def vqa_accuracy(answers, predicted: str) -> float:
  """VQA accuracy of one prediction: min(1, annotators who gave it / 3)."""
  return min(1.0, list(answers).count(predicted) / 3)


# --- examples -----------------------------------------------------------------------------
def _jsonl_examples(path: str) -> list[dict]:
  base = os.path.dirname(os.path.abspath(path))
  out = []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      item = json.loads(line)
      missing = {"image", "question", "answers"} - set(item)
      if missing:
        raise ValueError(f"{path}:{line_no}: missing {sorted(missing)}")
      out.append({"image": os.path.join(base, item["image"]), "question": item["question"],
                  "answers": list(item["answers"]), "image_id": len(out)})
  if not out:
    raise ValueError(f"{path} holds no example")
  return out


def load_examples(vqa_cfg, data_cfg, split: str):
  """(examples, scene source or None) of `split`."""
  jsonl = vqa_cfg.get(f"{split}_jsonl", "")
  if jsonl:
    if data_cfg.regions != "patches":
      raise ValueError(f"VQA from JSONL images needs config.data.regions='patches', got {data_cfg.regions!r}")
    return _jsonl_examples(jsonl), None
  source = pipeline.prepared_builder(data_cfg).as_data_source(split=split)
  return synthetic_vqa.split_questions(source, data_cfg.seed, vqa_cfg.questions_per_image), source


def _load_image(path: str, size: int) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), np.uint8)


class ReadVQAExample:
  """Example index -> arrays (VQA_KEYS); indices past the end give a masked padding example.

  A class, not a closure, so grain can pickle it into worker processes.
  """

  def __init__(self, examples, source, tokenizer, data_cfg, answer_index: dict[str, int]):
    self._examples, self._source = examples, source
    self._tokenizer = tokenizer
    self._special_ids = tokenizer_lib.special_token_ids(tokenizer)
    self._data_cfg = data_cfg
    self._answer_index = answer_index
    empty = pipeline.empty_example(data_cfg, self._special_ids["pad"])
    self.empty = {k: empty[k] for k in VQA_KEYS if k in empty}
    self.empty["answer_scores"] = np.zeros(len(answer_index), np.float32)
    self.empty["answer_target"] = np.int32(-1)

  def __len__(self) -> int:
    return len(self._examples)

  def __call__(self, index) -> dict[str, np.ndarray]:
    index = int(index)
    if index >= len(self._examples):
      return {k: np.copy(v) for k, v in self.empty.items()}
    ex = self._examples[index]
    if self._source is not None:
      record = dict(self._source[ex["record"]])
    else:
      record = {"image_id": ex["image_id"], "image": _load_image(ex["image"], self._data_cfg.image_size)}
    record.pop("captions", None)
    record["caption"] = ex["question"]  # the question is the text side
    arrays = pipeline.preprocess_record(record, index, split="vqa", tokenizer=self._tokenizer,
                                        special_ids=self._special_ids, data_cfg=self._data_cfg)
    out = {k: arrays[k] for k in VQA_KEYS if k in arrays}
    out["answer_scores"] = soft_scores(ex["answers"], self._answer_index)
    # The cross-entropy target: the most frequent answer, if it is in the vocabulary.
    top = collections.Counter(ex["answers"]).most_common(1)[0][0]
    out["answer_target"] = np.int32(self._answer_index.get(top, -1))
    return out


def make_iterator(read: ReadVQAExample, *, batch_size: int, seed: int, shuffle: bool,
                  num_epochs: int | None, drop_remainder: bool, process_index: int = 0,
                  process_count: int = 1):
  """Batches over this process's shard of the examples (see `pipeline.make_dataset`)."""
  ds = pipeline.example_indices(len(read), batch_size=batch_size, seed=seed, shuffle=shuffle,
                                num_epochs=num_epochs, drop_remainder=drop_remainder,
                                process_index=process_index, process_count=process_count).map(read)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder,
                batch_fn=functools.partial(pipeline.stack_and_pad, batch_size=batch_size,
                                           empty=read.empty))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
