"""Fine-tuning data: GLUE's own TSV files, IMDB JSON lines, or tfds (`glue/<task>`, `imdb_reviews`), turned
into fixed-length id arrays with Hugging Face tokenizers.

The readers return `Examples` (texts, labels, submission indices); `encode` is the only place text becomes
ids, so another input pipeline can take over from `Examples` unchanged.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os

from absl import logging
import numpy as np
from tokenizers import Tokenizer, processors

from posjax.errors import ConfigError
from posjax.finetune.tasks import Split, Task

SOURCES = ('tsv', 'tfds')


@dataclasses.dataclass
class Examples:
  texts: tuple[list[str], ...]  # one list per sentence of the input (two for pair tasks)
  labels: np.ndarray | None  # int32 class ids (float32 for regression); None for test files
  index: list[str]  # GLUE's submission index of each example

  def __len__(self):
    return len(self.texts[0])


def _label(task: Task, value: str, where: str):
  if task.regression:
    try:
      return float(value)
    except ValueError:
      raise ConfigError(f'{where}: label {value!r} is not a number ({task.name} is a regression task)') from None
  if value not in task.labels:
    raise ConfigError(f'{where}: label {value!r} is not one of {", ".join(task.labels)} ({task.name})')
  return task.labels.index(value)


def _utf8_lines(f, path: str):
  """(line number, text) of a binary file; a line that is not UTF-8 is an error naming the file and line."""
  for n, raw in enumerate(f, 1):
    try:
      yield n, raw.decode('utf-8')
    except UnicodeDecodeError as e:
      raise ConfigError(f'{path}, line {n}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the '
                        'line); save the file as UTF-8') from None


def read_tsv(task: Task, split: Split, directory: str) -> Examples:
  """One split of a task from GLUE's TSV layout. Rows are split on tabs only (GLUE's files hold unescaped
  quotes); every row must have the header's column count (CoLA, headerless: 4)."""
  path = os.path.join(directory, split.file)
  if not os.path.exists(path):
    raise ConfigError(f'{task.name}: {path} does not exist (data.dir: GLUE\'s root holding {task.glue_dir}/, '
                      f'or that directory itself, with {", ".join(s.file for s in _splits(task))})')
  texts = tuple([] for _ in split.text)
  labels, index = [], []
  expected = None if split.header else max(split.text + (split.label or 0,)) + 1
  with open(path, 'rb') as f:
    for n, line in _utf8_lines(f, path):
      line = line.rstrip('\r\n')
      if split.header and n == 1:
        expected = len(line.split('\t'))
        continue
      if not line.strip():
        continue
      cols = line.split('\t')
      where = f'{path}, line {n}'
      if len(cols) != expected:
        raise ConfigError(f'{where}: {len(cols)} tab-separated columns, expected {expected} '
                          f'({task.name} {split.file})')
      for t, c in zip(texts, split.text):
        t.append(cols[c])
      if split.label is not None:
        labels.append(_label(task, cols[split.label].strip(), where))
      index.append(cols[split.index] if split.index is not None else str(len(index)))
  if not index:
    raise ConfigError(f'{path}: no examples')
  return Examples(texts, _labels(task, labels) if split.label is not None else None, index)


def _labels(task, labels):
  return np.asarray(labels, np.float32 if task.regression else np.int32)


def read_jsonl(task: Task, split: Split, directory: str, text_field: str = 'text',
               label_field: str = 'label') -> Examples:
  """IMDB-style JSON lines (optionally gzip): `text_field` and an integer `label_field` per record."""
  path = os.path.join(directory, split.file)
  if not os.path.exists(path):
    raise ConfigError(f'{task.name}: {path} does not exist (data.dir should hold {split.file})')
  texts, labels = [], []
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    for n, line in _utf8_lines(f, path):
      if not line.strip():
        continue
      where = f'{path}, line {n}'
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f'{where}: not valid JSON ({e.msg})') from None
      if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ConfigError(f'{where}: no string field {text_field!r}')
      texts.append(record[text_field])
      labels.append(_label(task, str(record.get(label_field)), where))
  if not texts:
    raise ConfigError(f'{path}: no examples')
  return Examples((texts,), _labels(task, labels), [str(i) for i in range(len(texts))])


def read_tfds(task: Task, split: Split, data_dir: str = '', labelled: bool = True) -> Examples:
  """A split of a prepared tfds dataset, read through `tfds.data_source` (no TensorFlow needed)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.data_source(task.tfds_name, split=split.tfds, data_dir=data_dir or None, download=False)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises several kinds for "not there")
    raise ConfigError(
        f'tfds dataset {task.tfds_name!r} (split {split.tfds!r}) is not prepared in '
        f'{data_dir or "the default tfds data_dir"} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); '
        f'prepare it with `tfds build {task.tfds_name}` on a machine with internet access, or use '
        f'data.source=tsv with GLUE\'s files') from None
  names = source.dataset_info.features['label'].names if not task.regression else None
  texts = tuple([] for _ in task.tfds_text)
  labels, index = [], []
  for i in range(len(source)):
    record = source[i]
    for t, field in zip(texts, task.tfds_text):
      value = record[field]
      t.append(value.decode('utf-8') if isinstance(value, bytes) else str(value))
    if labelled:
      label = record['label']
      if task.regression:
        labels.append(float(label))
      else:
        # tfds names GLUE's classes (sst2: negative, positive) where the TSVs write 0 and 1; the class index
        # is the TSV's number. MNLI, QNLI and RTE spell them alike in both.
        name = names[int(label)]
        labels.append(task.labels.index(name if name in task.labels else str(int(label))))
    index.append(str(int(record['idx'])) if 'idx' in record else str(i))
  return Examples(texts, _labels(task, labels) if labelled else None, index)


def _splits(task: Task):
  return [task.train] + [s for _, s in task.dev] + list(task.test)


def read(task: Task, split: Split, source: str, directory: str, labelled: bool = True) -> Examples:
  if source not in SOURCES:
    raise ConfigError(f'data.source {source!r} is not one of {", ".join(SOURCES)}')
  if source == 'tfds':
    return read_tfds(task, split, directory, labelled)
  if not directory:
    raise ConfigError(f'data.dir is empty: set it to the directory of {task.name}\'s files '
                      f'({", ".join(s.file for s in _splits(task))}), or use data.source=tfds')
  if split.file.endswith(('.jsonl', '.jsonl.gz')):
    return read_jsonl(task, split, directory)
  return read_tsv(task, split, directory)


def with_bert_template(tok: Tokenizer) -> Tokenizer:
  """A copy of `tok` that writes [CLS] A [SEP] (B [SEP]) with type ids 0/1, the input format of all four
  model families, whatever post-processor (or none: a bare vocab.txt) the tokenizer came with."""
  ids = {t: tok.token_to_id(t) for t in ('[CLS]', '[SEP]', '[PAD]')}
  missing = [t for t, i in ids.items() if i is None]
  if missing:
    raise ConfigError(f'the tokenizer has no {", ".join(missing)} token; fine-tuning needs [CLS], [SEP], [PAD]')
  tok = Tokenizer.from_str(tok.to_str())
  tok.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[('[CLS]', ids['[CLS]']), ('[SEP]', ids['[SEP]'])])
  return tok


def encode(tok: Tokenizer, examples: Examples, max_len: int, batch: int = 4096) -> dict[str, np.ndarray]:
  """{'ids', 'mask', 'type_ids'} int32 NxL, truncated longest-first to `max_len` and padded."""
  tok = with_bert_template(tok)
  tok.enable_truncation(max_len, strategy='longest_first')
  tok.enable_padding(length=max_len, pad_id=tok.token_to_id('[PAD]'), pad_token='[PAD]')
  out = {'ids': [], 'mask': [], 'type_ids': []}
  n = len(examples)
  for s in range(0, n, batch):
    inputs = list(zip(*(t[s:s + batch] for t in examples.texts))) if len(examples.texts) > 1 else \
        examples.texts[0][s:s + batch]
    for e in tok.encode_batch(inputs):
      out['ids'].append(e.ids)
      out['mask'].append(e.attention_mask)
      out['type_ids'].append(e.type_ids)
  return {k: np.asarray(v, np.int32).reshape(n, max_len) for k, v in out.items()}


def task_directory(task, directory: str) -> str:
  """GLUE's root (holding the task's directory) or the task's own directory."""
  nested = os.path.join(directory, task.glue_dir)
  return nested if directory and os.path.isdir(nested) else directory


def read_examples(task, config):
  """(train Examples, [(dev name, Examples)], [(test split, Examples)])."""
  source, directory = config.data.source, config.data.dir
  if source == 'tsv':
    directory = task_directory(task, directory)
  train = read(task, task.train, source, directory)
  if config.data.max_train_examples and config.data.max_train_examples < len(train):
    keep = np.sort(np.random.default_rng([config.data.seed, 5]).permutation(len(train))[
        :config.data.max_train_examples])
    train = Examples(tuple([t[i] for i in keep] for t in train.texts), train.labels[keep],
                     [train.index[i] for i in keep])
  devs = [(name, read(task, split, source, directory)) for name, split in task.dev]
  tests = []
  if config.predict_test:
    for split in task.test:
      if source == 'tsv' and not os.path.exists(os.path.join(directory, split.file)):
        logging.warning('%s: no %s in %s; no submission file for it', task.name, split.file, directory)
        continue
      tests.append((split, read(task, split, source, directory, labelled=False)))
  return train, devs, tests


def encode_examples(task, config, tok, train, devs, tests):
  """(train arrays, [(dev name, arrays)], [(test split, Examples, arrays)]) encoded to data.seq_len."""
  enc = lambda ex: encode(tok, ex, config.data.seq_len)  # noqa: E731
  train_x = {**enc(train), 'labels': train.labels}
  dev_x = [(name, {**enc(ex), 'labels': ex.labels}) for name, ex in devs]
  test_x = [(split, ex, enc(ex)) for split, ex in tests]
  logging.info('%s: %d train, %s dev, %s test examples; max length %d', task.name, len(train),
               ', '.join(f'{n} {len(e)}' for n, e in devs) or '0',
               ', '.join(f'{s.file} {len(e)}' for s, e in tests) or 'no', config.data.seq_len)
  return train_x, dev_x, test_x
