"""Attention variants by name: `absolute`, `tisa+convq`, ...

A variant string is one or more registered component names joined by `+`. Each component plays one *role*
in the shared attention computation (see `core.py`):

- `position_embedding`: added to the token embeddings before the encoder (at most one per variant; with none
  named the model has no absolute positions at all, as the relative and TISA papers intend);
- `projection`: computes the first heads of some of q, k, v from the hidden states in place of their linear
  projection (convolutional q/k/v; at most one per variant);
- `score`: an additive term of the attention logits, shape [B or 1, H, Lq, Lk], or, for a content-free term
  (one with `offsets`), its table over key-minus-query offsets (see `posjax.attention.offsets`);
- `qkv`: a transform of queries/keys/values before the dot product (RoPE);
- `heads`: extra heads computed in parallel and concatenated before the output projection (ConvBERT);
- `output`: a term added to the attention output (Chang et al.'s depthwise convolution of values).

Components are Flax modules built from the model config by their `build` function, so options travel through
the config (`config.model.attention_options`) rather than through code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from posjax.errors import ConfigError

ROLES = ('position_embedding', 'projection', 'score', 'qkv', 'heads', 'output')


@dataclasses.dataclass(frozen=True)
class Option:
  """An attention option: its name, default, and the values it takes (`valid`, described by `rule` in the
  one-line error a bad value gets when the model config is built)."""
  name: str
  default: Any
  rule: str
  valid: Callable[[Any], bool]


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def integer(name: str, default: int, minimum: int = 1, odd: bool = False, even: bool = False) -> Option:
  kind = 'an odd ' if odd else 'an even ' if even else 'an '
  return Option(name, default, f'{kind}integer >= {minimum}',
                lambda v: _is_int(v) and v >= minimum and (not odd or v % 2 == 1) and (not even or v % 2 == 0))


def number(name: str, default: float, above: float) -> Option:
  return Option(name, default, f'a number > {above}',
                lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > above)


def flag(name: str, default: bool) -> Option:
  return Option(name, default, 'True or False', lambda v: isinstance(v, bool))


@dataclasses.dataclass(frozen=True)
class Component:
  name: str
  role: str
  build: Callable[..., Any]  # (model_config) -> flax module (or None for `none`)
  paper: str = ''
  # Per-layer extra parameters and costs, as shown in the README's variant table.
  params: str = '0'
  cost: str = '-'
  # False for components that may not be combined with another of the same role.
  stackable: bool = True
  # Options this component reads with `config.option(name)`, with their defaults and valid values; the
  # configs expose all of them under `model.attention_options` so any can be set from the command line.
  options: tuple[Option, ...] = ()
  # (model config) -> None, raising ConfigError: what the component needs of the model beyond its options'
  # own ranges (e.g. heads to split); run when a ModelConfig using the component is built.
  check: Callable[..., None] | None = None
  # For `heads` components: (model config) -> how many of the model's heads this branch computes; the
  # dot-product attention keeps the rest.
  takes_heads: Callable[..., int] | None = None
  # For content-free `score` components: (model config, the component's parameters by name, L, H) ->
  # table_HxR, the term at the R = 2L-1 offsets d = j - i (key minus query) = -(L-1)..L-1, float32. The
  # module returns this table of its own parameters; the core spreads it over the logits or passes it to the
  # fused kernel, and posjax.analysis calls it on a checkpoint's parameters.
  offsets: Callable[..., Any] | None = None
  # For `score` components whose term is q . r or k . r with a table of vectors over distances (relative_key,
  # relative_key_query, convq, convk): built with fused=True, the module returns `flash.Distances` for the
  # fused kernel, which forms the term tile by tile, instead of the BxHxLxL term.
  distances: bool = False


_REGISTRY: dict[str, Component] = {}

# Options of the shared computation itself (core.py).
CORE_OPTIONS = (
    flag('use_qk', True),  # False drops the q.k term: attention from the score terms alone (Chang et al. 2021)
)


def register(component: Component) -> Component:
  if component.role not in ROLES:
    raise ValueError(f'role {component.role!r} is not one of {ROLES}')
  if component.name in _REGISTRY:
    raise ValueError(f'attention component {component.name!r} is registered twice')
  _REGISTRY[component.name] = component
  return component


def default_options() -> dict[str, Any]:
  """Every option of every registered component (and of the core), with its default."""
  opts = {o.name: o.default for o in CORE_OPTIONS}
  for c in _REGISTRY.values():
    for o in c.options:
      if o.name in opts and opts[o.name] != o.default:
        raise ValueError(f'option {o.name!r} of {c.name!r} has default {o.default!r}; another component says '
                         f'{opts[o.name]!r}')
      opts[o.name] = o.default
  return opts


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> Component:
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ConfigError(
        f'unknown attention variant {name!r}; valid names: {", ".join(names())} '
        '(combine with "+", e.g. "absolute+convfixed")') from None


@dataclasses.dataclass(frozen=True)
class Plan:
  """A parsed variant: the components of each role, in the order they were named."""
  spec: str
  position_embedding: Component | None
  projection: Component | None = None
  score: tuple[Component, ...] = ()
  qkv: tuple[Component, ...] = ()
  heads: tuple[Component, ...] = ()
  output: tuple[Component, ...] = ()


def parse(spec: str) -> Plan:
  """'tisa+convq' -> Plan; raises ValueError naming the valid choices."""
  if not isinstance(spec, str) or not spec.strip():
    raise ConfigError(f'attention variant must be a non-empty string like "absolute"; got {spec!r}; '
                     f'valid names: {", ".join(names())}')
  parts = [p.strip() for p in spec.split('+')]
  if any(not p for p in parts):
    raise ConfigError(f'attention variant {spec!r} has an empty component; write names joined by "+"')
  if len(set(parts)) != len(parts):
    raise ConfigError(f'attention variant {spec!r} names a component twice')
  by_role: dict[str, list[Component]] = {r: [] for r in ROLES}
  for p in parts:
    c = get(p)
    by_role[c.role].append(c)
  for role, cs in by_role.items():
    if len(cs) > 1 and not all(c.stackable for c in cs):
      raise ConfigError(
          f'attention variant {spec!r} combines {" and ".join(c.name for c in cs)}, which cannot be used '
          f'together (at most one {role.replace("_", " ")})')
  pe, proj = by_role['position_embedding'], by_role['projection']
  return Plan(spec=spec, position_embedding=pe[0] if pe else None, projection=proj[0] if proj else None,
              score=tuple(by_role['score']), qkv=tuple(by_role['qkv']),
              heads=tuple(by_role['heads']), output=tuple(by_role['output']))


def owners() -> dict[str, list[str]]:
  """{option: the names of the components that read it} ('core' for the shared computation's own)."""
  out = {o.name: ['core'] for o in CORE_OPTIONS}
  for c in _REGISTRY.values():
    for o in c.options:
      out.setdefault(o.name, []).append(c.name)
  return out


def components(plan: Plan) -> list[Component]:
  """Every component of a parsed variant."""
  return ([c for c in (plan.position_embedding, plan.projection) if c is not None] +
          [*plan.score, *plan.qkv, *plan.heads, *plan.output])


def used_options(plan: Plan) -> list[Option]:
  """The options a parsed variant reads: the core's and its components'."""
  seen, out = set(), []
  for o in [*CORE_OPTIONS, *(o for c in components(plan) for o in c.options)]:
    if o.name not in seen:
      seen.add(o.name)
      out.append(o)
  return out


def check(cfg) -> None:
  """Every option the variant of `cfg` (a ModelConfig) reads in its range, then each component's own check;
  the first problem is a ConfigError naming the option and its valid values."""
  plan = parse(cfg.attention)
  for o in used_options(plan):
    value = cfg.option(o.name)
    if not o.valid(value):
      raise ConfigError(f'attention option {o.name} must be {o.rule}; got {value!r}')
  heads = cfg.num_heads - sum(c.takes_heads(cfg) for c in plan.heads)
  if heads < 1:
    raise ConfigError(f'attention variant {cfg.attention!r} leaves no dot-product attention heads out of '
                      f'model.num_heads={cfg.num_heads}')
  for c in components(plan):
    if c.check is not None:
      c.check(cfg)
