"""Documents to pretrain on: the offline default corpus, or local text / JSON-lines files.

The default corpus is real English prose that every CPython installation carries: the language reference and
library topics of `pydoc_data` plus the docstrings of the standard library's own modules (read with `ast`,
never imported). It is a few hundred thousand words: enough for a tiny model to learn visibly in minutes.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import glob
import gzip
import json
import os
import sysconfig
import zlib

from posjax.errors import ConfigError

MIN_DOC_CHARS = 40
# Longer "documents" are a file without blank lines or a runaway record, not prose to pack: skipped, counted.
MAX_DOC_CHARS = 1_000_000


@dataclasses.dataclass
class Corpus:
  documents: list[str]
  source: str
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def summary(self) -> str:
    words = sum(len(d.split()) for d in self.documents)
    skipped = ', '.join(f'{n} {why}' for why, n in sorted(self.skipped.items())) or 'none'
    return f'{self.source}: {len(self.documents)} documents, {words} words; skipped: {skipped}'


def default_corpus() -> Corpus:
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top
  docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
  skipped = collections.Counter()
  stdlib = sysconfig.get_paths()['stdlib']
  for path in sorted(glob.glob(os.path.join(stdlib, '*.py'))):
    try:
      with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
      skipped['unparsable stdlib files'] += 1
      continue
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc and len(doc) >= 200:
          docs.append(doc)
  docs, short, long = _clean(docs)
  skipped[f'documents under {MIN_DOC_CHARS} characters'] += short
  skipped[f'documents over {MAX_DOC_CHARS} characters'] += long
  skipped = +skipped  # drop zero counts
  return Corpus(docs, 'default corpus (pydoc_data topics + stdlib docstrings)', skipped)


def _clean(docs):
  """(documents of MIN_DOC_CHARS..MAX_DOC_CHARS characters, stripped; how many were shorter; how many longer)"""
  stripped = [d.strip() for d in docs]
  kept = [d for d in stripped if MIN_DOC_CHARS <= len(d) <= MAX_DOC_CHARS]
  long = sum(len(d) > MAX_DOC_CHARS for d in stripped)
  return kept, len(docs) - len(kept) - long, long


def _open_binary(path):
  return gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')


def _json_texts(f, text_field, skipped):
  for raw in f:
    if not raw.strip():
      continue
    try:
      record = json.loads(raw.decode('utf-8'))
    except UnicodeDecodeError:
      skipped['JSON lines that are not valid UTF-8'] += 1
      continue
    except json.JSONDecodeError:
      skipped['invalid JSON lines'] += 1
      continue
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
      skipped[f'records without a string {text_field!r} field'] += 1
      continue
    yield text


def read_files(patterns: str | list[str], text_field: str = 'text') -> Corpus:
  """Documents from files matching glob `patterns` (comma-separated or a list).

  `.jsonl`/`.json` (optionally `.gz`): one JSON object per line, text in `text_field`. Anything else is plain
  text where blank lines separate documents. Malformed records are skipped and counted, never fatal; a pattern
  that matches nothing, or files that hold no usable text, raise ValueError before any compilation.
  """
  if isinstance(patterns, str):
    patterns = [p.strip() for p in patterns.split(',') if p.strip()]
  paths = []
  for p in patterns:
    matched = sorted(glob.glob(os.path.expanduser(p)))
    if not matched:
      raise ConfigError(f'data.files: {p!r} matches no file')
    paths.extend(matched)
  docs, skipped = [], collections.Counter()
  for path in paths:
    is_json = any(path.endswith(s) for s in ('.jsonl', '.json', '.jsonl.gz', '.json.gz'))
    try:
      with _open_binary(path) as f:
        if is_json:
          for text in _json_texts(f, text_field, skipped):  # a damaged file keeps the records before the damage
            docs.append(text)
        else:
          docs.extend(f.read().decode('utf-8').replace('\r\n', '\n').replace('\r', '\n').split('\n\n'))
    except UnicodeDecodeError:
      skipped['files that are not valid UTF-8'] += 1
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged .gz past its header
      skipped[f'unreadable or cut-short files ({type(e).__name__})'] += 1
  docs, short, long = _clean(docs)
  skipped[f'documents under {MIN_DOC_CHARS} characters'] += short
  skipped[f'documents over {MAX_DOC_CHARS} characters'] += long
  skipped = +skipped  # drop zero counts
  corpus = Corpus(docs, f'{len(paths)} file(s) from {", ".join(patterns)}', skipped)
  if not docs:
    raise ConfigError(f'data.files: no usable text in {", ".join(paths)} ({corpus.summary()})')
  return corpus


def load(files: str, text_field: str = 'text') -> Corpus:
  """The configured corpus: `files` (glob patterns) or, when empty, the offline default."""
  return read_files(files, text_field) if files else default_corpus()
