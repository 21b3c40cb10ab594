"""One process of a multi-process input pipeline, for tests/test_pipeline.py.

    python pipeline_worker.py NUM_PROCESSES PROCESS_ID PORT WORKDIR OUT_NPZ TOKENIZER

The processes join through jax.distributed (gloo, coordinator on localhost:PORT) as hosts of a pod do, build
the trainer's data (process 0 tokenises the corpus, the others wait for it in the shared data dir), read six
batches of their own rows, and read batches 3-5 again from a new iterator set to the state saved after batch 2.
With POSJAX_TEST_FAILING_PROCESS=i, process i fails while tokenising.
"""

import logging
import os
import sys

num_processes, process_id, port = (int(a) for a in sys.argv[1:4])
workdir, out, tokenizer = sys.argv[4:7]
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update('jax_cpu_collectives_implementation', 'gloo')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import micro_config  # noqa: E402
from posjax.data import pipeline  # noqa: E402
from posjax.data import inputs  # noqa: E402
from posjax.training import distributed  # noqa: E402


def main():
  logging.getLogger().setLevel(logging.INFO)  # the test reads which blocks each process tokenised
  c = micro_config(objective='mlm+nsp')
  c.data.update(tokenizer=tokenizer, seq_len=24, data_dir=os.path.join(workdir, 'tfds'))
  if num_processes > 1:
    c.distributed.update(initialize='on', coordinator_address=f'localhost:{port}',
                         num_processes=num_processes, process_id=process_id)
  distributed.initialize(c)
  if os.environ.get('POSJAX_TEST_FAILING_PROCESS') == str(process_id):
    from posjax.data import pieces
    from posjax.errors import ConfigError

    def fail(*args, **kwargs):
      raise ConfigError('no space left on device (test)')
    pieces.write_part = fail
  data = inputs.get_datasets(c, workdir)
  it = pipeline.iterator(data.train)
  batches = [next(it) for _ in range(3)]
  state = it.get_state()
  batches += [next(it) for _ in range(3)]
  it.close()
  again = pipeline.iterator(data.train)
  again.set_state(state)
  resumed = [next(again) for _ in range(3)]
  again.close()
  np.savez(out, **{f'{k}_{s}': b[k] for s, b in enumerate(batches) for k in b},
           **{f'resumed_{k}_{s}': b[k] for s, b in enumerate(resumed, 3) for k in b},
           process_count=jax.process_count())


if __name__ == '__main__':
  main()
