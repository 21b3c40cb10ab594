"""`python train.py --config=configs/convbert.py[:ARG]`: the config defined in posjax/configs/convbert.py (its docstring
lists the arguments); `--config=convbert[:ARG]` names the same one from an installed package."""

from posjax.configs.convbert import get_config  # noqa: F401
