"""Models by name. They know nothing of pruning.

    >>> from sparsetrain.models import create_model, list_models
    >>> model = create_model("lenet-300-100")
    >>> sum(p.numel() for p in model.parameters())
    266610

Every factory takes ``input_shape`` and ``num_classes`` keyword arguments (defaults: the model's
own paper configuration) and its own typed arguments (``model_args``), so the pipeline can build
any registered model for any registered data set. Image models take (C, H, W) examples;
recurrent models take sequences (T, F), which the data layer's ``view`` gives them.
"""

from . import lenet, small, vgg  # noqa: F401  (importing the families fills the registry)
from . import mlp, rnn  # noqa: F401
from . import alexnet, resnet, simple_cnn  # noqa: F401
from .registry import MODELS, check_model_args, create_model, default_input_shape, describe_model_args, list_models, model_args_of

__all__ = ["MODELS", "check_model_args", "create_model", "default_input_shape", "describe_model_args",
           "list_models", "model_args_of"]
