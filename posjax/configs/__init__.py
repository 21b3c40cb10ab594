"""The config files, inside the package (big_vision style), and the one way to load and override them.

`load('bert:tiny,tisa')` is what `--config=configs/bert.py:tiny,tisa` gives train.py (a file path works too);
`override(config, 'data.seq_len', '64')` is `--config.data.seq_len=64`. Model sizes live here once (each
module's `SIZES`).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os

from posjax.errors import ConfigError

NAMES = ('bert', 'albert', 'electra', 'convbert', 'glue')
# Fields that were renamed: an override of the old name is refused with a line naming the new one.
RENAMED = {'max_seq_length': 'data.seq_len', 'max_seq_len': 'data.seq_len', 'seq_len': 'data.seq_len'}


def load(spec: str):
  """'NAME[:ARG]' (a posjax/configs module) or 'FILE.py[:ARG]' -> get_config(ARG), executed once."""
  path, _, arg = spec.partition(':')
  if path in NAMES:
    module = importlib.import_module(f'posjax.configs.{path}')
  else:
    if not os.path.isfile(path):
      raise ConfigError(f'--config: {path!r} is not a file, nor one of {", ".join(NAMES)} (e.g. '
                        '--config=configs/bert.py:tiny or --config=bert:tiny)')
    loader = importlib.util.spec_from_file_location('posjax_user_config', path)
    module = importlib.util.module_from_spec(loader)
    try:
      loader.loader.exec_module(module)
    except SyntaxError as e:
      raise ConfigError(f'--config: {path}, line {e.lineno}: {e.msg}') from None
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigError(f'--config: {path} defines no get_config() function')
  config = module.get_config(arg) if arg else module.get_config()
  if not hasattr(config, 'keys'):
    raise ConfigError(f'--config: {path}: get_config() returned {type(config).__name__}, not a ConfigDict')
  return config


def _parse(text: str, current):
  """`text` as a value of `current`'s type (as ml_collections' flags parse it)."""
  if isinstance(current, bool):
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ValueError('expected true or false')
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _flag(flag: str, field: str) -> str:
  return f'{flag}.{field}' if flag == '--config' else f'{flag} {field}'


def override(config, field: str, value, flag: str = '--config') -> None:
  """Sets the dotted `field` of `config` to `value` (a string is parsed as the field's type). An unknown field
  is a ConfigError naming the valid fields where the walk stopped (or the field's new name)."""
  node, walked = config, []
  parts = field.split('.')
  for i, part in enumerate(parts):
    if not hasattr(node, 'keys') or part not in node:
      name = f'config.{field}' if flag == '--config' else f'{flag} {field}'
      if field in RENAMED:
        raise ConfigError(f'{name}: the field is now {RENAMED[field]}')
      where = '.'.join(['config'] + walked)
      valid = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(none: not a group)'
      raise ConfigError(f'unknown config field {name}; valid fields of {where}: {valid}')
    if i == len(parts) - 1:
      break
    node = node[part]
    walked.append(part)
  current = node[parts[-1]]
  if isinstance(value, str) and not isinstance(current, str):
    try:
      value = _parse(value, current)
    except ValueError as e:
      raise ConfigError(f'flag {_flag(flag, field)}={value}: not a {type(current).__name__} ({e})') from None
  try:
    node[parts[-1]] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f'flag {_flag(flag, field)}={value}: {e}') from None


def from_argv(argv: list[str]):
  """(config, argv without the --config arguments) from `--config=SPEC` and its `--config.FIELD=VALUE`
  overrides, applied in order; None when there is no --config."""
  spec, rest, overrides = None, [], []
  for a in argv:
    if a.startswith('--config='):
      spec = a.split('=', 1)[1]
    elif a.startswith('--config.'):
      if '=' not in a:
        raise ConfigError(f'{a}: write --config.FIELD=VALUE')
      overrides.append(a[len('--config.'):].split('=', 1))
    else:
      rest.append(a)
  if spec is None:
    if overrides:
      raise ConfigError('--config.FIELD overrides need --config=FILE.py[:ARG] (or NAME[:ARG])')
    return None, rest
  config = load(spec)
  for field, value in overrides:
    override(config, field, value)
  return config, rest
