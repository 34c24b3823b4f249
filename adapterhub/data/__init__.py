"""Data preparation: inspect, clean, deduplicate, balance, split, mix and augment datasets in the trainer's formats.

Public API (each verb streams its input in bounded batches and writes JSONL plus a data card):
    inspect_file(path, tokenizer=, max_length=) -> InspectReport     (inspection.py)
    clean_file(path, out, scrub_pii=, max_chars=) -> VerbResult      (clean.py)
    dedup_file(path, out, near=, against=) -> VerbResult             (dedup.py)
    balance_file(path, out, mode=, target=, seed=) -> VerbResult     (sampling.py)
    split_file(path, out_dir, fractions=, seed=) -> VerbResult       (sampling.py)
    mix_files(sources, out, temperature=, seed=) -> VerbResult       (sampling.py)
    augment_file(path, out, model=, settings=, source=) -> VerbResult (augment.py; `model` is a
        ChatModel: `adapterhub.serving.chat_clients` has the in-process engine and the HTTP client)
    parse_source(text) -> MixSource  ("FILE[:WEIGHT]", shared with `adapterhub train --data`)

Design decisions:
- Files are read through `adapterhub.datafiles.iter_data_file`, the streaming twin of the
  trainer's reader, so a row the trainer rejects is rejected here with the same location.
- Verbs that need the whole file's shape (balance, split, mix) make two passes: the first
  counts, the second writes. Memory holds counts and chosen row positions, never the rows.
- Everything a verb writes goes to temp files renamed into place at the end (`output.py`): a
  bad row found half-way leaves nothing behind.
- No DB here (DESIGN.md): the CLI registers what a verb wrote as a dataset record.
"""

from adapterhub.data.augment import AugmentSettings, ChatModel, ChatRequest, augment_file
from adapterhub.data.clean import clean_file
from adapterhub.data.dedup import dedup_file
from adapterhub.data.inspection import InspectReport, inspect_file
from adapterhub.data.output import VerbResult
from adapterhub.data.sampling import MixSource, balance_file, mix_files, parse_source, split_file

__all__ = [
    "AugmentSettings",
    "ChatModel",
    "ChatRequest",
    "InspectReport",
    "MixSource",
    "VerbResult",
    "augment_file",
    "balance_file",
    "clean_file",
    "dedup_file",
    "inspect_file",
    "mix_files",
    "parse_source",
    "split_file",
]
