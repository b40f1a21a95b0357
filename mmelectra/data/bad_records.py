"""Bad records: what counts as one, the `config.data.on_bad_record` policy, and counts.

A record is bad when it cannot become a valid example: its image bytes do not decode, its
image file is missing, its caption is empty, its region features have the wrong width or
non-finite values, or it has more boxes than the configured maximum. Two policies:

  "error": stop with a BadRecordError that names the file and the record;
  "skip":  drop the record, count it under its reason, report the counts.

Records are checked twice. Builders check what only the source files show (a missing
image, bytes that do not decode, a malformed TSV row) and write their counts to
`bad_records.json` beside the prepared data. The pipeline checks what depends on the run's
config (the tokenizer, `max_regions`, `feature_dim`); a record it skips becomes a masked
padding example (static shapes), and the batch carries its reason code in `skip_reason`
so the train loop can count it even when worker processes did the reading.
"""

from __future__ import annotations

import collections
import json
import os

from absl import logging
import numpy as np

from mmelectra import errors

POLICIES = ("error", "skip")

# Reason codes: index + 1 is the code a skipped example carries in batch["skip_reason"]
# (0: not skipped). Append only: codes are part of the batch contract.
REASONS = (
    "unreadable_image",     # image bytes that PIL cannot decode
    "missing_image_file",   # an annotation names an image file that does not exist
    "empty_caption",        # no caption text, or text that tokenises to nothing
    "wrong_feature_dim",    # region features whose width is not the configured one
    "non_finite_features",  # NaN/inf in features or boxes (or beyond float16 range)
    "too_many_boxes",       # num_boxes above config.data.max_regions
    "missing_features",     # a caption's img_id has no row in the feature TSVs
    "malformed_record",     # anything else: a bad TSV field, a wrong array shape
)
REPORT_FILE = "bad_records.json"
# How many record names per reason a report keeps (the counts are always complete).
_EXAMPLES_KEPT = 5


class BadRecordError(errors.InvalidInput):
  """A record that cannot become a valid example; `reason` is one of REASONS."""

  def __init__(self, message: str, reason: str = "malformed_record"):
    if reason not in REASONS:
      raise ValueError(f"unknown bad-record reason {reason!r}; expected one of {REASONS}")
    super().__init__(message)
    self.reason = reason

  def __reduce__(self):
    # Keeps the reason when the error crosses from a grain worker process.
    return (type(self), (str(self), self.reason))


def reason_code(reason: str) -> int:
  return REASONS.index(reason) + 1


def check_policy(policy: str) -> str:
  if policy not in POLICIES:
    raise errors.InvalidInput(f"config.data.on_bad_record is {policy!r}; expected one of {POLICIES}")
  return policy


# Text files are opened with errors="surrogateescape": a byte that is not UTF-8 becomes a
# lone surrogate instead of aborting the whole file, and the line holding it is one bad
# record (named, or skipped and counted) like any other.
TEXT_ERRORS = "surrogateescape"


def non_utf8(text: str) -> str | None:
  """Why `text` (read with TEXT_ERRORS) is not UTF-8, or None if it is."""
  for column, char in enumerate(text, 1):
    if "\udc80" <= char <= "\udcff":
      return f"byte 0x{ord(char) - 0xdc00:02x} at column {column} is not UTF-8"
  return None


class Tally:
  """Counts per reason plus the first few record names of each (for a build report)."""

  def __init__(self, policy: str):
    self.policy = check_policy(policy)
    self.counts = collections.Counter()
    self.examples = collections.defaultdict(list)

  def bad(self, where: str, reason: str, message: str) -> None:
    """Handles one bad record: raises under "error", counts it under "skip"."""
    error = BadRecordError(f"{where}: {message}", reason)
    if self.policy == "error":
      raise error
    self.counts[reason] += 1
    if len(self.examples[reason]) < _EXAMPLES_KEPT:
      self.examples[reason].append(str(error))
    if self.counts[reason] <= _EXAMPLES_KEPT:
      logging.warning("skipping bad record (%s): %s", reason, error)

  def report(self) -> dict:
    return {"policy": self.policy, "counts": dict(sorted(self.counts.items())),
            "examples": {k: v for k, v in sorted(self.examples.items())}}


def write_report(tally: Tally, directory) -> None:
  """Writes `bad_records.json` into `directory` (atomically, like the tokenizer files)."""
  path = os.path.join(os.fspath(directory), REPORT_FILE)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(tally.report(), f, indent=2)
  os.replace(tmp, path)
  if tally.counts:
    logging.warning("skipped %d bad records while building %s: %s", sum(tally.counts.values()),
                    directory, dict(tally.counts))


def read_report(directory) -> dict:
  """The build report of a prepared data set ({} counts for builders that write none)."""
  path = os.path.join(os.fspath(directory), REPORT_FILE)
  if not os.path.exists(path):
    return {"policy": None, "counts": {}, "examples": {}}
  with open(path) as f:
    return json.load(f)


def check_build_report(report: dict, policy: str, directory) -> None:
  """Under "error", a data set whose build skipped records is itself an error."""
  if check_policy(policy) == "error" and report["counts"]:
    first = next(iter(report["examples"].values()))[0]
    raise BadRecordError(
        f"the data set in {directory} was built with on_bad_record='skip' and dropped "
        f"{report['counts']} bad records (first: {first}); rebuild it or set "
        "config.data.on_bad_record='skip'", next(iter(report["counts"])))


class SkipCounter:
  """Train-loop side: takes `skip_reason` out of each batch and keeps running counts.

  `metrics()` gives `bad_records_<reason>`: the records the build dropped plus the examples
  the pipeline dropped so far in this run (every epoch re-reads, so re-counts, a record),
  summed over processes.
  """

  def __init__(self, build_counts: dict | None = None):
    self._build = np.array([(build_counts or {}).get(r, 0) for r in REASONS], np.int64)
    self._read = np.zeros(len(REASONS), np.int64)
    self._logged = self._build.copy()

  def take(self, batch: dict) -> dict:
    """The batch without `skip_reason` (absent under "error"); counts its skips."""
    if "skip_reason" not in batch:
      return batch
    batch = dict(batch)
    codes = np.asarray(batch.pop("skip_reason"))
    self._read += np.bincount(codes[codes > 0] - 1, minlength=len(REASONS))
    return batch

  def metrics(self) -> dict[str, float]:
    read = self._read
    import jax  # Only the train loop needs the cross-process sum.
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      read = np.asarray(multihost_utils.process_allgather(read)).sum(0)
    total = self._build + read
    if np.any(total != self._logged):
      logging.warning("bad records dropped so far: %s",
                      {r: int(n) for r, n in zip(REASONS, total) if n})
      self._logged = total
    return {f"bad_records_{r}": float(n) for r, n in zip(REASONS, total) if n}
