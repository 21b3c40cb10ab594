"""Hugging Face BERT parity: transformers 4.57 BertForMaskedLM on CPU torch is the oracle."""

import jax
import numpy as np
import pytest

from helpers import padded_batch

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from posjax.convert import hf_bert  # noqa: E402
from posjax.errors import ConfigError  # noqa: E402
from posjax.models import Bert  # noqa: E402

TOL = 1e-5


def hf_model(position_embedding_type='absolute', seed=0, **kw):
  torch.manual_seed(seed)
  cfg = transformers.BertConfig(
      vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
      max_position_embeddings=40, type_vocab_size=2, position_embedding_type=position_embedding_type, **kw)
  model = transformers.BertForMaskedLM(cfg).eval()
  # Random init leaves LayerNorm at (1, 0) and biases at 0: perturb everything so the test sees every tensor.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def hf_outputs(model, ids, mask, types):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types), output_hidden_states=True)
  return out.hidden_states[-1].numpy(), out.logits.numpy()


def posjax_outputs(cfg, params, ids, mask, types):
  out = jax.jit(Bert(cfg).apply)({'params': params}, ids, mask.astype(bool), types)
  return np.asarray(out['hidden_BxLxD']), np.asarray(out['mlm_logits_BxLxV'])


def test_import_matches_transformers(tmp_path):
  model = hf_model()
  model.save_pretrained(tmp_path)
  cfg, params = hf_bert.import_bert(str(tmp_path))
  ids, mask, types = padded_batch()
  hidden, logits = hf_outputs(model, ids, mask, types)
  our_hidden, our_logits = posjax_outputs(cfg, params, ids, mask, types)
  np.testing.assert_allclose(our_hidden, hidden, atol=TOL, rtol=0)
  np.testing.assert_allclose(our_logits, logits, atol=TOL, rtol=0)


def test_export_loads_in_transformers(tmp_path):
  model = hf_model(seed=1)
  model.save_pretrained(tmp_path / 'in')
  cfg, params = hf_bert.import_bert(str(tmp_path / 'in'))
  hf_bert.export_bert(cfg, params, str(tmp_path / 'out'))
  reloaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / 'out').eval()
  ids, mask, types = padded_batch(seed=1)
  hidden, logits = hf_outputs(reloaded, ids, mask, types)
  our_hidden, our_logits = posjax_outputs(cfg, params, ids, mask, types)
  np.testing.assert_allclose(logits, our_logits, atol=TOL, rtol=0)
  np.testing.assert_allclose(hidden, our_hidden, atol=TOL, rtol=0)
  # The pooler travels too (BertModel uses it).
  bm = transformers.BertModel.from_pretrained(tmp_path / 'out').eval()
  with torch.no_grad():
    pooled = bm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types)).pooler_output.numpy()
  ours = jax.jit(Bert(cfg).apply)({'params': params}, ids, mask.astype(bool), types)['pooled_BxD']
  np.testing.assert_allclose(np.asarray(ours), pooled, atol=TOL, rtol=0)


def test_pytorch_bin_is_read_without_pickle(tmp_path):
  model = hf_model(seed=2)
  model.save_pretrained(tmp_path, safe_serialization=False)
  assert (tmp_path / 'pytorch_model.bin').exists()
  cfg, params = hf_bert.import_bert(str(tmp_path))
  ids, mask, types = padded_batch(seed=2)
  _, logits = hf_outputs(model, ids, mask, types)
  np.testing.assert_allclose(posjax_outputs(cfg, params, ids, mask, types)[1], logits, atol=TOL, rtol=0)


def test_bad_checkpoints_name_the_problem(tmp_path):
  with pytest.raises(ConfigError, match='no config.json'):
    hf_bert.import_bert(str(tmp_path))
  model = hf_model(seed=3)
  model.save_pretrained(tmp_path / 'ok')
  from safetensors.numpy import load_file, save_file
  state = load_file(tmp_path / 'ok' / 'model.safetensors')
  key = 'bert.encoder.layer.1.intermediate.dense.weight'
  broken = dict(state)
  del broken[key]
  (tmp_path / 'missing').mkdir()
  save_file(broken, tmp_path / 'missing' / 'model.safetensors')
  (tmp_path / 'missing' / 'config.json').write_text((tmp_path / 'ok' / 'config.json').read_text())
  with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
    hf_bert.import_bert(str(tmp_path / 'missing'))
  broken = dict(state)
  broken[key] = broken[key][:, :5]
  save_file(broken, tmp_path / 'missing' / 'model.safetensors')
  with pytest.raises(ConfigError, match='has shape'):
    hf_bert.import_bert(str(tmp_path / 'missing'))
  (tmp_path / 'missing' / 'config.json').write_text('{"model_type": "albert"}')
  with pytest.raises(ConfigError, match='expected a BERT checkpoint'):
    hf_bert.import_bert(str(tmp_path / 'missing'))


@pytest.mark.parametrize('position_embedding_type', ['absolute', 'relative_key_query'])
def test_classifier_matches_bert_for_sequence_classification(tmp_path, position_embedding_type):
  """Fine-tuning's Classifier (last layer on [CLS] alone) against transformers' BertForSequenceClassification."""
  import dataclasses
  from posjax.finetune.model import Classifier, encoder_config
  torch.manual_seed(3)
  hfc = transformers.BertConfig(
      vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
      max_position_embeddings=40, position_embedding_type=position_embedding_type, num_labels=3)
  model = transformers.BertForSequenceClassification(hfc).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(tmp_path)
  cfg, params = hf_bert.import_bert(str(tmp_path))
  cfg = encoder_config(dataclasses.replace(cfg, hidden_dropout=0.0, attention_dropout=0.0))
  head = {'kernel': model.classifier.weight.detach().numpy().T, 'bias': model.classifier.bias.detach().numpy()}
  bert = {k: v for k, v in params.items() if k != 'mlm_head'}
  ids, mask, types = padded_batch()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types)).logits.numpy()
  got = jax.jit(Classifier(cfg, 3).apply)({'params': {'bert': bert, 'out': head}}, ids, mask.astype(bool), types)
  np.testing.assert_allclose(np.asarray(got), ref, atol=TOL, rtol=0)
