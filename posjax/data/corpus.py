"""Documents to pretrain on: the offline default corpus, or local text / JSON-lines / TSV files, cleaned.

posjax/data/sources.py turns either into a prepared tfds dataset; these are the readers its builder runs.

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
import re
import sysconfig
import zlib

from posjax.errors import ConfigError

MIN_DOC_CHARS = 40
# Longer documents (a megabyte line of scraped text) are cut, so that one record cannot stall batched
# tokenisation; at seq_len 512 this is still hundreds of sequences.
MAX_DOC_CHARS = 100_000
# Part of the name of every prepared local corpus: a change to what the readers make of a file prepares it
# afresh instead of reusing the older reading.
READER_VERSION = 2


@dataclasses.dataclass
class Corpus:
  documents: list[str]
  source: str
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def summary(self) -> str:
    words = sum(len(d.split()) for d in self.documents)
    return (f'{self.source}: {len(self.documents)} documents, {words} words; skipped or changed: '
            f'{why(self.skipped)}')


def why(skipped) -> str:
  """'N reason, M reason' of a skipped-records counter, or 'none'."""
  return ', '.join(f'{n} {reason}' for reason, n in sorted(skipped.items())) or 'none'


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
  docs = [d for d in (clean(d, skipped) for d in docs) if d is not None]
  return Corpus(docs, 'default corpus (pydoc_data topics + stdlib docstrings)', skipped)


# Markup left in scraped text (IMDB's `<br />`): replaced by a space, counted.
# Only tag names of HTML's text markup: `<stdin>` or `<module>` in prose are left alone.
_HTML_TAG = re.compile(r'</?(?:a|b|i|u|s|p|br|hr|em|strong|span|div|font|img|li|ul|ol|h[1-6]|table|tr|td|th|'
                       r'blockquote|pre|code|sub|sup|small|big|center)(?:\s[^<>]{0,200})?\s*/?>', re.IGNORECASE)


def _open_binary(path):
  return gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')


def _kind(path: str) -> str:
  base = path[:-3] if path.endswith('.gz') else path
  return {'.jsonl': 'json', '.json': 'json', '.tsv': 'tsv'}.get(os.path.splitext(base)[1], 'text')


def file_format(path: str) -> str:
  """How a file is read: 'text', 'json' or 'tsv', with '+gzip' when compressed."""
  return _kind(path) + ('+gzip' if path.endswith('.gz') else '')


# Reading is bounded by what is kept, never by a line: a plain-text document stops growing at this many bytes
# (UTF-8 takes at most 4 a character, so the cut to MAX_DOC_CHARS still has its whole text), a JSON-lines or
# TSV record longer than RECORD_BYTES is skipped (its escapes can take 6 bytes a character; 16 MiB holds 100,000
# characters many times over), and lines are read at most that many bytes at a time.
TEXT_BYTES = 4 * MAX_DOC_CHARS
RECORD_BYTES = 16 * 2**20


def _lines(f, limit: int):
  """(bytes, whole) for each line of a binary file, at most `limit` bytes each: of an overlong line, its first
  `limit` bytes with whole=False, the rest read and dropped in bounded pieces."""
  while True:
    raw = f.readline(limit)
    if not raw:
      return
    if raw.endswith(b'\n') or len(raw) < limit:
      yield raw, True
      continue
    while True:
      rest = f.readline(1 << 20)
      if not rest or rest.endswith(b'\n'):
        break
    yield raw, False


def _records(path: str, text_field: str, skipped: collections.Counter):
  """Raw texts of one file; undecodable or malformed records are counted in `skipped` and passed over."""
  kind = _kind(path)
  column = None
  paragraph, size = [], 0
  with _open_binary(path) as f:
    for raw, whole in _lines(f, TEXT_BYTES if kind == 'text' else RECORD_BYTES):
      if kind == 'text':
        if size >= TEXT_BYTES:  # this document is cut: its remaining lines are read and dropped
          if raw.strip():
            continue
        # A cut line may end inside a character: what precedes it is kept.
        try:
          line = raw.decode('utf-8') if whole else raw.decode('utf-8', errors='ignore')
        except UnicodeDecodeError:
          skipped['lines that are not valid UTF-8'] += 1
          continue
        if line.strip():
          paragraph.append(line)
          size += len(raw)
        elif paragraph:
          yield ''.join(paragraph)
          paragraph, size = [], 0
        continue
      if not whole:
        skipped[f'records over {RECORD_BYTES >> 20} MiB (skipped)'] += 1
        continue
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError:
        skipped['lines that are not valid UTF-8'] += 1
        continue
      if not line.strip():
        continue
      if kind == 'tsv':
        cells = line.rstrip('\r\n').split('\t')
        if column is None:  # the header row names the columns
          if text_field not in cells:
            raise ConfigError(f'data.text_field: {text_field!r} is not a column of {path} (columns: '
                              f'{", ".join(cells)})')
          column, width = cells.index(text_field), len(cells)
        elif len(cells) != width:
          skipped['TSV rows with the wrong number of columns'] += 1
        else:
          yield cells[column]
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        skipped['invalid JSON lines'] += 1
        continue
      text = record.get(text_field) if isinstance(record, dict) else None
      if not isinstance(text, str):
        skipped[f'records without a string {text_field!r} field'] += 1
        continue
      yield text
  if paragraph:
    yield ''.join(paragraph)


def clean(text: str, skipped: collections.Counter) -> str | None:
  """A document as the pipeline takes it: HTML tags removed, at most MAX_DOC_CHARS characters, or None when
  it is too short to learn from; each change is counted in `skipped`."""
  text, tags = _HTML_TAG.subn(' ', text)
  if tags:
    skipped['documents with HTML tags removed (kept)'] += 1
  text = text.strip()
  if len(text) > MAX_DOC_CHARS:
    skipped[f'documents cut to {MAX_DOC_CHARS} characters (kept)'] += 1
    text = text[:MAX_DOC_CHARS]
  if len(text) < MIN_DOC_CHARS:
    skipped[f'documents under {MIN_DOC_CHARS} characters'] += 1
    return None
  return text


def expand(patterns: str | list[str]) -> list[str]:
  """The files (not directories) matching glob `patterns` (comma-separated or a list), sorted per pattern."""
  if isinstance(patterns, str):
    patterns = [p.strip() for p in patterns.split(',') if p.strip()]
  paths = []
  for p in patterns:
    matched = sorted(m for m in glob.glob(os.path.expanduser(p)) if os.path.isfile(m))
    if not matched:
      raise ConfigError(f'data.files: {p!r} matches no file')
    paths.extend(matched)
  return paths


def iter_documents(paths: list[str], text_field: str, skipped: collections.Counter):
  """Cleaned documents of `paths` in order; everything passed over is counted in `skipped`, never fatal."""
  for path in paths:
    n = 0
    try:
      for text in _records(path, text_field, skipped):
        doc = clean(text, skipped)
        if doc is not None:
          n += 1
          yield doc
    except (OSError, EOFError, zlib.error) as e:  # truncated or damaged gzip, unreadable file: keep what was read
      skipped[f'unreadable or cut-short files ({type(e).__name__})'] += 1
    if not n:
      skipped['files without a usable document'] += 1


def read_files(patterns: str | list[str], text_field: str = 'text') -> Corpus:
  """Documents from files matching glob `patterns` (comma-separated or a list).

  `.jsonl`/`.json`: one JSON object per line, text in `text_field`; `.tsv`: a header row, text in the column
  named `text_field`; anything else is plain text where blank lines separate documents; each optionally
  `.gz`. Malformed records are skipped and counted, never fatal; a pattern that matches nothing, or files that
  hold no usable text, raise ConfigError before any compilation.
  """
  paths = expand(patterns)
  skipped = collections.Counter()
  docs = list(iter_documents(paths, text_field, skipped))
  corpus = Corpus(docs, f'{len(paths)} file(s) from {", ".join(paths[:3])}{" ..." if len(paths) > 3 else ""}',
                  skipped)
  if not docs:
    raise ConfigError(f'data.files: no usable text in {", ".join(paths)} ({corpus.summary()})')
  return corpus


def load(files: str, text_field: str = 'text') -> Corpus:
  """The configured corpus: `files` (glob patterns) or, when empty, the offline default."""
  return read_files(files, text_field) if files else default_corpus()
