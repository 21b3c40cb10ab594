"""The hashable model config shared by every module (a frozen dataclass, as in flax's examples)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from posjax.errors import ConfigError

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
ACTIVATIONS = ('gelu', 'gelu_new', 'relu', 'silu')
# Rematerialisation of the encoder layers in the backward pass (jax.checkpoint policies; `none`: keep every
# activation, `full`: keep only each layer's input).
REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'everything_saveable')
# How softmax(q.k + position terms) . v is computed (posjax.attention.flash.choose): 'xla' hands a dense
# [B|1]xHxLxL position bias to jax.nn.dot_product_attention; 'pallas' runs the fused kernel, which builds the
# terms per tile from O(H L) tables and, on a TPU, a relative_key(_query) term from its O(L Dh) distance
# table (Mosaic on a TPU, Triton on a GPU, interpret mode on the CPU); 'auto' takes the kernel on a TPU or
# GPU when the variant and the call allow it, else 'xla'.
ATTENTION_IMPLS = ('auto', 'xla', 'pallas')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and options of a BERT-family encoder.

  `attention` is a variant string (see `posjax.attention.registry`); `attention_options` holds the options of
  its components as sorted (name, value) pairs so the config stays hashable.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  initializer_range: float = 0.02
  attention: str = 'absolute'
  attention_options: tuple[tuple[str, Any], ...] = ()
  pad_token_id: int = 0
  # BERT-family knobs (defaults: BERT). ALBERT: embedding_size=128, layer_groups=1, sentence_head=True;
  # ELECTRA/ConvBERT: embedding_size, pooler=False, discriminator_head=True; ConvBERT: ffn_groups.
  embedding_size: int = 0  # E of factorised embeddings; > 0 adds a projection E -> hidden_size
  layer_groups: int = 0  # distinct parameter sets shared across layers (ALBERT); 0: every layer its own
  inner_group_size: int = 1  # layers per shared group (ALBERT's inner_group_num)
  ffn_groups: int = 1  # grouped linear feed-forward (ConvBERT's num_groups)
  mlm_head: bool = True
  mlm_head_act: str = ''  # activation of the MLM head's transform; '': hidden_act (ELECTRA's is always gelu)
  pooler: bool = True
  sentence_head: bool = False  # 2-way classifier on the pooled output: BERT's NSP or ALBERT's SOP
  discriminator_head: bool = False  # ELECTRA's replaced-token detection head
  # Compute dtype; parameters stay in param_dtype (float32 master weights under bfloat16 compute), and
  # softmax, LayerNorm statistics and losses are float32 whatever it is.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # Training-time layout: `scan_layers` runs the encoder as one nn.scan over stacked layer parameters (compile
  # time independent of depth; posjax.models.layout converts between the two layouts), `remat_policy`
  # recomputes layer activations in the backward pass.
  scan_layers: bool = False
  remat_policy: str = 'none'
  # 'xla' (default), 'pallas' or 'auto' (the kernel on TPU where the variant allows it); changes no parameter.
  # The Pallas kernel has been compiled for TPU and checked in interpret mode, not yet run on a TPU.
  attention_impl: str = 'xla'

  def __post_init__(self):
    for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size',
                 'max_position_embeddings', 'type_vocab_size'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f'model.{name} must be a positive integer; got {value!r}')
    if self.hidden_size % self.num_heads:
      raise ConfigError(f'model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads '
                       f'({self.num_heads})')
    for name in ('hidden_dropout', 'attention_dropout'):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        raise ConfigError(f'model.{name} must be in [0, 1); got {value!r}')
    if self.embedding_size < 0:
      raise ConfigError(f'model.embedding_size must be >= 0 (0: no factorisation); got {self.embedding_size}')
    if self.layer_groups < 0 or self.inner_group_size < 1:
      raise ConfigError(f'model.layer_groups must be >= 0 and model.inner_group_size >= 1; got '
                        f'{self.layer_groups}, {self.inner_group_size}')
    if self.layer_groups and self.num_layers % self.layer_groups:
      raise ConfigError(f'model.num_layers ({self.num_layers}) must be divisible by model.layer_groups '
                        f'({self.layer_groups})')
    for name, size in (('hidden_size', self.hidden_size), ('intermediate_size', self.intermediate_size)):
      if self.ffn_groups < 1 or size % self.ffn_groups:
        raise ConfigError(f'model.{name} ({size}) must be divisible by model.ffn_groups ({self.ffn_groups})')
    if self.sentence_head and not self.pooler:
      raise ConfigError('model.sentence_head needs model.pooler=True (it classifies the pooled output)')
    if self.mlm_head_act and self.mlm_head_act not in ACTIVATIONS:
      raise ConfigError(f'model.mlm_head_act {self.mlm_head_act!r} is not one of {", ".join(ACTIVATIONS)}')
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f'model.remat_policy {self.remat_policy!r} is not one of {", ".join(REMAT_POLICIES)}')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f'model.attention_impl {self.attention_impl!r} is not one of {", ".join(ATTENTION_IMPLS)}')
    if self.hidden_act not in ACTIVATIONS:
      raise ConfigError(f'model.hidden_act {self.hidden_act!r} is not one of {", ".join(ACTIVATIONS)}')
    # Validate the variant string and option names now, before any tracing, so a typo fails in one line.
    from posjax.attention import registry  # pylint: disable=g-import-not-at-top
    plan = registry.parse(self.attention)
    known = registry.default_options()
    unknown = sorted(k for k, _ in self.attention_options if k not in known)
    if unknown:
      raise ConfigError(f'unknown attention option(s) {", ".join(unknown)}; valid options: '
                        f'{", ".join(sorted(known))}')
    # Configs carry every option at its default; one set to something else must be read by the variant.
    used, owners = {o.name for o in registry.used_options(plan)}, registry.owners()
    unused = sorted(k for k, v in self.attention_options if k not in used and v != known[k])
    if unused:
      named = ', '.join(f'{k} (of {"/".join(owners[k])})' for k in unused)
      raise ConfigError(f'attention option(s) {named} set, but variant {self.attention!r} does not use them')
    for name, value in (('layer_norm_eps', self.layer_norm_eps), ('initializer_range', self.initializer_range)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f'model.{name} must be positive; got {value!r}')
    if not 0 <= self.pad_token_id < self.vocab_size:
      raise ConfigError(f'model.pad_token_id must be in [0, model.vocab_size={self.vocab_size}); got '
                        f'{self.pad_token_id!r}')
    registry.check(self)  # every option the variant reads in its range, and what its components need
    if self.attention_impl == 'pallas':
      from posjax.attention import flash  # pylint: disable=g-import-not-at-top
      why = flash.unsupported(self)
      if why:
        raise ConfigError(f"model.attention_impl='pallas' cannot compute attention {self.attention!r} with "
                          f"{'; '.join(why)}; use 'auto' (the kernel where it can) or 'xla'")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def embed_dim(self) -> int:
    """Width of the embedding tables: E when factorised, else the model width."""
    return self.embedding_size or self.hidden_size

  def option(self, name: str, default: Any = None) -> Any:
    """An attention option: the configured value, else the registered default, else `default`."""
    opts = dict(self.attention_options)
    if name in opts:
      return opts[name]
    from posjax.attention import registry  # pylint: disable=g-import-not-at-top
    return registry.default_options().get(name, default)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelConfig':
    """From a plain mapping (e.g. `config.model.to_dict()`); names an unknown field and the valid ones."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = dict(d)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
      raise ConfigError(f'unknown model config field(s) {", ".join("model." + u for u in unknown)}; '
                       f'valid fields: {", ".join(sorted(fields))}')
    for name in ('dtype', 'param_dtype'):
      if isinstance(kwargs.get(name), str):
        if kwargs[name] not in _DTYPES:
          raise ConfigError(f'model.{name} {kwargs[name]!r} is not one of {", ".join(_DTYPES)}')
        kwargs[name] = _DTYPES[kwargs[name]]
    opts = kwargs.get('attention_options', ())
    if isinstance(opts, Mapping):
      kwargs['attention_options'] = tuple(sorted(dict(opts).items()))
    return cls(**kwargs)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['attention_options'] = dict(self.attention_options)
    for name in ('dtype', 'param_dtype'):
      d[name] = jnp.dtype(d[name]).name
    return d


# model.vocab_size 0 follows the tokenizer, rounded up: a trained vocabulary has any size (8141, say), and the
# embedding's vocab axis must divide by the mesh axes it is sharded over (tensor parallelism, FSDP).
VOCAB_MULTIPLE = 128


def padded_vocab(vocab_size: int) -> int:
  return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
