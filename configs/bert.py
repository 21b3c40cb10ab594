"""`python train.py --config=configs/bert.py[:ARG]`: the config defined in posjax/configs/bert.py (its docstring
lists the arguments); `--config=bert[:ARG]` names the same one from an installed package."""

from posjax.configs.bert import get_config  # noqa: F401
