"""Training in the channels-last layout (``conv_layout``): the registered convolutional models give
the same step in both layouts, the layout is used inside training and undone after it, and a
model of one's own is trained as it is (it may ``.view`` its activations)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsetrain import TrainConfig, create_model, train
from sparsetrain.models import default_input_shape, list_models
from sparsetrain.train.loop import Callback, conv_layout

from test_train import loaders


#: registered networks built by the same code as another one, deeper or wider only: the layout
#: meets the same modules in them (tested once, through the network named, to keep the suite short)
SAME_CODE_AS = {"resnet-56": "resnet-32", "resnet-110": "resnet-32", "wrn-16-10": "wrn-16-8", "wrn-22-8": "wrn-16-8"}


def conv_models() -> list[str]:
    return [name for name in list_models() if name not in SAME_CODE_AS
            and any(isinstance(m, nn.Conv2d) for m in create_model(name).modules())]


def gradients(model: nn.Module, x, y) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and every parameter's gradient (in the default layout) at ``model``'s weights."""
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.item(), {k: p.grad.detach().clone().contiguous() for k, p in model.named_parameters()}


def test_every_registered_conv_model_is_covered():
    names = conv_models()
    # the papers' convolutional networks are all here: the test below would otherwise pass on a few
    assert {"lenet-5-caffe", "simple-cnn", "vgg-d", "wrn-16-8", "resnet-8", "resnet-32", "alexnet-s"} <= set(names)
    assert set(SAME_CODE_AS) <= set(list_models())  # (a renamed network would otherwise go untested)


@pytest.mark.parametrize("name", conv_models())
def test_a_training_step_is_the_same_in_both_layouts(name):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(4, *default_input_shape(name))
    y = torch.randint(0, 2, (4,))
    # eval mode: batch norm on running statistics and no dropout. In training mode the statistics
    # of a batch this small amplify rounding (deep networks' losses then differ at 1e-4 in either
    # layout alone, run twice with other thread counts); the convolutions are the same either way
    model.eval()
    loss, plain = gradients(model, x, y)
    with conv_layout(model):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs
                   if both_layouts_differ(c))
        loss_cl, channels_last = gradients(model, x, y)
    assert all(p.is_contiguous() for p in model.parameters())  # handed back in the default layout
    # the same arithmetic in another order of summation: equal to float32 rounding
    assert loss_cl == pytest.approx(loss, rel=1e-5)
    # against the whole gradient's norm: a bias before batch norm has a gradient of rounding size
    scale = torch.cat([g.flatten() for g in plain.values()]).norm()
    for k in plain:
        assert (plain[k] - channels_last[k]).norm() <= 1e-4 * scale, k


def both_layouts_differ(conv: nn.Conv2d) -> bool:
    """Whether channels-last is another layout than the default for this weight: with one input
    channel (per group) or a 1x1 kernel a weight is both at once."""
    return conv.weight.shape[1] > 1 and conv.weight.shape[-2:] != (1, 1)


class LayoutSeen(Callback):
    def __init__(self, conv: nn.Conv2d):
        assert both_layouts_differ(conv)  # else the test could not tell the layouts apart
        self.conv, self.seen = conv, []

    def on_step(self, step, loss):
        self.seen.append(self.conv.weight.is_contiguous(memory_format=torch.channels_last))


def test_train_uses_channels_last_on_a_registered_model_and_hands_it_back_contiguous():
    model = create_model("conv-tiny")
    seen = LayoutSeen(model[4])  # (its first convolution has one input channel: both layouts)
    result = train(model, loaders(), TrainConfig(iterations=6, val_every=3), callbacks=[seen], progress=False)
    assert result.status == "finished" and seen.seen == [True] * 6
    assert all(p.is_contiguous() for p in model.parameters())


class OwnNet(nn.Module):
    """A model of one's own that flattens with ``.view``: it fails on channels-last activations."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv = nn.Conv2d(4, 6, 3)
        self.fc = nn.Linear(6 * 24 * 24, 10)

    def forward(self, x):
        h = F.relu(self.conv(F.relu(self.conv1(x))))
        return self.fc(h.view(h.size(0), -1))


def test_a_model_of_ones_own_is_trained_in_its_own_layout():
    model = OwnNet()
    with pytest.raises(RuntimeError):  # what converting it would do
        model.to(memory_format=torch.channels_last)(torch.randn(2, 1, 28, 28))
    model.to(memory_format=torch.contiguous_format)
    seen = LayoutSeen(model.conv)
    result = train(model, loaders(), TrainConfig(iterations=4, val_every=2), callbacks=[seen], progress=False)
    assert result.status == "finished" and seen.seen == [False] * 4


def test_the_layout_is_undone_when_training_fails():
    model = create_model("conv-tiny")

    class Boom(Callback):
        def on_step(self, step, loss):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, loaders(), TrainConfig(iterations=4, val_every=2), callbacks=[Boom()], progress=False)
    assert all(p.is_contiguous() for p in model.parameters())
