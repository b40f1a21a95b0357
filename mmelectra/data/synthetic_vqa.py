"""A VQA derivative of the synthetic scenes: questions with one-word answers.

Questions are derived from a scene's stored objects (shape, colour, size, box), so they
need nothing but the prepared synthetic-scenes data set, and are deterministic: the
questions of a scene depend only on `(seed, image_id)`. Five kinds:

  colour    "what colour is the circle"               (the shape names one object)
  shape     "what shape is the red one"               (the colour names one object)
  size      "is the red circle small or large"
  count     "count the shapes", "count the circles"   (zero .. four)
  position  "where is the red circle relative to the blue square"  (left/right/above/below)

Question words are spelled with the scenes' caption vocabulary where possible, so the
tokenizer trained on the captions covers them without unknown tokens. Every answer is
listed ANNOTATORS times, as if ten annotators agreed (VQA v2 has ten answers per
question), so its VQA soft score min(1, count / 3) is 1.
"""

from __future__ import annotations

import numpy as np

from mmelectra.data import scene_words

QUESTION_TYPES = ("colour", "shape", "size", "count", "position")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
ANNOTATORS = 10
# Mixed into the scene's seed so questions never reuse the scene's own random stream.
_QUESTION_STREAM = 7_151


def candidate_questions(objects) -> dict[str, list[tuple[str, str]]]:
  """Every (question, answer) a scene supports, by question type.

  objects: the scene record's `objects` ({boxes [N, 4], shape [N], colour [N], size [N]}).
  """
  shapes = [int(s) for s in objects["shape"]]
  colours = [int(c) for c in objects["colour"]]
  sizes = [int(s) for s in objects["size"]]
  boxes = np.asarray(objects["boxes"], np.float32).reshape(-1, 4)
  shape_names = [scene_words.SHAPES[s] for s in shapes]
  colour_names = [scene_words.COLOURS[c] for c in colours]
  n = len(shapes)
  out = {t: [] for t in QUESTION_TYPES}
  for i in range(n):
    if shapes.count(shapes[i]) == 1:
      out["colour"].append((f"what colour is the {shape_names[i]}", colour_names[i]))
    if colours.count(colours[i]) == 1:
      out["shape"].append((f"what shape is the {colour_names[i]} one", shape_names[i]))
    out["size"].append((f"is the {colour_names[i]} {shape_names[i]} small or large",
                        scene_words.SIZES[sizes[i]]))
  out["count"].append(("count the shapes", NUMBER_WORDS[n]))
  for shape_id, name in enumerate(scene_words.SHAPES):
    out["count"].append((f"count the {PLURALS[name]}", NUMBER_WORDS[shapes.count(shape_id)]))
  for i in range(n):
    for j in range(n):
      if i != j:
        out["position"].append((
            f"where is the {colour_names[i]} {shape_names[i]} relative to the "
            f"{colour_names[j]} {shape_names[j]}", scene_words.relation(boxes[i], boxes[j])))
  return out


def scene_questions(objects, seed: int, image_id: int, num_questions: int) -> list[dict]:
  """`num_questions` distinct questions of one scene, types spread evenly, deterministic.

  Returns [{question, answers (ANNOTATORS copies), type}]; fewer if the scene has fewer.
  """
  rng = np.random.default_rng([seed, image_id, _QUESTION_STREAM])
  candidates = candidate_questions(objects)
  pools = {t: [candidates[t][k] for k in rng.permutation(len(candidates[t]))] for t in QUESTION_TYPES}
  types = [QUESTION_TYPES[k] for k in rng.permutation(len(QUESTION_TYPES))]
  out = []
  while len(out) < num_questions and any(pools.values()):
    for t in types:
      if pools[t] and len(out) < num_questions:
        question, answer = pools[t].pop(0)
        out.append({"question": question, "answers": [answer] * ANNOTATORS, "type": t})
  return out


def split_questions(source, seed: int, num_questions: int) -> list[dict]:
  """Questions of every scene of a split (a random-access TFDS data source), in order.

  Each entry also carries `record` (the scene's index in `source`) and `image_id`.
  """
  out = []
  for index in range(len(source)):
    record = source[index]
    image_id = int(record["image_id"])
    for q in scene_questions(record["objects"], seed, image_id, num_questions):
      out.append({"record": index, "image_id": image_id, **q})
  return out
