"""`mmelectra tokenizer ...`: train a WordPiece vocabulary, or try one on a text.

  mmelectra tokenizer train --corpus=captions.jsonl[,more.txt] --vocab_size=30522 --out=DIR
                            [--cased] [--deterministic]
  mmelectra tokenizer encode --tokenizer=DIR|vocab.txt|tokenizer.json [--cased] TEXT...

`train` writes DIR/tokenizer.json and DIR/vocab.txt (a plain BERT vocabulary, special
tokens [PAD] [UNK] [CLS] [SEP] [MASK] at ids 0-4); a run uses it with
`--config.data.tokenizer=DIR` (and `--config.model.vocab_size` >= its size). An existing
BERT/LXMERT `vocab.txt` needs no command: point `config.data.tokenizer` at it.

Corpus files, by extension: .txt (one text per line), .jsonl (`caption` or `captions`
fields, the image_text_folder layout), .csv (a `caption` column), .json (COCO captions
`annotations[].caption`, Karpathy `images[].sentences[].raw`, or LXMERT
`[{sentf: {source: [sentences]}}]`).

Training uses the Hugging Face `tokenizers` WordPiece trainer (fast on large corpora);
`--deterministic` uses mmelectra's exact trainer instead (same input, same ids on every
machine; slow beyond caption-sized corpora).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import tokenizers
from tokenizers import trainers

from mmelectra import errors
from mmelectra.data import tokenizer as tokenizer_lib


def read_corpus(path: str):
  """Yields the texts of one corpus file (formats in the module docstring)."""
  ext = os.path.splitext(path)[1].lower()
  with open(path, encoding="utf-8", newline="") as f:
    if ext == ".jsonl":
      for line in f:
        if line.strip():
          row = json.loads(line)
          yield from row.get("captions") or [row.get("caption") or ""]
    elif ext == ".csv":
      for row in csv.DictReader(f):
        yield row["caption"]
    elif ext == ".json":
      data = json.load(f)
      if isinstance(data, list):  # LXMERT
        for entry in data:
          for sentences in entry.get("sentf", {}).values():
            yield from sentences
      elif "annotations" in data:  # COCO captions
        for ann in data["annotations"]:
          yield ann["caption"]
      elif "images" in data:  # Karpathy
        for image in data["images"]:
          for sentence in image.get("sentences", ()):
            yield sentence["raw"]
      else:
        raise errors.InvalidInput(f"{path}: not a COCO, Karpathy or LXMERT caption file")
    else:
      for line in f:
        yield line.rstrip("\n")


def train(corpus_paths, vocab_size: int, lowercase: bool = True,
          deterministic: bool = False) -> tokenizers.Tokenizer:
  """A BERT WordPiece tokenizer trained on the corpus files; specials get ids 0-4."""
  for path in corpus_paths:
    if not os.path.isfile(path):
      raise errors.NotFound(f"corpus file {path} does not exist")
  texts = (t for path in corpus_paths for t in read_corpus(path) if t.strip())
  if deterministic:
    return tokenizer_lib.train_wordpiece(texts, vocab_size, lowercase)
  # The HF trainer on mmelectra's BERT normaliser and pre-tokeniser; its vocabulary is
  # then rebuilt with from_vocab so the result is the same kind of tokenizer either way.
  hf = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
  tokenizer_lib.make_bert_pipeline(hf, lowercase)
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=1,
                                      special_tokens=list(tokenizer_lib.SPECIAL_TOKENS),
                                      continuing_subword_prefix="##", show_progress=False)
  hf.train_from_iterator(texts, trainer=trainer)
  return tokenizer_lib.from_vocab(tokenizer_lib.vocab_in_id_order(hf), lowercase)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mmelectra tokenizer", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="action", required=True)
  p = sub.add_parser("train", help="train a WordPiece vocabulary on caption files")
  p.add_argument("--corpus", required=True, help="comma-separated corpus files")
  p.add_argument("--vocab_size", type=int, required=True)
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--cased", action="store_true", help="keep case (default: lowercase)")
  p.add_argument("--deterministic", action="store_true",
                 help="mmelectra's exact trainer instead of the Hugging Face one")
  p = sub.add_parser("encode", help="show how a tokenizer splits a text")
  p.add_argument("--tokenizer", required=True, help="directory, vocab.txt or tokenizer.json")
  p.add_argument("--cased", action="store_true", help="a bare vocab.txt keeps case")
  p.add_argument("text", nargs="+")
  return parser


def main(argv) -> int:
  args = _parser().parse_args(argv)
  if args.action == "train":
    paths = [p for p in args.corpus.split(",") if p]
    tokenizer = train(paths, args.vocab_size, lowercase=not args.cased,
                      deterministic=args.deterministic)
    tokenizer_lib.save(tokenizer, args.out)
    print(f"wrote {tokenizer.get_vocab_size()} tokens to {args.out}/"
          f"{{{tokenizer_lib.TOKENIZER_JSON},{tokenizer_lib.VOCAB_TXT}}}")
  else:
    tokenizer = tokenizer_lib.load(args.tokenizer, lowercase=not args.cased)
    encoding = tokenizer.encode(" ".join(args.text))
    print(" ".join(encoding.tokens))
    print(" ".join(map(str, encoding.ids)))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
