"""Fine-tuning: GLUE's TSV layouts, bad input, fine-tuning an imported HF checkpoint (learns, writes GLUE
submission files, resumes exactly), and pretrain-then-fine-tune on real IMDB / SST-2 data."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, micro_config
from posjax.errors import ConfigError
from posjax.finetune import data as data_lib
from posjax import configs
from posjax.finetune import data as data_lib_ft
from posjax.finetune import finetuning as finetune
from posjax.finetune import presets, tasks

# One example row per split, in the files GLUE distributes (headers as in download_glue_data.py's files).
MNLI_HEAD = ('index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t'
             'sentence1_parse\tsentence2_parse\tsentence1\tsentence2')
GLUE_FILES = {
    'CoLA': {'train.tsv': "gj04\t1\t\tOur friends won't buy this analysis.\n",
             'dev.tsv': 'gj04\t0\t*\tThey drank the pub.\n',
             'test.tsv': 'index\tsentence\n0\tBill whistled past the house.\n'},
    'SST-2': {'train.tsv': 'sentence\tlabel\nhide new secretions \t0\n',
              'dev.tsv': "sentence\tlabel\nit 's a charming journey . \t1\n",
              'test.tsv': 'index\tsentence\n0\tuneasy mishmash of styles .\n'},
    'MRPC': {'train.tsv': 'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t702876\t702977\tAmrozi accused his '
                          'brother .\tReferring to him as " the witness " .\n',
             'dev.tsv': 'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tHe said .\tShe said .\n',
             'test.tsv': 'index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1089874\t1089925\tPCCW rose .\tIt fell .\n'},
    'STS-B': {'train.tsv': 'index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n'
                           '0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air '
                           'plane is taking off.\t5.000\n',
              'dev.tsv': 'index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n'
                         '0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man.\tA woman.\t1.250\n',
              'test.tsv': 'index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\n'
                          '0\tmain-captions\tMSRvid\t2012test\t0024\tnone\tnone\tA girl.\tA boy.\n'},
    'QQP': {'train.tsv': 'id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n133273\t213221\t213222\tHow is '
                         'life?\tWhat is life?\t0\n',
            'dev.tsv': 'id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\t3\tWhy?\tWhy not?\t1\n',
            'test.tsv': 'id\tquestion1\tquestion2\n0\tWhy do rockets look white?\tWhy are rockets white?\n'},
    'MNLI': {'train.tsv': MNLI_HEAD + '\tlabel1\tgold_label\n0\t31193\t31193n\tgovernment\t(b)\t(b)\t(p)\t(p)\t'
                          'Conceptually cream skimming has two dimensions.\tProduct and geography.\tneutral\tneutral\n',
             'dev_matched.tsv': MNLI_HEAD + '\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n0\t1\t1e\t'
                                'fiction\t(b)\t(b)\t(p)\t(p)\tThe new rights.\tEveryone loves them.\tneutral\t'
                                'entailment\tneutral\tneutral\tneutral\tneutral\n',
             'dev_mismatched.tsv': MNLI_HEAD + '\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n0\t1\t1c\t'
                                   'letters\t(b)\t(b)\t(p)\t(p)\tYour gift.\tNo gift.\tcontradiction\t'
                                   'contradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\n',
             'test_matched.tsv': MNLI_HEAD + '\n0\t31349\t31349n\tgovernment\t(b)\t(b)\t(p)\t(p)\tHi.\tHello.\n',
             'test_mismatched.tsv': MNLI_HEAD + '\n0\t1\t1n\tfiction\t(b)\t(b)\t(p)\t(p)\tYes.\tNo.\n'},
    'QNLI': {'train.tsv': 'index\tquestion\tsentence\tlabel\n0\tWhen?\tIn 1990.\tentailment\n',
             'dev.tsv': 'index\tquestion\tsentence\tlabel\n0\tWho?\tNobody.\tnot_entailment\n',
             'test.tsv': 'index\tquestion\tsentence\n0\tWhat?\tThat.\n'},
    'RTE': {'train.tsv': 'index\tsentence1\tsentence2\tlabel\n0\tNo weapons.\tWeapons found.\tnot_entailment\n',
            'dev.tsv': 'index\tsentence1\tsentence2\tlabel\n0\tDana won.\tDana lost.\tnot_entailment\n',
            'test.tsv': 'index\tsentence1\tsentence2\n0\tA.\tB.\n'},
    'WNLI': {'train.tsv': 'index\tsentence1\tsentence2\tlabel\n0\tI stuck a pin.\tI stuck a pin.\t1\n',
             'dev.tsv': 'index\tsentence1\tsentence2\tlabel\n0\tThe drain is clogged.\tThe hair is clogged.\t0\n',
             'test.tsv': 'index\tsentence1\tsentence2\n0\tMaude.\tMaude said.\n'},
}
EXPECTED_TRAIN = {  # task -> (texts of the first train example, label id / value)
    'cola': (("Our friends won't buy this analysis.",), 1),
    'sst2': (('hide new secretions ',), 0),
    'mrpc': (('Amrozi accused his brother .', 'Referring to him as " the witness " .'), 1),
    'stsb': (('A plane is taking off.', 'An air plane is taking off.'), 5.0),
    'qqp': (('How is life?', 'What is life?'), 0),
    'mnli': (('Conceptually cream skimming has two dimensions.', 'Product and geography.'), 2),
    'qnli': (('When?', 'In 1990.'), 0),
    'rte': (('No weapons.', 'Weapons found.'), 1),
    'wnli': (('I stuck a pin.', 'I stuck a pin.'), 1),
}


def write_glue(root, only=None):
  for d, files in GLUE_FILES.items():
    if only and d != only:
      continue
    os.makedirs(os.path.join(root, d), exist_ok=True)
    for name, text in files.items():
      with open(os.path.join(root, d, name), 'w') as f:
        f.write(text)
  return str(root)


@pytest.mark.parametrize('name', tasks.GLUE_ORDER)
def test_glue_tsv_layouts(tmp_path, name):
  task = tasks.get(name)
  directory = data_lib_ft.task_directory(task, write_glue(tmp_path))
  train = data_lib.read(task, task.train, 'tsv', directory)
  texts, label = EXPECTED_TRAIN[name]
  assert tuple(t[0] for t in train.texts) == texts
  assert train.labels[0] == pytest.approx(label)
  for _, split in task.dev:
    dev = data_lib.read(task, split, 'tsv', directory)
    assert len(dev) == 1 and len(dev.texts) == len(texts) and dev.labels is not None
  for split in task.test:
    test = data_lib.read(task, split, 'tsv', directory, labelled=False)
    assert test.labels is None and test.index == ['0'] and all(t[0] for t in test.texts)


def test_mnli_dev_labels_come_from_gold_label_column(tmp_path):
  task = tasks.get('mnli')
  directory = data_lib_ft.task_directory(task, write_glue(tmp_path, 'MNLI'))
  matched = data_lib.read(task, task.dev[0][1], 'tsv', directory)
  mismatched = data_lib.read(task, task.dev[1][1], 'tsv', directory)
  assert task.labels[matched.labels[0]] == 'neutral'
  assert task.labels[mismatched.labels[0]] == 'contradiction'


def test_wrong_column_count_names_file_and_line(tmp_path):
  root = write_glue(tmp_path, 'RTE')
  path = os.path.join(root, 'RTE', 'train.tsv')
  with open(path, 'a') as f:
    f.write('1\tonly two columns\n')
  task = tasks.get('rte')
  with pytest.raises(ConfigError, match=r'train\.tsv, line 3: 2 tab-separated columns, expected 4'):
    data_lib.read(task, task.train, 'tsv', os.path.join(root, 'RTE'))


def test_bad_label_values_name_file_line_and_valid_labels(tmp_path):
  root = write_glue(tmp_path, 'QNLI')
  with open(os.path.join(root, 'QNLI', 'dev.tsv'), 'a') as f:
    f.write('1\tWhy?\tBecause.\tmaybe\n')
  task = tasks.get('qnli')
  with pytest.raises(ConfigError, match=r"dev\.tsv, line 3: label 'maybe' is not one of entailment, not_entailment"):
    data_lib.read(task, task.dev[0][1], 'tsv', os.path.join(root, 'QNLI'))
  root = write_glue(tmp_path, 'STS-B')
  with open(os.path.join(root, 'STS-B', 'train.tsv'), 'a') as f:
    f.write('1\tg\tf\ty\t2\tn\tn\tA.\tB.\tfive\n')
  stsb = tasks.get('stsb')
  with pytest.raises(ConfigError, match=r"train\.tsv, line 3: label 'five' is not a number"):
    data_lib.read(stsb, stsb.train, 'tsv', os.path.join(root, 'STS-B'))


def test_unknown_task_lists_valid_ones():
  with pytest.raises(ConfigError, match=r"unknown task 'sst3'; valid tasks: cola, sst2, .*imdb, all"):
    presets.finetune_config('sst3')
  out = subprocess.run([sys.executable, 'train.py', '--config=configs/glue.py:sst3', '--workdir=/tmp/unused'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "unknown task 'sst3'; valid tasks: cola" in out.stderr, out.stderr[-2000:]


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
  task = tasks.get('sst2')
  with pytest.raises(ConfigError, match=r"tfds dataset 'glue/sst2' \(split 'train'\) is not prepared"):
    data_lib.read(task, task.train, 'tfds', str(tmp_path))


# A builder with tfds glue/sst2's features (sentence, label: ClassLabel negative/positive, idx) and splits,
# preparing GLUE's own TSVs: the tfds reader must give what the TSV reader gives.
GLUE_SST2_LIKE = """
import numpy as np
import tensorflow_datasets as tfds

class TinyGlueSst2(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version('2.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = "SST-2's train.tsv, dev.tsv, test.tsv"
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'sentence': tfds.features.Text(), 'label': tfds.features.ClassLabel(names=['negative', 'positive']),
        'idx': np.int32}))

  def _split_generators(self, dl_manager):
    d = dl_manager.manual_dir
    return {'train': self._generate_examples(d / 'train.tsv'),
            'validation': self._generate_examples(d / 'dev.tsv'), 'test': self._generate_examples(d / 'test.tsv')}

  def _generate_examples(self, path):
    lines = path.read_text().splitlines()
    header = lines[0].split('\\t')
    for i, line in enumerate(lines[1:]):
      cells = dict(zip(header, line.split('\\t')))
      yield i, {'sentence': cells['sentence'], 'label': int(cells.get('label', -1)), 'idx': i}
"""


def test_tfds_source_reads_what_the_tsv_source_reads(tmp_path):
  import dataclasses
  from posjax.data import prepare
  directory = toy_sst2(tmp_path / 'SST-2')
  (tmp_path / 'tiny_glue_sst2.py').write_text(GLUE_SST2_LIKE)
  prepare.prepare_tfds('tiny_glue_sst2', str(tmp_path / 'tfds'), directory, str(tmp_path / 'tiny_glue_sst2.py'))
  task = dataclasses.replace(tasks.get('sst2'), tfds_name='tiny_glue_sst2')
  for split, labelled in ((task.train, True), (task.dev[0][1], True), (task.test[0], False)):
    ours = data_lib.read(task, split, 'tfds', str(tmp_path / 'tfds'), labelled)
    want = data_lib.read(task, split, 'tsv', directory, labelled)
    order = np.argsort([int(i) for i in ours.index])  # tfds may shuffle records across its shards
    assert [ours.texts[0][i] for i in order] == list(want.texts[0]), split.file
    if labelled:
      assert [int(ours.labels[i]) for i in order] == [int(x) for x in want.labels], split.file


def test_imdb_jsonl_reader(tmp_path):
  task = tasks.get('imdb')
  with gzip.open(tmp_path / 'imdb_train.jsonl.gz', 'wt') as f:
    f.write(json.dumps({'id': 'a', 'text': 'great <br />film', 'label': 1, 'rating': 9}) + '\n')
    f.write(json.dumps({'id': 'b', 'text': 'dull', 'label': 0, 'rating': 2}) + '\n')
  ex = data_lib.read(task, task.train, 'tsv', str(tmp_path))
  assert ex.texts[0] == ['great <br />film', 'dull'] and list(ex.labels) == [1, 0]
  with gzip.open(tmp_path / 'imdb_test.jsonl.gz', 'wt') as f:
    f.write(json.dumps({'id': 'c', 'text': 'fine', 'label': 7}) + '\n')
  with pytest.raises(ConfigError, match=r"imdb_test\.jsonl\.gz, line 1: label '7' is not one of 0, 1"):
    data_lib.read(task, task.dev[0][1], 'tsv', str(tmp_path))


def test_pair_encoding_matches_bert_format(tmp_path):
  from transformers import BertTokenizerFast
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'b', 'c', 'the', 'cat', 'sat']))
  from posjax.data import tokenizer as tokenizer_lib
  ex = data_lib.Examples((['the cat sat a b c the cat', 'a'], ['b c', 'the cat sat sat sat']), None, ['0', '1'])
  ours = data_lib.encode(tokenizer_lib.load(str(vocab)), ex, 10)
  theirs = BertTokenizerFast(str(vocab))(ex.texts[0], ex.texts[1], truncation='longest_first', max_length=10,
                                         padding='max_length')
  np.testing.assert_array_equal(ours['ids'], theirs['input_ids'])
  np.testing.assert_array_equal(ours['type_ids'], theirs['token_type_ids'])
  np.testing.assert_array_equal(ours['mask'], theirs['attention_mask'])


# ---- fine-tuning runs ----

WORDS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + \
    'good great fun bad awful boring film movie the a is was and plot'.split()


def tiny_hf_bert(directory, vocab_size=None):
  """A random BertForPreTraining (1 layer, width 32) saved with a vocab.txt, as a user's checkpoint would be."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=vocab_size or len(WORDS), hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
  transformers.BertForPreTraining(cfg).save_pretrained(directory)
  with open(os.path.join(directory, 'vocab.txt'), 'w') as f:
    f.write('\n'.join(WORDS) + '\n')
  return str(directory)


def toy_sst2(directory, seed=0):
  """SST-2 files whose label is whether a positive or a negative word occurs (learnable in a few steps)."""
  rng = np.random.default_rng(seed)
  filler = 'film movie the a is was and plot'.split()
  os.makedirs(directory, exist_ok=True)

  def sentence():
    y = int(rng.integers(2))
    words = list(rng.choice(filler, 6)) + [str(rng.choice(['good', 'great', 'fun'] if y else
                                                          ['bad', 'awful', 'boring']))]
    rng.shuffle(words)
    return ' '.join(words), y
  for name, n in (('train', 320), ('dev', 64)):
    with open(os.path.join(directory, f'{name}.tsv'), 'w') as f:
      f.write('sentence\tlabel\n' + ''.join('%s\t%d\n' % sentence() for _ in range(n)))
  with open(os.path.join(directory, 'test.tsv'), 'w') as f:
    f.write('index\tsentence\n' + ''.join(f'{i}\t{sentence()[0]}\n' for i in range(10)))
  return str(directory)


def micro_finetune(task='sst2', **overrides):
  c = presets.finetune_config(task)
  c.data.seq_len = 16
  c.batch_size = 16
  c.learning_rate = 1e-3
  c.log_every = 10
  c.hidden_dropout = 0.0
  for k, v in overrides.items():
    configs.override(c, k, v)
  return c


def read_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


def test_hf_checkpoint_finetunes_writes_submission_and_resumes(tmp_path):
  """A random HF BERT learns the toy task; the GLUE submission file is written; losing the last checkpoint
  and rerunning redoes the lost steps exactly."""
  hf_dir = tiny_hf_bert(tmp_path / 'hf')
  config = micro_finetune(init_from=hf_dir, num_train_steps=150, checkpoint_every=50,
                          **{'data.dir': toy_sst2(tmp_path / 'SST-2')})
  work = str(tmp_path / 'ft')
  first = finetune.finetune_and_evaluate(config, work)
  assert first['step'] == 150 and first['dev']['accuracy'] >= 90.0, first
  assert first['collapsed'] == [] and first['learning_rate'] == 1e-3
  with open(os.path.join(work, 'predictions', 'SST-2.tsv')) as f:
    lines = f.read().splitlines()
  assert lines[0] == 'index\tprediction' and len(lines) == 11
  assert all(l.split('\t')[0] == str(i) and l.split('\t')[1] in ('0', '1') for i, l in enumerate(lines[1:]))
  full = read_rows(work)
  shutil.rmtree(os.path.join(work, 'checkpoints', '150'))
  second = finetune.finetune_and_evaluate(config, work)
  assert second['dev']['accuracy'] == pytest.approx(first['dev']['accuracy'])
  resumed = read_rows(work)
  assert [r['step'] for r in resumed] == [r['step'] for r in full]
  for a, b in zip(full, resumed):
    for k in ('loss', 'eval_accuracy'):
      if k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a['step'], k)


def test_vocab_mismatch_names_both_sizes(tmp_path):
  hf_dir = tiny_hf_bert(tmp_path / 'hf', vocab_size=40)
  config = micro_finetune(init_from=hf_dir, **{'data.dir': toy_sst2(tmp_path / 'SST-2')})
  with pytest.raises(ConfigError, match=r"vocabulary has 40 tokens but the tokenizer has 19"):
    finetune.finetune_and_evaluate(config, str(tmp_path / 'ft'))


def imdb_subset(shared, path, n):
  with gzip.open(os.path.join(shared, 'imdb', 'imdb_unsup.jsonl.gz'), 'rt') as src, open(path, 'w') as dst:
    for _, line in zip(range(n), src):
      dst.write(line)
  return str(path)


def pretrain_then_sst2(shared, tmp_path, pre_overrides, ft_overrides):
  from posjax.training import pretraining
  pre = str(tmp_path / 'pre')
  pretraining.train_and_evaluate(micro_config(**pre_overrides), pre)
  config = micro_finetune(init_from=pre, **{'data.dir': os.path.join(shared, 'sst2'), **ft_overrides})
  result = finetune.finetune_and_evaluate(config, str(tmp_path / 'sst2'))
  labels = data_lib.read(tasks.get('sst2'), tasks.get('sst2').dev[0][1], 'tsv',
                         os.path.join(shared, 'sst2')).labels
  majority = 100.0 * max(labels.mean(), 1 - labels.mean())
  return result['dev']['accuracy'], majority


def test_pretrain_on_imdb_then_sst2_beats_majority_cheap(shared_data, tmp_path):
  """Cheap variant: a micro model, 30 MLM steps on 2,000 IMDB reviews, 300 SST-2 steps at length 32."""
  files = imdb_subset(shared_data, tmp_path / 'unsup.jsonl', 2000)
  acc, majority = pretrain_then_sst2(
      shared_data, tmp_path, {'data.files': files, 'num_train_steps': 30, 'checkpoint_every': 30},
      {'num_train_steps': 300, 'data.seq_len': 32, 'batch_size': 32, 'checkpoint_every': 300,
       'data.max_train_examples': 9600, 'layer_decay': 1.0, 'log_every': 100})
  print(f'SST-2 dev accuracy {acc:.1f} (majority {majority:.1f})')
  assert acc > majority + 10.0, (acc, majority)


@pytest.mark.slow
def test_pretrain_on_imdb_then_sst2_beats_majority(shared_data, tmp_path):
  """A tiny model (2 layers, width 64) pretrained 500 steps on 20,000 IMDB reviews, fine-tuned 1,000 steps
  (half an epoch) on SST-2 train through train.py."""
  files = imdb_subset(shared_data, tmp_path / 'unsup.jsonl', 20000)
  from posjax.training import pretraining
  pre = str(tmp_path / 'pre')
  pretraining.train_and_evaluate(micro_config(**{
      'data.files': files, 'num_train_steps': 500, 'checkpoint_every': 500, 'log_every': 100,
      'eval_every': 500, 'model.hidden_size': 64, 'model.intermediate_size': 256, 'model.num_layers': 2,
      'model.num_heads': 2, 'data.vocab_size': 8000, 'data.seq_len': 64, 'batch_size': 32,
      'learning_rate': 1e-3, 'warmup_steps': 50}), pre)
  work = str(tmp_path / 'sst2')
  out = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/glue.py:sst2', f'--config.init_from={pre}',
       f'--config.data.dir={os.path.join(shared_data, "sst2")}', f'--workdir={work}',
       '--config.num_train_steps=1000', '--config.data.seq_len=64', '--config.learning_rate=3e-4',
       '--config.log_every=250', '--config.checkpoint_every=500'],
      cwd=ROOT, capture_output=True, text=True, timeout=3600)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(work, 'results.json')) as f:
    acc = json.load(f)['dev']['accuracy']
  print(f'SST-2 dev accuracy {acc:.1f} (majority 50.9)')
  assert acc > 70.0, acc


@pytest.mark.parametrize('width, layers, expected', [
    (32, 1, (1e-3, 1.0)), (128, 2, (1e-3, 1.0)), (256, 4, (3e-4, 1.0)), (256, 12, (3e-4, 0.8)),
    (768, 12, (1e-4, 0.8)), (1024, 24, (5e-5, 0.9))])
def test_presets_scale_learning_rate_and_layer_decay_with_the_model(width, layers, expected):
  """ELECTRA's per-size table (small 3e-4, base 1e-4 with decay 0.8, large 5e-5 with 0.9), 1e-3 without decay
  for BERT-tiny; a value given in the config is kept."""
  c = presets.finetune_config('sst2')
  assert presets.scaled(c, width, layers)[:2] == expected
  c.learning_rate, c.layer_decay = 2e-5, 0.7
  assert presets.scaled(c, width, layers) == (2e-5, 0.7, '')


def test_collapsed_predictions_are_named_with_their_class_and_share(caplog):
  sst2 = tasks.get('sst2')
  labels = {'dev': {'labels': np.array([0, 1] * 50)}}
  got = finetune.collapsed(sst2, {'dev': np.ones(100, int)}, labels)
  assert got == [{'dev': 'dev', 'class': '1', 'share': 1.0, 'label_share': 0.5}]
  assert "100.0% of the 100 predictions are class '1' (50.0% of the labels)" in caplog.text
  assert finetune.collapsed(sst2, {'dev': np.array([1] * 94 + [0] * 6)}, labels) == []
  skewed = {'dev': {'labels': np.ones(100, int)}}  # labels of one class: predicting it is no collapse
  assert finetune.collapsed(sst2, {'dev': np.ones(100, int)}, skewed) == []


def test_layer_decay_scales_follow_depth():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from posjax.config import ModelConfig
  from posjax.finetune import optim
  from posjax.finetune.model import Classifier, encoder_config
  cfg = encoder_config(ModelConfig(vocab_size=30, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16))
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(Classifier(cfg, 3).init, jax.random.PRNGKey(0), ids, ids, ids)['params'])
  s = optim.layer_scales(shapes, cfg, 0.5)
  assert s['bert']['embeddings']['word_embeddings'] == 0.125
  assert s['bert']['encoder']['layer_0']['attention']['query']['kernel'] == 0.25
  assert s['bert']['encoder']['layer_1']['output']['bias'] == 0.5
  assert s['bert']['pooler']['kernel'] == 1.0 and s['out']['kernel'] == 1.0
  # ALBERT: one shared layer used at every depth takes the top layer's rate.
  assert optim.depth(('bert', 'encoder', 'layer_0', 'x'), 12, layer_groups=1) == 12


def test_all_runs_each_task_with_its_preset_and_prints_the_glue_score(tmp_path, monkeypatch, capsys):
  seen = {}

  def fake(config, workdir):  # the per-task runs are tested above; here: presets, shared fields, averaging
    seen[config.task] = (config.num_epochs, config.init_from, config.layer_decay, workdir)
    dev = {'mrpc': {'dev': {'f1': 90.0, 'accuracy': 80.0}},
           'mnli': {'matched': {'accuracy': 70.0}, 'mismatched': {'accuracy': 72.0}},
           'rte': {'dev': {'accuracy': 60.0}}, 'wnli': {'dev': {'accuracy': 50.0}}}[config.task]
    from posjax.finetune import metrics
    return {'task': config.task, 'dev': finetune.flat_dev(dev), 'score': metrics.task_score(config.task, dev)}
  monkeypatch.setattr(finetune, 'finetune_and_evaluate', fake)
  c = presets.finetune_config('all')
  c.tasks, c.init_from, c.layer_decay = 'mrpc,mnli,rte,wnli', '/ckpt', 0.9
  out = finetune.run(c, str(tmp_path))
  assert seen['rte'][:3] == (10.0, '/ckpt', 0.9) and seen['mnli'][0] == 3.0
  assert seen['mrpc'][3] == os.path.join(str(tmp_path), 'mrpc')
  assert out['glue'] == pytest.approx((85.0 + 71.0 + 60.0) / 3)
  assert out['glue_with_wnli'] == pytest.approx((85.0 + 71.0 + 60.0 + 50.0) / 4)
  printed = capsys.readouterr().out
  assert 'GLUE score (mean of task scores, WNLI excluded' in printed and f'{out["glue"]:.2f}' in printed
  assert json.load(open(tmp_path / 'glue.json'))['glue'] == pytest.approx(out['glue'])


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['electra', 'albert', 'convbert'])
def test_hf_model_types_fine_tune(tmp_path, kind):
  """ELECTRA (no pooler: ELECTRA's head), ALBERT (shared layers) and ConvBERT checkpoints fine-tune a few steps."""
  import torch
  import transformers
  torch.manual_seed(0)
  common = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64)
  model = {'electra': lambda: transformers.ElectraForPreTraining(transformers.ElectraConfig(
               embedding_size=16, **common)),
           'albert': lambda: transformers.AlbertForPreTraining(transformers.AlbertConfig(
               embedding_size=16, **common)),
           'convbert': lambda: transformers.ConvBertForMaskedLM(transformers.ConvBertConfig(
               embedding_size=16, **common))}[kind]()
  model.save_pretrained(tmp_path / 'hf')
  (tmp_path / 'hf' / 'vocab.txt').write_text('\n'.join(WORDS) + '\n')
  # Random 2-layer ConvBERT and ELECTRA models need 100-200 steps before their loss starts to fall.
  config = micro_finetune(init_from=str(tmp_path / 'hf'), num_train_steps=100 if kind == 'albert' else 200,
                          checkpoint_every=1000, **{'data.dir': toy_sst2(tmp_path / 'SST-2')})
  if kind == 'convbert':
    config.layer_decay = 1.0
  result = finetune.finetune_and_evaluate(config, str(tmp_path / 'ft'))
  assert result['dev']['accuracy'] >= 80.0, result


def test_submission_files_in_glue_format(tmp_path):
  stsb, mnli = tasks.get('stsb'), tasks.get('mnli')
  ex = data_lib.Examples((['a', 'b', 'c'],), None, ['7', '8', '9'])
  path = finetune.write_submission(stsb, stsb.test[0], ex, np.array([-0.4, 2.3456, 6.0]), str(tmp_path))
  assert os.path.basename(path) == 'STS-B.tsv'
  assert open(path).read() == 'index\tprediction\n7\t0.000\n8\t2.346\n9\t5.000\n'
  path = finetune.write_submission(mnli, mnli.test[1], ex, np.array([0, 1, 2]), str(tmp_path))
  assert os.path.basename(path) == 'MNLI-mm.tsv'
  assert open(path).read() == 'index\tprediction\n7\tcontradiction\n8\tentailment\n9\tneutral\n'


def test_regression_objective_is_squared_error():
  import jax
  from posjax.finetune.model import Classification

  class FixedOutputs:  # stands in for the Classifier: the objective only sees its outputs
    def apply(self, variables, ids, mask, type_ids, deterministic, rngs):
      return variables['params']['logits']

  logits = np.array([[0.5], [1.0], [4.0], [2.0]], np.float32)
  labels = np.array([0.0, 1.5, 3.0, 5.0], np.float32)
  batch = {'ids': None, 'mask': None, 'type_ids': None, 'labels': labels}
  loss, m = Classification(FixedOutputs(), 4, regression=True).loss({'logits': logits}, batch,
                                                                     jax.random.PRNGKey(0), True)
  assert float(loss) == pytest.approx(float(np.mean((logits[:, 0] - labels) ** 2))) and set(m) == {'loss'}
  loss, m = Classification(FixedOutputs(), 4, regression=False).loss(
      {'logits': np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)},
      {**batch, 'labels': np.array([0, 0])}, jax.random.PRNGKey(0), True)
  assert float(loss) == pytest.approx((np.log1p(np.exp(-2.0)) + np.log1p(np.exp(1.0))) / 2, rel=1e-6)
  assert float(m['accuracy']) == 0.5
