import numpy as np
import pytest
import torch

from qmri_labels.nets import MLP, BoundedOutput
from qmri_labels.physics import get_model


def test_default_architecture_follows_epstein():
    bounds = get_model("ivim").default_bounds
    net = MLP(10, 4, bounds=bounds)
    linears = [m for m in net.body if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(10, 10), (10, 10), (10, 10), (10, 4)]
    assert sum(isinstance(m, torch.nn.ELU) for m in net.body) == 3
    assert net.config["width"] == 10 and net.config["activation"] == "elu" and net.config["output"] == "sigmoid"


def test_configurable_depth_width_activation():
    net = MLP(6, 2, hidden_layers=2, width=32, activation="relu", bounds=[[0, 0], [1, 1]])
    linears = [m for m in net.body if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(6, 32), (32, 32), (32, 2)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in net.body) == 2


@pytest.mark.parametrize("mapping", ["sigmoid", "clamp"])
def test_outputs_stay_within_bounds(mapping):
    bounds = get_model("ivim").default_bounds
    torch.manual_seed(0)
    net = MLP(10, 4, bounds=bounds, output=mapping)
    # huge inputs drive the last layer far into saturation on both sides
    x = torch.randn(2000, 10) * 1e4
    y = net(x).detach().numpy()
    assert np.all(y >= bounds[0].astype(np.float32)) and np.all(y <= bounds[1].astype(np.float32))


def test_sigmoid_mapping_is_scaled_sigmoid():
    head = BoundedOutput([[1.0, -2.0], [3.0, 2.0]])
    z = torch.tensor([[0.0, 0.0], [100.0, -100.0]])
    out = head(z)
    assert torch.allclose(out[0], torch.tensor([2.0, 0.0]))
    assert torch.allclose(out[1], torch.tensor([3.0, -2.0]))


def test_leading_shape_and_input_standardisation():
    net = MLP(3, 2, bounds=[[0, 0], [1, 1]], input_shift=[1, 2, 3], input_scale=[2, 2, 2])
    ref = MLP(3, 2, bounds=[[0, 0], [1, 1]])
    ref.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("input_")}, strict=False)
    x = torch.randn(4, 5, 3)
    assert net(x).shape == (4, 5, 2)
    assert torch.allclose(net(x), ref((x - torch.tensor([1.0, 2, 3])) / 2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(activation="swish-ish"), "activation"),
        (dict(output="softmax"), "output mapping"),
        (dict(bounds=[[0, 0, 0, 0], [1, 1, 1, 0]]), "lower < upper"),
        (dict(bounds=[[0, 0], [1, 1]]), "shape"),
        (dict(width=0), "width"),
        (dict(hidden_layers=-1), "hidden_layers"),
        (dict(input_scale=[0.0] * 10), "input_scale"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    args = dict(bounds=get_model("ivim").default_bounds)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MLP(10, 4, **args)


def test_identity_output_without_bounds():
    net = MLP(4, 2, output="identity")
    assert net(torch.zeros(1, 4)).shape == (1, 2)
    with pytest.raises(ValueError, match="needs bounds"):
        MLP(4, 2)
