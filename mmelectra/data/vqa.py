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

from mmelectra import errors
from mmelectra.data import bad_records
from mmelectra.data import batch as batch_lib
from mmelectra.data import images
from mmelectra.data import pipeline
from mmelectra.data import synthetic_vqa
from mmelectra.data import tokenizer as tokenizer_lib

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
def _jsonl_examples(path: str, tally: bad_records.Tally) -> list[dict]:
  """The examples of a VQA JSONL file, every line checked before training starts.

  A bad line (not UTF-8, not a JSON object, a missing or mistyped field, an image file
  that is missing or does not decode) is handled by `tally`: an error naming `file:line`
  and why, or skipped and counted.
  """
  if not os.path.isfile(path):
    raise errors.NotFound(f"VQA file {path} does not exist")
  base = os.path.dirname(os.path.abspath(path))
  out, checked = [], {}  # image path -> why it is bad (None: it decodes)
  with open(path, encoding="utf-8", errors=bad_records.TEXT_ERRORS) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      problem = bad_records.non_utf8(line)
      if problem is not None:
        tally.bad(where, "malformed_record", problem)
        continue
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        tally.bad(where, "malformed_record", f"not JSON: {e.msg} at column {e.colno}")
        continue
      problem, reason = _check_item(item), "malformed_record"
      if problem is None:
        image = os.path.join(base, item["image"])
        if image not in checked:
          checked[image] = _check_image_file(image)
        if checked[image] is not None:
          reason, problem = checked[image]
      if problem is not None:
        tally.bad(where, reason, problem)
        continue
      out.append({"image": image, "question": item["question"], "answers": list(item["answers"]),
                  "image_id": len(out)})
  if not out:
    raise errors.InvalidInput(f"{path} holds no usable example")
  return out


def _check_item(item) -> str | None:
  """Why a parsed JSONL line is not a VQA example, or None."""
  if not isinstance(item, dict):
    return f"not a JSON object but {type(item).__name__}"
  missing = {"image", "question", "answers"} - set(item)
  if missing:
    return f"missing {sorted(missing)}"
  if not isinstance(item["image"], str) or not item["image"]:
    return "'image' must be a non-empty path"
  if not isinstance(item["question"], str) or not item["question"].strip():
    return "'question' must be non-empty text"
  answers = item["answers"]
  if (not isinstance(answers, list) or not answers
      or not all(isinstance(a, str) and a.strip() for a in answers)):
    return (f"'answers' must be a non-empty list of strings (the annotators' answers), got "
            f"{json.dumps(answers)[:80]}")
  return None


def _check_image_file(path: str) -> tuple[str, str] | None:
  """(reason, why) if the image file is missing or does not decode; None if it is good."""
  if not os.path.isfile(path):
    return "missing_image_file", f"image file {path} does not exist"
  with open(path, "rb") as f:
    data = f.read()
  try:
    images.check_image_bytes(data)
  except images.UnreadableImageError as e:
    return "unreadable_image", f"{path}: {e}"
  return None


def load_examples(vqa_cfg, data_cfg, split: str, tally: bad_records.Tally | None = None):
  """(examples, scene source or None) of `split`. JSONL lines go through `tally` (default:
  the config's `vqa.on_bad_record` policy)."""
  key = f"{split}_jsonl"  # train_jsonl, test_jsonl; other splits are the synthetic scenes'
  jsonl = vqa_cfg[key] if key in vqa_cfg else ""
  if jsonl:
    if data_cfg.regions != "patches":
      raise errors.InvalidInput(f"VQA from JSONL images needs config.data.regions='patches', got {data_cfg.regions!r}")
    if tally is None:
      tally = bad_records.Tally(vqa_cfg.on_bad_record)
    return _jsonl_examples(jsonl, tally), None
  source = pipeline.prepared_builder(data_cfg).as_data_source(split=split)
  return synthetic_vqa.split_questions(source, data_cfg.seed, vqa_cfg.questions_per_image), source


def _load_image(path: str, size: int) -> np.ndarray:
  with open(path, "rb") as f:
    return images.decode_resized(f.read(), size)


class ReadVQAExample:
  """Example index -> arrays (batch_lib.VQA_KEYS); indices past the end give a masked padding example.

  A class, not a closure, so grain can pickle it into worker processes.
  """

  def __init__(self, examples, source, tokenizer, data_cfg, answer_index: dict[str, int]):
    self._examples, self._source = examples, source
    self._tokenizer = tokenizer
    self._special_ids = tokenizer_lib.special_token_ids(tokenizer)
    self._data_cfg = data_cfg
    self._answer_index = answer_index
    empty = pipeline.empty_example(data_cfg, self._special_ids["pad"])
    self.empty = {k: empty[k] for k in batch_lib.VQA_KEYS if k in empty}
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
    out = {k: arrays[k] for k in batch_lib.VQA_KEYS if k in arrays}
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
