"""titan-mla: Multi-Head Latent Attention models trained with torchtitan.

Importing the package registers the ``titan_mla`` TrainSpec and the default corpora with torchtitan,
so a config only needs ``model.name = "titan_mla"`` (and ``experimental.custom_import = "titan_mla"``
when launched through torchtitan's own entry point).
"""

from .device import configure_torchtitan_device

configure_torchtitan_device()  # before anything imports torchtitan

from torchtitan.protocols.train_spec import register_train_spec  # noqa: E402

from .data import register_datasets  # noqa: E402
from .models import get_train_spec  # noqa: E402

TRAIN_SPEC_NAME = "titan_mla"

register_train_spec(TRAIN_SPEC_NAME, get_train_spec())
register_datasets()
