"""titan-mla: Multi-Head Latent Attention models trained with torchtitan.

Importing the package registers the ``titan_mla`` TrainSpec and the default corpora with torchtitan,
so a config only needs ``model.name = "titan_mla"`` (and ``experimental.custom_import = "titan_mla"``
when launched through torchtitan's own entry point).
"""

from .device import configure_torchtitan_device

configure_torchtitan_device()  # before anything imports torchtitan

from torchtitan.protocols.train_spec import register_train_spec  # noqa: E402

from .data import register_datasets  # noqa: E402
from .longctx import register as register_longctx  # noqa: E402
from .longctx import with_needle_dataloader  # noqa: E402
from .models import get_train_spec  # noqa: E402

TRAIN_SPEC_NAME = "titan_mla"

_train_spec = get_train_spec()
# The needle datasets (titan_mla.longctx) are generated on the fly by their own dataloader.
_train_spec.build_dataloader_fn = with_needle_dataloader(_train_spec.build_dataloader_fn)
register_train_spec(TRAIN_SPEC_NAME, _train_spec)
register_datasets()
register_longctx()
