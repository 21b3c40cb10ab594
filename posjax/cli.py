"""What the absl entry points (train.py, `python -m posjax.aot`) share: one-line errors for a bad --config."""

import importlib.util
import os
import sys

from posjax.errors import ConfigError


def check_config_args(argv):
  """Evaluates --config=FILE.py:ARG and the names of --config.FIELD overrides once, up front, so a bad size,
  variant or field name prints one line rather than the traceback ml_collections' flag parser wraps round it."""
  config = None
  for a in argv[1:]:
    if a.startswith('--config='):
      path, _, arg = a.split('=', 1)[1].partition(':')
      if not os.path.isfile(path):
        sys.exit(f'error: --config: {path!r} is not a file (e.g. --config=configs/bert.py:tiny)')
      spec = importlib.util.spec_from_file_location('posjax_config_check', path)
      module = importlib.util.module_from_spec(spec)
      try:
        spec.loader.exec_module(module)
        config = module.get_config(arg) if arg else module.get_config()
      except ConfigError as e:
        sys.exit(f'error: {e}')
  if config is None:
    return
  for a in argv[1:]:
    if a.startswith('--config.'):
      field = a[len('--config.'):].split('=', 1)[0]
      node, walked = config, []
      for part in field.split('.'):
        if not hasattr(node, 'keys') or part not in node:
          where = 'config.' + '.'.join(walked) if walked else 'config'
          valid = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(none: not a group)'
          sys.exit(f'error: unknown config field config.{field}; valid fields of {where}: {valid}')
        node = node[part]
        walked.append(part)
