"""posjax entry point in a clone: `python train.py ARGS` is `posjax train ARGS` (posjax/cli.py).

    python train.py --config=configs/bert.py:tiny --workdir=/tmp/posjax-tiny
    python train.py --config=configs/bert.py:base,absolute --workdir=DIR --config.num_train_steps=1000
    python train.py --config=configs/glue.py:sst2 --config.init_from=/tmp/posjax-tiny \
        --config.data.dir=GLUE_DIR --workdir=/tmp/sst2

Rerunning with the same --workdir resumes from its latest checkpoint. Exit statuses: posjax/errors.py.
"""

import sys

from posjax import cli as posjax_cli


def cli(argv):
  """What `python train.py ARGS` does with argv = ['train.py', ARGS...]; exits (SystemExit) when done."""
  sys.exit(posjax_cli.train(argv))


if __name__ == '__main__':
  cli(sys.argv)
