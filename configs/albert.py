"""`python train.py --config=configs/albert.py[:ARG]`: the config defined in posjax/configs/albert.py (its docstring
lists the arguments); `--config=albert[:ARG]` names the same one from an installed package."""

from posjax.configs.albert import get_config  # noqa: F401
