"""One process of a (possibly multi-process) CPU training run, for tests/test_sharding_multiprocess.py.

    python distributed_worker.py NUM_PROCESSES PROCESS_ID PORT LOCAL_DEVICES WORKDIR OUT_JSON TOKENIZER

With NUM_PROCESSES > 1 the processes join through jax.distributed (gloo collectives, coordinator on
localhost:PORT) into one mesh over all their devices, as hosts of a pod do; they share WORKDIR as hosts
share a file system."""

import json
import os
import sys

num_processes, process_id, port, local_devices = (int(a) for a in sys.argv[1:5])
workdir, out, tokenizer = sys.argv[5:8]
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={local_devices}"
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

jax.config.update('jax_cpu_collectives_implementation', 'gloo')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import micro_config  # noqa: E402
from posjax.training import pretraining  # noqa: E402


def main():
  c = micro_config(num_train_steps=3, log_every=1, eval_every=3, checkpoint_every=3, eval_batches=1)
  c.data.tokenizer = tokenizer
  c.data.seq_len = 16
  if num_processes > 1:
    c.distributed.update(initialize='on', coordinator_address=f'localhost:{port}',
                         num_processes=num_processes, process_id=process_id)
  last = pretraining.train_and_evaluate(c, workdir)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  if jax.process_index() == 0:
    with open(out, 'w') as f:
      json.dump({**last, 'process_count': jax.process_count(), 'device_count': jax.device_count(),
                 'checkpoints': steps}, f)


if __name__ == '__main__':
  main()
