"""Hugging Face ELECTRA and ConvBERT parity: transformers 4.57 on CPU torch is the oracle."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from helpers import padded_batch

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import posjax  # noqa: E402
from posjax.convert import hf_electra  # noqa: E402
from posjax.errors import ConfigError  # noqa: E402
from posjax.models import Bert  # noqa: E402
from posjax.models.electra import ElectraPretrainer  # noqa: E402

TOL = 1e-5


def perturb(model, seed):
  torch.manual_seed(seed + 100)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def run_hf(model, seed=0, **kw):
  ids, mask, types = padded_batch(seed)
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types), output_hidden_states=True, **kw)


def run_ours(cfg, params, seed=0):
  ids, mask, types = padded_batch(seed)
  return jax.jit(Bert(cfg).apply)({'params': params}, ids, mask.astype(bool), types)


def electra_config(**kw):
  return transformers.ElectraConfig(vocab_size=101, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=37, max_position_embeddings=40, **kw)


def convbert_config(**kw):
  return transformers.ConvBertConfig(vocab_size=101, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=40, max_position_embeddings=40,
                                     head_ratio=2, conv_kernel_size=5, **kw)


def test_electra_discriminator(tmp_path):
  model = perturb(transformers.ElectraForPreTraining(electra_config()), 0)
  model.save_pretrained(tmp_path / 'in')
  cfg, params = hf_electra.import_electra(str(tmp_path / 'in'))
  assert cfg.discriminator_head and not cfg.mlm_head and cfg.embedding_size == 16
  out, ours = run_hf(model), run_ours(cfg, params)
  np.testing.assert_allclose(ours['hidden_BxLxD'], out.hidden_states[-1].numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(ours['discriminator_logits_BxL'], out.logits.numpy(), atol=TOL, rtol=0)
  hf_electra.export_electra(cfg, params, str(tmp_path / 'out'))
  reloaded = transformers.ElectraForPreTraining.from_pretrained(tmp_path / 'out').eval()
  np.testing.assert_allclose(run_hf(reloaded, 1).logits.numpy(), run_ours(cfg, params, 1)[
      'discriminator_logits_BxL'], atol=TOL, rtol=0)


def test_electra_generator(tmp_path):
  model = perturb(transformers.ElectraForMaskedLM(electra_config()), 1)
  model.save_pretrained(tmp_path / 'in')
  cfg, params = hf_electra.import_electra(str(tmp_path / 'in'))
  assert cfg.mlm_head and not cfg.discriminator_head
  np.testing.assert_allclose(run_ours(cfg, params)['mlm_logits_BxLxV'], run_hf(model).logits.numpy(),
                             atol=TOL, rtol=0)
  hf_electra.export_electra(cfg, params, str(tmp_path / 'out'))
  reloaded = transformers.ElectraForMaskedLM.from_pretrained(tmp_path / 'out').eval()
  np.testing.assert_allclose(run_ours(cfg, params, 1)['mlm_logits_BxLxV'], run_hf(reloaded, 1).logits.numpy(),
                             atol=TOL, rtol=0)


@pytest.mark.parametrize('groups', [1, 2])
def test_convbert_model_and_generator(tmp_path, groups):
  model = perturb(transformers.ConvBertForMaskedLM(convbert_config(num_groups=groups)), 2)
  model.save_pretrained(tmp_path / 'in')
  cfg, params = hf_electra.import_electra(str(tmp_path / 'in'))
  assert cfg.attention == 'absolute+convbert' and cfg.ffn_groups == groups
  assert cfg.option('convbert_hf_padding') is True  # HF's convolution sees padding: reproduce it exactly
  out, ours = run_hf(model), run_ours(cfg, params)
  np.testing.assert_allclose(ours['hidden_BxLxD'], out.hidden_states[-1].numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(ours['mlm_logits_BxLxV'], out.logits.numpy(), atol=TOL, rtol=0)
  hf_electra.export_electra(cfg, params, str(tmp_path / 'out'))
  reloaded = transformers.ConvBertForMaskedLM.from_pretrained(tmp_path / 'out').eval()
  np.testing.assert_allclose(run_hf(reloaded, 1).logits.numpy(), run_ours(cfg, params, 1)['mlm_logits_BxLxV'],
                             atol=TOL, rtol=0)


@pytest.mark.parametrize('bare', ['electra', 'convbert'])
def test_bare_base_models_import(tmp_path, bare):
  """ElectraModel / ConvBertModel.save_pretrained write keys without the `electra.`/`convbert.` prefix."""
  model = (transformers.ElectraModel(electra_config()) if bare == 'electra'
           else transformers.ConvBertModel(convbert_config()))
  model = perturb(model, 5)
  model.save_pretrained(tmp_path / 'in')
  cfg, params = hf_electra.import_electra(str(tmp_path / 'in'))
  assert not cfg.mlm_head and not cfg.discriminator_head
  np.testing.assert_allclose(run_ours(cfg, params)['hidden_BxLxD'], run_hf(model).last_hidden_state.numpy(),
                             atol=TOL, rtol=0)


def test_convbert_discriminator_head(tmp_path):
  """ConvBertModel + ELECTRA's discriminator head (ConvBERT is pretrained as an ELECTRA discriminator)."""
  from transformers.models.electra.modeling_electra import ElectraDiscriminatorPredictions
  hfc = convbert_config()
  body = perturb(transformers.ConvBertModel(hfc), 3)
  head = perturb(ElectraDiscriminatorPredictions(hfc), 4)
  state = {f'convbert.{k}': v for k, v in body.state_dict().items()}
  state.update({f'discriminator_predictions.{k}': v for k, v in head.state_dict().items()})
  from safetensors.torch import save_file
  (tmp_path / 'in').mkdir()
  save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / 'in' / 'model.safetensors')
  hfc.save_pretrained(tmp_path / 'in')
  cfg, params = hf_electra.import_electra(str(tmp_path / 'in'))
  assert cfg.discriminator_head
  with torch.no_grad():
    hidden = run_hf(body).last_hidden_state
    logits = head(hidden).numpy()
  np.testing.assert_allclose(run_ours(cfg, params)['discriminator_logits_BxL'], logits, atol=TOL, rtol=0)


@pytest.mark.parametrize('size, expected_m', [('small', 13.1), ('medium-small', 17.5), ('base', 105.7)])
def test_convbert_parameter_counts_match_transformers(size, expected_m):
  from helpers import load_config_module
  c = load_config_module('convbert').get_config(size)
  layers, hidden, heads, ffn, emb, groups = load_config_module('convbert').SIZES[size]
  hfc = transformers.ConvBertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                                    num_attention_heads=heads, intermediate_size=ffn, embedding_size=emb,
                                    num_groups=groups, head_ratio=2, conv_kernel_size=9)
  with torch.device('meta'):
    hf_count = sum(p.numel() for p in transformers.ConvBertModel(hfc).parameters())
  d = c.model.to_dict()
  d['vocab_size'] = 30522
  cfg = posjax.ModelConfig.from_dict({**d, 'mlm_head': False, 'pooler': False})
  shapes = jax.eval_shape(lambda: Bert(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32)))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  assert ours == hf_count
  assert round(ours / 1e6, 1) == expected_m


def test_pretrainer_exports_a_discriminator_transformers_loads(tmp_path):
  cfg = posjax.ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                           max_position_embeddings=40, embedding_size=16)
  model = ElectraPretrainer(cfg, generator_fraction=0.5)
  ids = np.ones((1, 8), np.int32)
  pos = np.zeros((1, 2), np.int32)
  params = nn.unbox(jax.jit(lambda: model.init({'params': jax.random.PRNGKey(0), 'sample': jax.random.PRNGKey(1)},
                                              ids, ids > 0, ids * 0, pos, pos, pos.astype(np.float32)))()['params'])
  (gen_cfg, gen), (disc_cfg, disc) = hf_electra.split_pretrainer(cfg, params, 0.5)
  hf_electra.export_electra(disc_cfg, disc, str(tmp_path / 'disc'))
  hf_electra.export_electra(gen_cfg, gen, str(tmp_path / 'gen'))
  d = transformers.ElectraForPreTraining.from_pretrained(tmp_path / 'disc').eval()
  g = transformers.ElectraForMaskedLM.from_pretrained(tmp_path / 'gen').eval()
  np.testing.assert_allclose(run_hf(d).logits.numpy(), run_ours(disc_cfg, disc)['discriminator_logits_BxL'],
                             atol=TOL, rtol=0)
  np.testing.assert_allclose(run_hf(g).logits.numpy(), run_ours(gen_cfg, gen)['mlm_logits_BxLxV'],
                             atol=TOL, rtol=0)
  # The two checkpoints share embeddings, as ELECTRA's do.
  np.testing.assert_array_equal(d.electra.embeddings.word_embeddings.weight.detach().numpy(),
                                g.electra.embeddings.word_embeddings.weight.detach().numpy())


def test_wrong_architecture_and_missing_weight(tmp_path):
  transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
  ).save_pretrained(tmp_path / 'bert')
  with pytest.raises(ConfigError, match='expected an ELECTRA or ConvBERT checkpoint'):
    hf_electra.import_electra(str(tmp_path / 'bert'))
  model = transformers.ElectraForPreTraining(electra_config())
  state = {k: v for k, v in model.state_dict().items() if 'layer.1.attention.self.key.bias' not in k}
  from safetensors.torch import save_file
  (tmp_path / 'e').mkdir()
  save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / 'e' / 'model.safetensors')
  model.config.save_pretrained(tmp_path / 'e')
  with pytest.raises(ConfigError, match=r"missing weight 'electra.encoder.layer.1.attention.self.key.bias'"):
    hf_electra.import_electra(str(tmp_path / 'e'))
