"""`mmelectra tokenizer train|encode`: corpus formats, uncased default, BERT vocab.txt out."""

import json
import os
import subprocess
import sys

import pytest

from mmelectra.data import tokenizer as tokenizer_lib
from mmelectra.data import tokenizer_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def corpus(tmp_path):
  """The same kind of captions in each format the CLI reads; returns the paths."""
  paths = {
      "txt": tmp_path / "lines.txt",
      "jsonl": tmp_path / "captions.jsonl",
      "csv": tmp_path / "captions.csv",
      "coco": tmp_path / "captions_train2014.json",
      "karpathy": tmp_path / "dataset_coco.json",
      "lxmert": tmp_path / "mscoco_train.json",
  }
  paths["txt"].write_text("A Zebra grazing\nthe zebra sleeps\n")
  paths["jsonl"].write_text(json.dumps({"image": "a.jpg", "captions": ["Giraffe eating"]}) + "\n"
                            + json.dumps({"image": "b.jpg", "caption": "giraffe running"}) + "\n")
  paths["csv"].write_text("image,caption\na.jpg,Pelican flying\n")
  paths["coco"].write_text(json.dumps({"images": [], "annotations": [{"caption": "Walrus resting"}]}))
  paths["karpathy"].write_text(json.dumps({"images": [{"sentences": [{"raw": "Otter swimming"}]}]}))
  paths["lxmert"].write_text(json.dumps([{"img_id": "x", "sentf": {"mscoco": ["Beaver building"],
                                                                   "vg": ["beaver dam"]}}]))
  return paths


def test_read_corpus_reads_every_format(corpus):
  texts = {k: list(tokenizer_cli.read_corpus(str(p))) for k, p in corpus.items()}
  assert texts == {"txt": ["A Zebra grazing", "the zebra sleeps"],
                   "jsonl": ["Giraffe eating", "giraffe running"], "csv": ["Pelican flying"],
                   "coco": ["Walrus resting"], "karpathy": ["Otter swimming"],
                   "lxmert": ["Beaver building", "beaver dam"]}


def test_cli_trains_an_uncased_bert_vocabulary(corpus, tmp_path):
  out = tmp_path / "tok"
  result = subprocess.run(
      [sys.executable, "-m", "mmelectra.main", "tokenizer", "train",
       "--corpus=" + ",".join(str(p) for p in corpus.values()), "--vocab_size=120", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "wrote" in result.stdout
  tokens = (out / "vocab.txt").read_text().splitlines()
  assert tokens[:5] == list(tokenizer_lib.SPECIAL_TOKENS) and len(tokens) <= 120
  for path in (out, out / "vocab.txt"):  # tokenizer.json, and the bare BERT vocab.txt
    tokenizer = tokenizer_lib.load(str(path))
    for text in ("zebra giraffe pelican walrus otter beaver", "ZEBRA Giraffe"):
      encoding = tokenizer.encode(text)
      assert "[UNK]" not in encoding.tokens, (path, encoding.tokens)
    assert tokenizer.encode("ZEBRA").ids == tokenizer.encode("zebra").ids


def test_cased_deterministic_training_keeps_case_and_repeats_exactly(corpus, tmp_path, capsys):
  args = ["train", f"--corpus={corpus['txt']},{corpus['jsonl']}", "--vocab_size=70", "--cased",
          "--deterministic"]
  assert tokenizer_cli.main(args + [f"--out={tmp_path / 'a'}"]) == 0
  assert tokenizer_cli.main(args + [f"--out={tmp_path / 'b'}"]) == 0
  assert (tmp_path / "a" / "vocab.txt").read_text() == (tmp_path / "b" / "vocab.txt").read_text()
  tokenizer = tokenizer_lib.load(str(tmp_path / "a"))
  assert tokenizer.encode("Zebra").ids != tokenizer.encode("zebra").ids
  capsys.readouterr()
  assert tokenizer_cli.main(["encode", f"--tokenizer={tmp_path / 'a'}", "Zebra", "grazing"]) == 0
  tokens, ids = capsys.readouterr().out.splitlines()
  assert tokens.split()[0] == "[CLS]" and tokens.split()[-1] == "[SEP]"
  assert [int(i) for i in ids.split()] == tokenizer.encode("Zebra grazing").ids


def test_missing_corpus_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    tokenizer_cli.main(["train", f"--corpus={tmp_path / 'nope.txt'}", "--vocab_size=50",
                        f"--out={tmp_path / 'o'}"])
