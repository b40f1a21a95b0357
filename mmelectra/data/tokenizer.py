"""BERT-style WordPiece tokenizer: train, save, load, special token ids.

The saved `vocab.txt` is a plain BERT vocabulary (one token per line, id order), so a
tokenizer trained here can be loaded by BERT/LXMERT tooling, and a BERT `vocab.txt` can be
loaded here with the same normalisation and pre-tokenisation as `BertWordPieceTokenizer`.
"""

from __future__ import annotations

import collections
import os
from typing import Mapping, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from mmelectra import errors

# Order fixes the ids: [PAD] must be 0 because the pipeline pads with zeros.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SPECIAL_KEYS = dict(pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]")

TOKENIZER_JSON = "tokenizer.json"
VOCAB_TXT = "vocab.txt"


def special_token_ids(tokenizer: tokenizers.Tokenizer) -> dict[str, int]:
  """Returns {pad, unk, cls, sep, mask} -> id; KeyError naming any missing token."""
  ids = {}
  for key, token in _SPECIAL_KEYS.items():
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
      raise errors.MissingEntry(f"special token {token} ({key}) is not in the tokenizer vocabulary")
    ids[key] = token_id
  return ids


def make_bert_pipeline(tokenizer: tokenizers.Tokenizer, lowercase: bool) -> None:
  """Sets BertWordPieceTokenizer's normaliser, pre-tokeniser and decoder in place."""
  tokenizer.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece(prefix="##")


def _add_cls_sep_template(tokenizer: tokenizers.Tokenizer) -> None:
  ids = special_token_ids(tokenizer)
  tokenizer.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]",
      pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", ids["cls"]), ("[SEP]", ids["sep"])],
  )


def _word_counts(texts, lowercase: bool) -> collections.Counter:
  """Words as the tokenizer will see them: BERT-normalised and pre-tokenised."""
  splitter = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
  make_bert_pipeline(splitter, lowercase)
  counts = collections.Counter()
  for text in texts:
    normalised = splitter.normalizer.normalize_str(text)
    counts.update(word for word, _ in splitter.pre_tokenizer.pre_tokenize_str(normalised))
  return counts


def learn_wordpiece_vocab(word_counts: Mapping[str, int], vocab_size: int) -> list[str]:
  """WordPiece vocabulary by count-weighted pair merges, ties broken by the pair's text.

  The same algorithm as the `tokenizers` WordPiece trainer (characters, "##"-prefixed
  continuations, then the most frequent adjacent pair merged until `vocab_size`), but
  deterministic: that trainer breaks ties in hash-map order, so two builds of the same
  data could get different vocabularies. Cost grows with merges x distinct pairs, which
  suits caption corpora; large corpora should bring a BERT vocab.txt instead.
  """
  words = [([w[0]] + ["##" + c for c in w[1:]], n) for w, n in sorted(word_counts.items())]
  alphabet = sorted({symbol for symbols, _ in words for symbol in symbols})
  vocab = list(SPECIAL_TOKENS) + [s for s in alphabet if s not in SPECIAL_TOKENS]
  if len(vocab) > vocab_size:
    raise errors.InvalidInput(f"vocab_size {vocab_size} is smaller than the {len(SPECIAL_TOKENS)} "
                              f"special tokens plus the {len(alphabet)}-symbol alphabet")
  pair_counts = collections.Counter()
  pair_words = collections.defaultdict(set)  # pair -> indices of words containing it
  for index, (symbols, count) in enumerate(words):
    for pair in zip(symbols, symbols[1:]):
      pair_counts[pair] += count
      pair_words[pair].add(index)
  known = set(vocab)
  while len(vocab) < vocab_size and pair_counts:
    best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
    left, right = best
    merged = left + right[2:]  # right always carries the "##" prefix
    for index in sorted(pair_words.pop(best)):
      symbols, count = words[index]
      for pair in zip(symbols, symbols[1:]):
        pair_counts[pair] -= count
        if pair_counts[pair] <= 0:
          del pair_counts[pair]
      out, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
          out.append(merged)
          i += 2
        else:
          out.append(symbols[i])
          i += 1
      words[index] = (out, count)
      for pair in zip(out, out[1:]):
        pair_counts[pair] += count
        pair_words[pair].add(index)
    if merged not in known:
      known.add(merged)
      vocab.append(merged)
  return vocab


def from_vocab(tokens: Sequence[str], lowercase: bool = True) -> tokenizers.Tokenizer:
  """BERT WordPiece tokenizer over `tokens` (id = position), like BertWordPieceTokenizer."""
  vocab = {}
  for index, token in enumerate(tokens):
    if token in vocab:
      raise ValueError(f"token {token!r} at id {index} repeats id {vocab[token]}")
    vocab[token] = index
  tokenizer = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  # Registering the specials stops the pre-tokeniser from splitting "[CLS]" into pieces.
  tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
  make_bert_pipeline(tokenizer, lowercase)
  _add_cls_sep_template(tokenizer)
  return tokenizer


def train_wordpiece(texts, vocab_size: int, lowercase: bool = True) -> tokenizers.Tokenizer:
  """Trains a WordPiece tokenizer on an iterable of strings; specials get ids 0..4.

  Deterministic: the same texts always give the same vocabulary and ids.
  """
  return from_vocab(learn_wordpiece_vocab(_word_counts(texts, lowercase), vocab_size),
                    lowercase)


def vocab_in_id_order(tokenizer: tokenizers.Tokenizer) -> list[str]:
  """Tokens ordered by id; errors if ids have gaps (vocab.txt could not express them)."""
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  tokens = sorted(vocab, key=vocab.get)
  if [vocab[t] for t in tokens] != list(range(len(tokens))):
    raise ValueError("tokenizer ids are not contiguous from 0; cannot write vocab.txt")
  return tokens


def save(tokenizer: tokenizers.Tokenizer, directory) -> None:
  """Writes tokenizer.json and vocab.txt into `directory` (created if missing).

  Each file is written to a per-process temporary name and renamed, so neither a reader
  nor a second writer ever sees half a file.
  """
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  tokens = vocab_in_id_order(tokenizer)
  bad = [t for t in tokens if "\n" in t or "\r" in t or not t.strip()]
  if bad:
    raise ValueError(f"tokens {bad!r} cannot be written one per line to {VOCAB_TXT}")
  vocab_path = os.path.join(directory, VOCAB_TXT)
  json_path = os.path.join(directory, TOKENIZER_JSON)
  suffix = f".tmp{os.getpid()}"
  with open(vocab_path + suffix, "w", encoding="utf-8") as f:
    f.write("\n".join(tokens) + "\n")
  tokenizer.save(json_path + suffix)
  os.replace(vocab_path + suffix, vocab_path)
  os.replace(json_path + suffix, json_path)


def _from_vocab_txt(path: str, lowercase: bool) -> tokenizers.Tokenizer:
  with open(path, encoding="utf-8") as f:
    tokens = [line.rstrip("\r\n") for line in f]
  while tokens and not tokens[-1]:
    tokens.pop()
  try:
    return from_vocab(tokens, lowercase)
  except ValueError as e:
    raise errors.InvalidInput(f"{path}: {e}") from e


def load(path, lowercase: bool = True) -> tokenizers.Tokenizer:
  """Loads a directory (tokenizer.json, else vocab.txt), a tokenizer.json or a vocab.txt.

  `lowercase` only applies to a bare vocab.txt; tokenizer.json carries its own normaliser.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    json_path = os.path.join(path, TOKENIZER_JSON)
    vocab_path = os.path.join(path, VOCAB_TXT)
    if os.path.exists(json_path):
      return tokenizers.Tokenizer.from_file(json_path)
    if os.path.exists(vocab_path):
      return _from_vocab_txt(vocab_path, lowercase)
    raise errors.NotFound(f"neither {TOKENIZER_JSON} nor {VOCAB_TXT} in {path}")
  if not os.path.exists(path):
    raise errors.NotFound(f"no tokenizer at {path}")
  if path.endswith(".json"):
    return tokenizers.Tokenizer.from_file(path)
  return _from_vocab_txt(path, lowercase)
