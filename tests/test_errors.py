"""Every bad input a user can type or point at ends in one `error:` line naming the field, never a traceback.

The table runs `train.py`'s own entry point (`cli`) in this process, so each case costs milliseconds to a few
seconds; one case runs the real script to check what a terminal shows."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from helpers import ROOT

FLAGS = flags.FLAGS


def load_train_module():
  spec = importlib.util.spec_from_file_location('posjax_train_cli', os.path.join(ROOT, 'train.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


train = load_train_module()

TEXT = ('The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun. ' * 3 +
        '\n\n') * 60


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Small inputs, good and bad, shared by the table."""
  d = tmp_path_factory.mktemp('inputs')
  (d / 'corpus.txt').write_text(TEXT)
  (d / 'empty.txt').write_text('\n\n  \n')
  (d / 'binary.txt').write_bytes(bytes(range(256)) * 50)
  (d / 'notext.jsonl').write_text('\n'.join(json.dumps({'body': 'x' * 80}) for _ in range(5)))
  (d / 'broken.jsonl.gz').write_bytes(b'not gzip at all')
  (d / 'garbage.json').write_text('{"not": "a tokenizer"')
  (d / 'a_file').write_text('x')
  (d / 'emptydir').mkdir()
  glue = d / 'glue' / 'SST-2'
  glue.mkdir(parents=True)
  rows = ''.join(f'a {"fine" if i % 2 else "poor"} film number {i}\t{i % 2}\n' for i in range(16))
  for split in ('train', 'dev'):
    (glue / f'{split}.tsv').write_text('sentence\tlabel\n' + rows)
  (glue / 'test.tsv').write_text('index\tsentence\n' + ''.join(f'{i}\tfilm {i}\n' for i in range(4)))
  bad = d / 'badglue' / 'SST-2'
  bad.mkdir(parents=True)
  (bad / 'train.tsv').write_text('sentence\tlabel\na film\t1\textra\n')
  (bad / 'dev.tsv').write_text('sentence\tlabel\na film\tmaybe\n')
  (bad / 'test.tsv').write_text('index\tsentence\n0\tfilm\n')
  vocab = '\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'film']) + '\n'
  bert = dict(model_type='bert', vocab_size=7, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=16, max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.1,
              attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, hidden_act='gelu', initializer_range=0.02)
  for name, config, weights in [
      ('hf_gpt2', {'model_type': 'gpt2'}, None),
      ('hf_badjson', '{"model_type": "bert",', None),
      ('hf_noweights', bert, None),
      ('hf_badweights', bert, ('model.safetensors', b'\x00' * 64)),
      ('hf_badbin', bert, ('pytorch_model.bin', b'PK\x03\x04 not a zip')),
      ('hf_nofield', {k: v for k, v in bert.items() if k != 'hidden_size'}, ('model.safetensors', None)),
  ]:
    h = d / name
    h.mkdir()
    (h / 'config.json').write_text(config if isinstance(config, str) else json.dumps(config))
    (h / 'vocab.txt').write_text(vocab)
    if weights and weights[1] is not None:
      (h / weights[0]).write_bytes(weights[1])
    elif weights:
      from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
      save_file({'bert.embeddings.word_embeddings.weight': np.zeros((7, 8), np.float32)}, str(h / weights[0]))
  # A workdir holding a checkpoint of another model, and one whose only checkpoint is unreadable.
  from posjax.training import checkpoint  # pylint: disable=g-import-not-at-top
  other = d / 'other_model'
  mngr = checkpoint.manager(str(other), 3)
  checkpoint.save(mngr, 5, {'step': np.int32(5)}, {'model': {'hidden_size': 999}})
  mngr.wait_until_finished()
  mngr.close()
  (d / 'no_get_config.py').write_text('def config():\n  return None\n')
  (d / 'syntax_error.py').write_text('def get_config(arg=None):\n  return {\n')
  latin1 = d / 'latin1' / 'SST-2'
  latin1.mkdir(parents=True)
  (latin1 / 'train.tsv').write_bytes(b'sentence\tlabel\na caf\xe9 film\t1\n')
  (latin1 / 'dev.tsv').write_bytes(b'sentence\tlabel\na film\t1\n')
  (d / 'metrics_dir' / 'metrics.jsonl').mkdir(parents=True)
  (d / 'tb_file').mkdir()
  (d / 'tb_file' / 'tensorboard').write_text('not a directory')
  mngr = checkpoint.manager(str(d / 'unreadable'), 3)
  checkpoint.save(mngr, 5, {'step': np.int32(5)}, {'model': {'hidden_size': 999}})
  mngr.wait_until_finished()
  mngr.close()
  os.remove(d / 'unreadable' / 'checkpoints' / '5' / 'meta' / 'metadata')
  return d


BERT = '--config=configs/bert.py:tiny'
GLUE = '--config=configs/glue.py:sst2'
SMALL = ['--config.data.files={d}/corpus.txt', '--config.data.vocab_size=200', '--config.batch_size=8',
         '--config.data.seq_len=32', '--config.num_train_steps=1']

# (case id, arguments ({d}: the inputs folder, {w}: a fresh workdir), text the error line must hold)
CASES = [
    # config strings and files
    ('size', ['--config=configs/bert.py:huge'], "unknown model size 'huge'"),
    ('albert size', ['--config=configs/albert.py:giant'], "unknown model size 'giant'"),
    ('variant', ['--config=configs/bert.py:tiny,tisaa'], "unknown attention variant 'tisaa'"),
    ('electra variant', ['--config=configs/electra.py:small,nope'], "unknown attention variant 'nope'"),
    ('config string parts', ['--config=configs/bert.py:tiny,absolute,x'], "config string 'tiny,absolute,x'"),
    ('config file', ['--config=configs/nonexistent.py'], "--config: 'configs/nonexistent.py' is not a file"),
    ('glue task', ['--config=configs/glue.py:sst3'], "unknown task 'sst3'"),
    ('unknown field', [BERT, '--config.num_train_step=5'], 'unknown config field config.num_train_step;'),
    ('unknown model field', [BERT, '--config.model.hiden_size=5'], 'config.model.hiden_size'),
    ('field type', [BERT, '--config.batch_size=abc'], 'flag --config.batch_size=abc'),
    ('extra argument', [BERT, 'stray'], 'unexpected arguments: stray'),
    # trainer fields
    ('batch_size', [BERT, '--config.batch_size=0'], 'batch_size must be a positive integer'),
    ('num_train_steps', [BERT, '--config.num_train_steps=-1'], 'num_train_steps must be a positive integer'),
    ('log_every', [BERT, '--config.log_every=0'], 'log_every must be a positive integer'),
    ('keep_checkpoints', [BERT, '--config.keep_checkpoints=0'], 'keep_checkpoints must be a positive integer'),
    ('learning_rate', [BERT, '--config.learning_rate=0.0'], 'learning_rate must be positive'),
    ('grad_clip_norm', [BERT, '--config.grad_clip_norm=-1.0'], 'grad_clip_norm must be positive'),
    ('mask_prob', [BERT, '--config.data.mask_prob=1.5'], 'data.mask_prob must be in (0, 1)'),
    ('eval_fraction', [BERT, '--config.data.eval_fraction=0.0'], 'data.eval_fraction must be in (0, 1)'),
    ('tokenizer_documents', [BERT, '--config.data.tokenizer_documents=-3'],
     'data.tokenizer_documents must be a non-negative integer'),
    ('seq_len', [BERT, '--config.data.seq_len=1024'], 'data.seq_len (1024) exceeds model.max_position_embeddings'),
    ('nonfinite', [BERT, '--config.nonfinite=ignore'], "nonfinite 'ignore' is not one of stop, skip"),
    ('objective', [BERT, '--config.objective=clm'], "objective 'clm' is not one of mlm"),
    ('grad_accum', [BERT, *SMALL, '--config.grad_accum_steps=3'], 'divisible by grad_accum_steps (3)'),
    ('distributed', [BERT, '--config.distributed.initialize=maybe'], "distributed.initialize 'maybe'"),
    ('generator_fraction', ['--config=configs/electra.py:small', *SMALL, '--config.electra.generator_fraction=0.0'],
     'electra.generator_fraction must be in (0, 1]'),
    # model fields
    ('num_heads', [BERT, '--config.model.num_heads=5'], 'model.hidden_size (128) must be divisible by model.num_heads'),
    ('num_layers', [BERT, '--config.model.num_layers=0'], 'model.num_layers must be a positive integer'),
    ('hidden_act', [BERT, '--config.model.hidden_act=swish'], "model.hidden_act 'swish' is not one of"),
    ('dtype', [BERT, '--config.model.dtype=float64'], "model.dtype 'float64' is not one of"),
    ('dropout', [BERT, '--config.model.hidden_dropout=1.5'], 'model.hidden_dropout must be in [0, 1)'),
    ('remat', [BERT, '--config.model.remat_policy=everything'], "model.remat_policy 'everything' is not one of"),
    ('attention_impl', [BERT, '--config.model.attention_impl=flash'], "model.attention_impl 'flash' is not one of"),
    ('pallas with dropout', ['--config=configs/bert.py:tiny,tisa', '--config.model.attention_impl=pallas'],
     "attention_impl='pallas' cannot compute attention 'tisa' with attention dropout"),
    ('attention', [BERT, '--config.model.attention=absolut'], "unknown attention variant 'absolut'; valid names"),
    ('attention empty', [BERT, '--config.model.attention='], 'attention variant must be a non-empty string'),
    ('attention twice', [BERT, '--config.model.attention=tisa+tisa'], "'tisa+tisa' names a component twice"),
    ('tisa_kernels', ['--config=configs/bert.py:tiny,tisa', '--config.model.attention_options.tisa_kernels=0'],
     'attention option tisa_kernels must be an integer >= 1; got 0'),
    ('t5 buckets', ['--config=configs/bert.py:tiny,t5', '--config.model.attention_options.t5_num_buckets=3'],
     'attention option t5_num_buckets must be an even integer >= 4; got 3'),
    ('option before data', ['--config=configs/bert.py:tiny,relative_key', '--config.data.files=/nonexistent/*.txt',
                            '--config.model.attention_options.relative_block=0'], 'relative_block must be an integer >= 1'),
    ('vocab_size', [BERT, *SMALL, '--config.model.vocab_size=10'], 'model.vocab_size (10) is smaller than'),
    # mesh shapes
    ('mesh fsdp', [BERT, *SMALL, '--config.mesh.fsdp=3'], 'mesh: 1 devices cannot be split'),
    ('mesh negative', [BERT, *SMALL, '--config.mesh.data=-2'], 'mesh: sizes must be positive'),
    ('mesh too big', [BERT, *SMALL, '--config.mesh.data=4'], 'needs 4 devices, but 1 are present'),
    # data paths and formats
    ('data.files', [BERT, '--config.data.files=/nonexistent/*.txt'], "data.files: '/nonexistent/*.txt' matches"),
    ('empty file', [BERT, '--config.data.files={d}/empty.txt'], 'data.files: no usable text'),
    ('binary file', [BERT, '--config.data.files={d}/binary.txt'], 'data.files: no usable text'),
    ('jsonl field', [BERT, '--config.data.files={d}/notext.jsonl'], 'data.files: no usable text'),
    ('broken gzip', [BERT, '--config.data.files={d}/broken.jsonl.gz'], 'data.files: no usable text'),
    ('tokenizer path', [BERT, *SMALL, '--config.data.tokenizer=/nonexistent'], "data.tokenizer: '/nonexistent'"),
    ('tokenizer dir', [BERT, *SMALL, '--config.data.tokenizer={d}/emptydir'], 'neither tokenizer.json nor vocab'),
    ('tokenizer file', [BERT, *SMALL, '--config.data.tokenizer={d}/garbage.json'], 'is not a tokenizer.json file'),
    ('short seq_len', [BERT, *SMALL, '--config.data.seq_len=4'], 'data.seq_len must be an integer >= 8'),
    # workdirs and checkpoints
    ('workdir file', [BERT, '--workdir={d}/a_file'], "--workdir '{d}/a_file' is a file"),
    ('other model', [BERT, *SMALL, '--workdir={d}/other_model'], 'model.hidden_size: checkpoint 999 vs config 128'),
    ('unreadable', [BERT, *SMALL, '--workdir={d}/unreadable'], 'none of its checkpoints (5) can be read'),
    # fine-tuning: GLUE task data, init_from, Hugging Face checkpoint directories
    ('glue data.dir', [GLUE], 'data.dir is empty'),
    ('glue dir missing', [GLUE, '--config.data.dir=/nonexistent'], 'sst2: /nonexistent/'),
    ('glue columns', [GLUE, '--config.data.dir={d}/badglue'], '3 tab-separated columns, expected 2'),
    ('glue source', [GLUE, '--config.data.source=hub'], "data.source 'hub' is not one of"),
    ('glue learning_rate', [GLUE, '--config.learning_rate=-1e-4'], 'learning_rate must be positive (0: by'),
    ('glue layer_decay', [GLUE, '--config.layer_decay=1.5'], 'layer_decay must be in (0, 1]'),
    ('glue data.seed', [GLUE, '--config.data.seed=-1'], 'data.seed must be an integer in [0, 2**31)'),
    ('glue grad_clip_norm', [GLUE, '--config.grad_clip_norm=0.0'], 'grad_clip_norm must be positive'),
    ('glue warmup', [GLUE, '--config.warmup_fraction=1.5'], 'warmup_fraction must be in [0, 1)'),
    ('init_from empty', [GLUE, '--config.data.dir={d}/glue'], 'init_from is empty'),
    ('init_from missing', [GLUE, '--config.data.dir={d}/glue', '--config.init_from=/nonexistent'],
     "init_from '/nonexistent' is not a directory"),
    ('init_from neither', [GLUE, '--config.data.dir={d}/glue', '--config.init_from={d}/emptydir'],
     'is neither a Hugging Face checkpoint'),
    ('hf model_type', [GLUE, '--config.data.dir={d}/glue', '--config.init_from={d}/hf_gpt2'],
     "model_type 'gpt2' cannot be fine-tuned"),
    ('hf config.json', [GLUE, '--config.data.dir={d}/glue', '--config.init_from={d}/hf_badjson'],
     'config.json: not valid JSON'),
    ('hf no weights', [GLUE, '--config.data.dir={d}/glue', '--config.init_from={d}/hf_noweights'],
     'has no *.safetensors or pytorch_model.bin'),
    ('hf safetensors', [GLUE, '--config.data.dir={d}/glue', '--config.init_from={d}/hf_badweights'],
     'model.safetensors: not a readable safetensors file'),
    ('hf bin', [GLUE, '--config.data.dir={d}/glue', '--config.init_from={d}/hf_badbin'],
     'pytorch_model.bin: not a readable tensors-only PyTorch checkpoint'),
    ('hf field', [GLUE, '--config.data.dir={d}/glue', '--config.init_from={d}/hf_nofield'],
     "config.json: no field 'hidden_size'"),
    ('glue workdir', [GLUE, '--config.data.dir={d}/glue', '--config.init_from={w}'], '--workdir must differ'),
    # ranges of every numeric field, options of variants not chosen, renamed fields (issue 24)
    ('warmup_steps', [BERT, '--config.warmup_steps=-10'], 'warmup_steps must be a non-negative integer'),
    ('adam_b1', [BERT, '--config.adam_b1=2.0'], 'adam_b1 must be in [0, 1)'),
    ('adam_eps', [BERT, '--config.adam_eps=0.0'], 'adam_eps must be positive'),
    ('weight_decay', [BERT, '--config.weight_decay=-0.1'], 'weight_decay must be >= 0'),
    ('data vocab_size', [BERT, '--config.data.vocab_size=5'], 'data.vocab_size must be an integer >= 100'),
    ('max_predictions', [BERT, '--config.data.seq_len=64', '--config.data.max_predictions=1000'],
     'data.max_predictions must be in [0, data.seq_len=64]'),
    ('seed', [BERT, '--config.seed=1099511627776'], 'seed must be an integer in [0, 2**31)'),
    ('data seed', [BERT, '--config.data.seed=-3'], 'data.seed must be an integer in [0, 2**31)'),
    ('eval_every', [BERT, '--config.eval_every=0'], 'eval_every must be a positive integer'),
    ('temperature', ['--config=configs/electra.py:small', '--config.electra.temperature=0.0'],
     'electra.temperature must be positive'),
    ('layer_norm_eps', [BERT, '--config.model.layer_norm_eps=0.0'], 'model.layer_norm_eps must be positive'),
    ('initializer_range', [BERT, '--config.model.initializer_range=-0.02'], 'model.initializer_range must be positive'),
    ('unused option', [BERT, '--config.model.attention_options.tisa_kernels=3'],
     "attention option(s) tisa_kernels (of tisa) set, but variant 'absolute' does not use them"),
    ('renamed field', [GLUE, '--config.max_seq_length=64'], 'config.max_seq_length: the field is now data.seq_len'),
    ('glue seq_len', [GLUE, '--config.data.seq_len=2'], 'data.seq_len must be an integer >= 4'),
    ('glue hidden_dropout', [GLUE, '--config.hidden_dropout=1.5'], 'hidden_dropout must be in [0, 1)'),
    # config files, data names and files, workdirs that cannot be one
    ('config without get_config', ['--config={d}/no_get_config.py'], 'defines no get_config() function'),
    ('config syntax error', ['--config={d}/syntax_error.py'], 'syntax_error.py, line 2:'),
    ('tfds name path', [BERT, '--config.data.source=tfds', '--config.data.tfds_name=../../etc/passwd'],
     "data.tfds_name: '../../etc/passwd' is not a tfds dataset name"),
    ('latin-1 tsv', [GLUE, '--config.data.dir={d}/latin1', '--config.init_from={d}/hf_noweights'],
     'SST-2/train.tsv, line 2: not UTF-8 (byte 0xe9 at byte 6 of the line)'),
    ('metrics.jsonl a directory', [BERT, *SMALL, '--workdir={d}/metrics_dir'],
     'metrics.jsonl is a directory; the run writes a file there'),
    ('tensorboard a file', [BERT, *SMALL, '--workdir={d}/tb_file'],
     'tensorboard is a file; the run writes a directory there'),
    ('workdir under a file', [BERT, '--workdir={d}/a_file/sub'], "is under '{d}/a_file', which is a file"),
    ('empty workdir', [BERT, '--workdir='], '--workdir is empty'),
    ('read-only workdir', [BERT, '--workdir=/proc/posjax-test'], "--workdir '/proc/posjax-test' cannot be written"),
]


def run_cli(args, workdir, capsys):
  """`python train.py ARGS` in this process: (exit code, what reached stderr)."""
  argv = [os.path.join(ROOT, 'train.py')]
  if not any(a.startswith('--workdir=') for a in args):
    argv.append(f'--workdir={workdir}')
  argv += args
  FLAGS.unparse_flags()
  cwd, sys_argv = os.getcwd(), sys.argv
  os.chdir(ROOT)  # config paths are relative to the repository, as in the README
  sys.argv = argv  # ml_collections reads the --config.FIELD overrides from sys.argv
  try:
    with pytest.raises(SystemExit) as exit_info:
      train.cli(argv)
  finally:
    os.chdir(cwd)
    sys.argv = sys_argv
    FLAGS.unparse_flags()
    for name in [n for n in FLAGS if n.startswith('config.')]:  # registered per run, one per override
      delattr(FLAGS, name)
  code = exit_info.value.code
  err = capsys.readouterr().err
  if isinstance(code, str):  # sys.exit('error: ...') prints its message and exits 1
    err, code = err + code + '\n', 1
  return code, err


@pytest.mark.parametrize('args, message', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_field(files, tmp_path, capsys, args, message):
  workdir = tmp_path / 'w'
  args = [a.format(d=files, w=workdir) for a in args]
  message = message.format(d=files)
  code, err = run_cli(args, workdir, capsys)
  assert code == 2, (code, err[-2000:])  # one exit status for bad input (posjax/errors.py)
  assert 'Traceback' not in err, err[-3000:]
  lines = [l for l in err.splitlines() if message in l]
  assert lines, f'no line holds {message!r}:\n{err[-2000:]}'
  assert lines[0].startswith('error: '), lines[0]
  assert not (workdir / 'checkpoints').exists() or not os.listdir(workdir / 'checkpoints')


def test_table_is_large():
  assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


def test_the_real_script_prints_one_line_and_no_traceback(tmp_path):
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--config=configs/bert.py:tiny',
                        f'--workdir={tmp_path}', '--config.data.files=/nonexistent/*.txt'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': ROOT})
  assert out.returncode == 2
  assert 'Traceback' not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == "error: data.files: '/nonexistent/*.txt' matches no file"


def test_the_config_file_runs_once(tmp_path, capsys):
  """Side effects of a config file happen once per run (ml_collections' flag used to execute it a second time)."""
  counter = tmp_path / 'ran'
  config = tmp_path / 'counting.py'
  config.write_text('from posjax.configs import bert\n\n\ndef get_config(arg=None):\n'
                    f'  open({str(counter)!r}, "a").write("x")\n'
                    '  c = bert.get_config(arg)\n  c.batch_size = 0\n  return c\n')
  code, err = run_cli([f'--config={config}:tiny'], tmp_path / 'w', capsys)
  assert code == 2 and 'batch_size must be a positive integer' in err
  assert counter.read_text() == 'x'
