"""The registered init schemes: which law each parameter of a model is drawn from.

Every scheme first resets the model with PyTorch's ``reset_parameters`` (so normalisation layers,
and any parameter no rule below covers, keep PyTorch's defaults), then, outside normalisation
layers, draws every weight of two or more dimensions (Linear, conv kernels, recurrent
``weight_ih``/``weight_hh``, attention projections, embeddings) from the scheme's law, and every
bias (``bias``, ``bias_ih_l0``, ``in_proj_bias``, ...) by one rule:

- schemes with a scale (``normal``, ``truncated-normal``, ``uniform``, ``variance-scaling`` and
  its named forms) draw a bias of ``n`` entries from the same law, with fan-in = fan-out = ``n``
  (what TensorFlow does when one initializer is given for both, and what this project's SNIP
  recipes score with); ``zero_bias=true`` sets biases to zero instead (snip-public's fresh draw
  that is trained, for any scheme);
- ``zeros``, ``orthogonal`` and ``delta-orthogonal`` set biases to zero (a vector has no
  orthogonal law; spp-public's ``init_b`` is zeros), so they have no ``zero_bias``;
- ``default`` is PyTorch's own draw, biases included.

The named variance-scaling forms use untruncated distributions, as their papers and
``torch.nn.init`` (``kaiming_normal_``, ``xavier_uniform_``) do; Keras's ``he_normal`` and
TensorFlow 1's ``glorot_normal_initializer`` truncate: ``variance-scaling:scale=2`` and
``variance-scaling:mode=fan_avg`` are those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn as nn

from ..errors import SparsetrainError
from . import laws
from .spec import INITS, register_init

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)

Law = Callable[[torch.Tensor], None]

#: The SNIP paper's Table 3 initializations (Lee et al. 2019, section 5: robustness to the
#: initialization) as init strings here. snip-public has only TensorFlow 1's default variance
#: scaling and zeros, so the other rows are read from the paper's words and TensorFlow 1:
#: "variance scaling (Glorot)" and "(He)" are TF1's ``glorot_normal_initializer`` (scale 1,
#: fan-avg) and ``he_normal`` (scale 2, fan-in), both truncated normal with the 0.88 correction.
#: No standard deviation for "random normal" and "truncated normal" is published in the paper's
#: code; TensorFlow's default of 1.0 would blow a 784-input layer's outputs up ~28-fold, so these
#: use 0.1, the value of TensorFlow's own MNIST examples (``truncated_normal(stddev=0.1)``): a
#: decision, not a published figure. Biases follow the rule above (drawn); add ``zero_bias=true``
#: (:func:`with_zero_bias`) for the trained set.
TABLE3_SCHEMES = {
    "random normal": "normal:std=0.1",
    "truncated normal": "truncated-normal:std=0.1",
    "glorot": "variance-scaling:mode=fan_avg",
    "he": "variance-scaling:scale=2",
}


def _default(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def apply_laws_(model: nn.Module, weight: Law, bias: Law | None) -> None:
    """PyTorch's defaults, then ``weight`` on every weight of 2+ dimensions and ``bias`` (None:
    zeros) on every bias, outside normalisation layers, in ``named_parameters`` order."""
    _default(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            if isinstance(model.get_submodule(owner_name), _NORMS) or param.numel() == 0:
                continue
            if "bias" in leaf:  # bias, bias_ih_l0, in_proj_bias, ...
                param.zero_() if bias is None else bias(param)
            elif param.dim() >= 2:
                weight(param)


# --- parameters ------------------------------------------------------------------------------------

def _positive(options, *names: str) -> None:
    for name in names:
        value = getattr(options, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise SparsetrainError(f"parameter {name!r} must be a positive finite number; got {value!r}")


_ZERO_BIAS = "set biases to zero instead of drawing them from the same law"


@dataclass(frozen=True)
class StdOptions:
    std: float = field(metadata={"help": "standard deviation (of the untruncated normal)"})
    zero_bias: bool = field(default=False, metadata={"help": _ZERO_BIAS})

    def __post_init__(self):
        _positive(self, "std")


@dataclass(frozen=True)
class LimitOptions:
    limit: float = field(metadata={"help": "draws from U(-limit, limit)"})
    zero_bias: bool = field(default=False, metadata={"help": _ZERO_BIAS})

    def __post_init__(self):
        _positive(self, "limit")


@dataclass(frozen=True)
class VarianceScalingOptions:
    scale: float = field(default=1.0, metadata={"help": "variance = scale / n"})
    mode: Literal["fan_in", "fan_out", "fan_avg"] = field(default="fan_in", metadata={"help": "n: fan-in, fan-out or their mean"})
    distribution: Literal["truncated_normal", "normal", "uniform"] = field(
        default="truncated_normal", metadata={"help": "truncated at 2 std (std corrected), normal, or uniform"})
    zero_bias: bool = field(default=False, metadata={"help": _ZERO_BIAS})

    def __post_init__(self):
        _positive(self, "scale")


@dataclass(frozen=True)
class BiasOptions:
    zero_bias: bool = field(default=False, metadata={"help": _ZERO_BIAS})


@dataclass(frozen=True)
class GainOptions:
    gain: float = field(default=1.0, metadata={"help": "multiplies the orthogonal matrix"})

    def __post_init__(self):
        _positive(self, "gain")


def _same_law(law: Law, zero_bias: bool) -> None | Law:
    return None if zero_bias else law


# --- schemes ---------------------------------------------------------------------------------------

@INITS.register("default")
def default(model: nn.Module) -> None:
    """PyTorch's own reset_parameters, biases included."""
    _default(model)
    # nn.MultiheadAttention has no reset_parameters: its input projection kept the constructor's
    # draw from the unseeded global RNG. Draw it here with PyTorch's law, after everything else
    # so that no other parameter's draw moves.
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(module, name, None) is not None:
                    nn.init.xavier_uniform_(getattr(module, name))
            if module.in_proj_bias is not None:
                nn.init.zeros_(module.in_proj_bias)


@register_init("zeros")
def zeros(model: nn.Module) -> None:
    """Every weight and bias zero (a degenerate start: scores and gradients vanish)."""
    apply_laws_(model, nn.init.zeros_, None)


@register_init("normal", options=StdOptions)
def normal(model: nn.Module, options: StdOptions) -> None:
    """N(0, std^2) for every weight (and bias)."""
    law = lambda t: laws.normal_(t, options.std)  # noqa: E731
    apply_laws_(model, law, _same_law(law, options.zero_bias))


@register_init("truncated-normal", options=StdOptions)
def truncated_normal(model: nn.Module, options: StdOptions) -> None:
    """N(0, std^2) cut at 2 std, as TensorFlow's truncated_normal (the draw's std is 0.88 std)."""
    law = lambda t: laws.truncated_normal_(t, options.std)  # noqa: E731
    apply_laws_(model, law, _same_law(law, options.zero_bias))


@register_init("uniform", options=LimitOptions)
def uniform(model: nn.Module, options: LimitOptions) -> None:
    """U(-limit, limit) for every weight (and bias)."""
    law = lambda t: laws.uniform_(t, options.limit)  # noqa: E731
    apply_laws_(model, law, _same_law(law, options.zero_bias))


@register_init("variance-scaling", options=VarianceScalingOptions)
def variance_scaling(model: nn.Module, options: VarianceScalingOptions) -> None:
    """Variance scale / n (TensorFlow's VarianceScaling; the defaults are TF1's, snip-public's)."""
    law = lambda t: laws.variance_scaling_(t, options.scale, options.mode, options.distribution)  # noqa: E731
    apply_laws_(model, law, _same_law(law, options.zero_bias))


@register_init("variance-scaling-zero-bias")
def variance_scaling_zero_bias(model: nn.Module) -> None:
    """variance-scaling with zero biases: snip-public's trained set (= variance-scaling:zero_bias=true)."""
    variance_scaling(model, VarianceScalingOptions(zero_bias=True))


def _named(name: str, scale: float, mode: str, distribution: str, who: str) -> None:
    def init(model: nn.Module, options: BiasOptions) -> None:
        variance_scaling(model, VarianceScalingOptions(scale, mode, distribution, options.zero_bias))

    limit_or_std = "limit sqrt(3 * {s} / {n})" if distribution == "uniform" else "std sqrt({s} / {n})"
    init.__doc__ = (f"{who}: {distribution}, " + limit_or_std.format(s=f"{scale:g}", n=mode.replace("_", "-"))
                    + f" (= variance-scaling:scale={scale:g},mode={mode},distribution={distribution})")
    register_init(name, options=BiasOptions)(init)


_named("lecun-normal", 1.0, "fan_in", "normal", "LeCun et al. 1998")
_named("lecun-uniform", 1.0, "fan_in", "uniform", "LeCun et al. 1998")
_named("glorot-normal", 1.0, "fan_avg", "normal", "Glorot & Bengio 2010 (Xavier)")
_named("glorot-uniform", 1.0, "fan_avg", "uniform", "Glorot & Bengio 2010 (Xavier)")
_named("he-normal", 2.0, "fan_in", "normal", "He et al. 2015 (Kaiming)")
_named("he-uniform", 2.0, "fan_in", "uniform", "He et al. 2015 (Kaiming)")


@register_init("orthogonal", options=GainOptions)
def orthogonal(model: nn.Module, options: GainOptions) -> None:
    """gain x a random orthogonal matrix per weight (conv kernels as (out, in*k*k)); zero biases."""
    apply_laws_(model, lambda t: laws.orthogonal_(t, options.gain), None)


@register_init("delta-orthogonal", options=GainOptions)
def delta_orthogonal(model: nn.Module, options: GainOptions) -> None:
    """Conv kernels orthogonal at the centre tap, zero elsewhere (Xiao et al. 2018); zero biases.

    Other weights (Linear, recurrent) are drawn as ``orthogonal``. A kernel is a conv module's
    weight, not any tensor of three or more dimensions."""
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}

    def law(t: torch.Tensor) -> None:
        if id(t) in kernels:
            laws.delta_orthogonal_(t, options.gain)
        else:
            laws.orthogonal_(t, options.gain)

    apply_laws_(model, law, None)
