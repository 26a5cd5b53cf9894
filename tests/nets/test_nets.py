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


# --- design space -------------------------------------------------------------------
def test_parallel_subnets_are_independent():
    torch.manual_seed(0)
    net = MLP(10, 4, hidden_layers=2, bounds=get_model("ivim").default_bounds, parallel=True)
    assert len(net.body.subnets) == 4
    assert all(sub[-1].out_features == 1 for sub in net.body.subnets)
    x = torch.randn(5, 10)
    before = net(x).detach().clone()
    # changing the sub-network of output 2 changes only output 2
    with torch.no_grad():
        net.body.subnets[2][-1].bias += 3.0
    after = net(x).detach()
    changed = (after != before).any(dim=0).tolist()
    assert changed == [False, False, True, False]
    assert net.config["parallel"] is True


def test_batch_norm_and_dropout_layers_in_ivimnet_order():
    net = MLP(6, 2, hidden_layers=3, width=8, bounds=[[0, 0], [1, 1]], batch_norm=True, dropout=0.1)
    kinds = [type(m).__name__ for m in net.body]
    assert kinds == ["Linear", "BatchNorm1d", "ELU", "Dropout", "Linear", "BatchNorm1d", "ELU", "Dropout",
                     "Linear", "BatchNorm1d", "ELU", "Linear"]
    # dropout makes training-mode outputs random, eval-mode outputs deterministic
    x = torch.randn(64, 6)
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))
    assert net(x[:1]).shape == (1, 2)  # batch norm in eval mode takes a single voxel
    assert net(torch.randn(3, 4, 6)).shape == (3, 4, 2)


def test_bounds_margin_widens_the_sigmoid_range():
    head = BoundedOutput([[0.0], [1.0]], margin=0.3)
    out = head(torch.tensor([[-100.0], [0.0], [100.0]])).squeeze(1)
    assert torch.allclose(out, torch.tensor([-0.3, 0.5, 1.3]))
    with pytest.raises(ValueError, match="bounds_margin"):
        BoundedOutput([[0.0], [1.0]], margin=-0.1)


def test_fixed_outputs_are_constant_and_recorded():
    net = MLP(10, 4, bounds=get_model("ivim").default_bounds, fixed_outputs={0: 1.0})
    y = net(torch.randn(50, 10)).detach()
    assert torch.all(y[:, 0] == 1.0) and y[:, 1:].std(0).min() > 0
    again = MLP(**net.config)
    assert again.config == net.config and again.has_fixed


def test_default_config_has_no_design_keys_and_bad_options_fail():
    net = MLP(10, 4, bounds=get_model("ivim").default_bounds)
    assert set(net.config) == {"n_inputs", "n_outputs", "hidden_layers", "width", "activation", "bounds", "output"}
    with pytest.raises(ValueError, match="dropout"):
        MLP(10, 4, bounds=get_model("ivim").default_bounds, dropout=1.0)
    with pytest.raises(TypeError, match="parallel"):
        MLP(10, 4, bounds=get_model("ivim").default_bounds, parallel="yes")
    with pytest.raises(ValueError, match="fixed_outputs"):
        MLP(10, 4, bounds=get_model("ivim").default_bounds, fixed_outputs={7: 1.0})
