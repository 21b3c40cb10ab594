"""`python train.py --config=configs/glue.py[:ARG]`: the config defined in posjax/configs/glue.py (its docstring
lists the arguments); `--config=glue[:ARG]` names the same one from an installed package."""

from posjax.configs.glue import get_config  # noqa: F401
