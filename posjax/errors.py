"""User-facing errors: one line naming the field (or file) at fault and the valid choices.

Exit statuses of every posjax command (train.py, `python -m posjax...`):
  0  finished, or stopped by SIGTERM/SIGINT after writing a checkpoint (rerun the command to resume);
  1  an unexpected error (a bug: the traceback is printed);
  2  bad input: a config field, config file, variant, data path or format, tokenizer, workdir or checkpoint;
  3  a NaN/Inf loss or gradient norm under nonfinite='stop' (the last good checkpoint is kept);
  4  the run could not write what it must (a full disk, a checkpoint that was not saved);
  128+N  ended by signal N before anything newer than the last checkpoint existed (130: Ctrl-C, 143: SIGTERM).
"""


class Error(Exception):
  """An error posjax reports as one `error:` line and this exit status."""
  exit_code = 1


class ConfigError(Error, ValueError):
  """A bad config field, config string, variant name, data path or checkpoint; train.py prints it alone."""
  exit_code = 2


class NonFiniteError(Error, RuntimeError):
  """Training met a NaN/Inf loss or gradient norm under `nonfinite='stop'`; no state after it was saved."""
  exit_code = 3


class WriteError(Error, OSError):
  """Something the run must write was not written: a full or read-only disk, a checkpoint orbax declined."""
  exit_code = 4
