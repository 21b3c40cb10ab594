"""`python train.py --config=configs/electra.py[:ARG]`: the config defined in posjax/configs/electra.py (its docstring
lists the arguments); `--config=electra[:ARG]` names the same one from an installed package."""

from posjax.configs.electra import get_config  # noqa: F401
