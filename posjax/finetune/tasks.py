"""The fine-tuning tasks: where their text and labels sit in GLUE's own TSV files, in tfds, and in the GLUE
submission files.

Column indices follow the files GLUE distributes (`download_glue_data.py` layout): e.g. CoLA's train/dev
files have no header and four columns (source, label, original mark, sentence), MNLI's label is the last
column (`gold_label`) whatever the split's column count. Test files have an `index` column and no labels.
"""

from __future__ import annotations

import dataclasses

from posjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Split:
  file: str  # TSV file name in the task's directory
  text: tuple[int, ...]  # column(s) of the sentence or sentence pair
  label: int | None  # label column (-1: the last); None for test files
  header: bool = True
  index: int | None = None  # test files: the column GLUE's submission `index` comes from (None: row number)
  tfds: str = ''  # the tfds split name
  submission: str = ''  # test files: GLUE submission file name


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  glue_dir: str  # directory name in GLUE's layout
  labels: tuple[str, ...]  # label strings as the TSVs (and GLUE's submission files) spell them; () regression
  train: Split
  dev: tuple[tuple[str, Split], ...]  # (dev set name, split): MNLI has matched and mismatched
  test: tuple[Split, ...]
  tfds_name: str
  tfds_text: tuple[str, ...]  # feature names of the sentence(s) in tfds

  @property
  def num_labels(self) -> int:
    return len(self.labels) or 1

  @property
  def regression(self) -> bool:
    return not self.labels


def _pair_task(name, glue_dir, labels, text, label, test_text, tfds_text, test_index=0):
  return Task(name, glue_dir, labels,
              Split('train.tsv', text, label, tfds='train'),
              (('dev', Split('dev.tsv', text, label, tfds='validation')),),
              (Split('test.tsv', test_text, None, index=test_index, tfds='test',
                     submission=f'{glue_dir}.tsv'),),
              f'glue/{name}', tfds_text)


TASKS = {
    'cola': Task('cola', 'CoLA', ('0', '1'),
                 Split('train.tsv', (3,), 1, header=False, tfds='train'),
                 (('dev', Split('dev.tsv', (3,), 1, header=False, tfds='validation')),),
                 (Split('test.tsv', (1,), None, index=0, tfds='test', submission='CoLA.tsv'),),
                 'glue/cola', ('sentence',)),
    'sst2': Task('sst2', 'SST-2', ('0', '1'),
                 Split('train.tsv', (0,), 1, tfds='train'),
                 (('dev', Split('dev.tsv', (0,), 1, tfds='validation')),),
                 (Split('test.tsv', (1,), None, index=0, tfds='test', submission='SST-2.tsv'),),
                 'glue/sst2', ('sentence',)),
    'mrpc': _pair_task('mrpc', 'MRPC', ('0', '1'), (3, 4), 0, (3, 4), ('sentence1', 'sentence2')),
    'stsb': _pair_task('stsb', 'STS-B', (), (7, 8), 9, (7, 8), ('sentence1', 'sentence2')),
    'qqp': _pair_task('qqp', 'QQP', ('0', '1'), (3, 4), 5, (1, 2), ('question1', 'question2')),
    'mnli': Task('mnli', 'MNLI', ('contradiction', 'entailment', 'neutral'),
                 Split('train.tsv', (8, 9), -1, tfds='train'),
                 (('matched', Split('dev_matched.tsv', (8, 9), -1, tfds='validation_matched')),
                  ('mismatched', Split('dev_mismatched.tsv', (8, 9), -1, tfds='validation_mismatched'))),
                 (Split('test_matched.tsv', (8, 9), None, index=0, tfds='test_matched',
                        submission='MNLI-m.tsv'),
                  Split('test_mismatched.tsv', (8, 9), None, index=0, tfds='test_mismatched',
                        submission='MNLI-mm.tsv')),
                 'glue/mnli', ('premise', 'hypothesis')),
    'qnli': _pair_task('qnli', 'QNLI', ('entailment', 'not_entailment'), (1, 2), 3, (1, 2),
                       ('question', 'sentence')),
    'rte': _pair_task('rte', 'RTE', ('entailment', 'not_entailment'), (1, 2), 3, (1, 2),
                      ('sentence1', 'sentence2')),
    'wnli': _pair_task('wnli', 'WNLI', ('0', '1'), (1, 2), 3, (1, 2), ('sentence1', 'sentence2')),
    # IMDB (Maas et al. 2011) has no dev split: its test set is what papers report.
    'imdb': Task('imdb', 'imdb', ('0', '1'),
                 Split('imdb_train.jsonl.gz', (), None, tfds='train'),
                 (('test', Split('imdb_test.jsonl.gz', (), None, tfds='test')),),
                 (), 'imdb_reviews', ('text',)),
}


GLUE_ORDER = ('cola', 'sst2', 'mrpc', 'stsb', 'qqp', 'mnli', 'qnli', 'rte', 'wnli')


def get(name: str) -> Task:
  if name not in TASKS:
    raise ConfigError(f'unknown task {name!r}; valid tasks: {", ".join(TASKS)}, all')
  return TASKS[name]
