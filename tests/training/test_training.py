import numpy as np
import pytest
import torch

from qmri_labels.data import DatasetSpec
from qmri_labels.training import InMemoryDataModule, TensorBatches, compute_mle_labels


@pytest.fixture(scope="module")
def tiny(ivim_set):
    return ivim_set(n=1200, seed=5)


@pytest.fixture(scope="module")
def fit(small_network):
    def fit(ds, **kwargs):
        return small_network(**{"batch_size": 64, **kwargs}).fit(ds)

    return fit


def test_batches_are_whole_tensor_slices_covering_every_row_once():
    x = torch.arange(103, dtype=torch.float32)[:, None]
    batches = TensorBatches({"x": x, "y": 2 * x}, torch.arange(103), batch_size=16, seed=1)
    assert len(batches) == 7
    seen = torch.cat([b["x"][:, 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(103))
    for b in batches:  # rows stay aligned across keys
        assert torch.equal(b["y"], 2 * b["x"])
    # each epoch reshuffles, reproducibly from the seed
    e0 = torch.cat([b["x"][:, 0] for b in TensorBatches({"x": x}, torch.arange(103), 16, seed=1)])
    again = TensorBatches({"x": x}, torch.arange(103), 16, seed=1)
    first, second = [torch.cat([b["x"][:, 0] for b in again]) for _ in range(2)]
    assert torch.equal(first, e0) and not torch.equal(first, second)


def test_distributed_shares_are_disjoint_and_cover_every_row():
    x = torch.arange(100, dtype=torch.float32)[:, None]
    loaders = [TensorBatches({"x": x}, torch.arange(100), 8, seed=3, rank=r, world_size=3) for r in range(3)]
    shares = [torch.cat([b["x"][:, 0] for b in loader]) for loader in loaders]
    assert [s.numel() for s in shares] == [34, 33, 33]
    assert sorted(torch.cat(shares).tolist()) == list(range(100))
    # the same number of blocks on every rank (each block holds collectives under DDP)
    assert {len(loader) for loader in loaders} == {5}
    assert [sum(1 for _ in TensorBatches({"x": x}, torch.arange(100), 8, rank=r, world_size=3)) for r in range(3)] \
        == [5, 5, 5]


def test_datamodule_split_and_validation():
    data = InMemoryDataModule({"signals": np.zeros((1000, 3)), "theta": np.zeros((1000, 2))}, batch_size=64,
                              val_fraction=0.2, split_seed=4)
    assert data.n_val == 200 and data.train_indices.numel() == 800
    assert not set(data.train_indices.tolist()) & set(data.val_indices.tolist())
    with pytest.raises(ValueError, match="same first dimension"):
        InMemoryDataModule({"a": np.zeros((5, 2)), "b": np.zeros((4, 2))})
    with pytest.raises(ValueError, match="val_fraction"):
        InMemoryDataModule({"a": np.zeros((5, 2))}, val_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        InMemoryDataModule({"a": np.zeros((5, 2))}, batch_size=0)


def test_blocks_of_batches_give_the_same_updates_as_single_batches(tiny, fit):
    a = fit(tiny, batches_per_block=1)
    b = fit(tiny, batches_per_block=7)
    for (k, va), vb in zip(a.network_.state_dict().items(), b.network_.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.history_ == b.history_


def test_same_seed_same_result_different_seed_differs(tiny, fit):
    a = fit(tiny, label="self", seed=11)
    b = fit(tiny, label="self", seed=11)
    c = fit(tiny, label="self", seed=12)
    np.testing.assert_array_equal(a.predict(tiny.signals), b.predict(tiny.signals))
    assert a.history_ == b.history_
    assert not np.array_equal(a.predict(tiny.signals), c.predict(tiny.signals))
    # init and batch order can vary alone
    d = fit(tiny, label="self", seed=11, shuffle_seed=99)
    assert d.seeds_["init_seed"] == 11 and d.seeds_["shuffle_seed"] == 99
    assert not np.array_equal(a.predict(tiny.signals), d.predict(tiny.signals))


def test_global_rng_and_flags_untouched(tiny, fit):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(tiny, max_epochs=1)
    assert torch.equal(torch.rand(3), expected)
    assert not torch.are_deterministic_algorithms_enabled()


def test_early_stopping_keeps_best_epoch(tiny, fit):
    # a learning rate this large throws the network off after its first epoch and the validation
    # loss never gets back below it: training stops `patience` epochs after the best, well before
    # the cap, and the best epoch is kept
    est = fit(tiny, lr=0.3, max_epochs=12, patience=2)
    val = [h["val_loss"] for h in est.history_]
    assert est.n_epochs_ == len(val) == est.best_epoch_ + 2 + 1 < 12
    assert est.best_epoch_ == int(np.argmin(val))
    assert est.best_val_loss_ == pytest.approx(min(val))
    # the restored weights reproduce the best validation loss
    from qmri_labels.training import LabelLoss, ParameterNormalisation, resolve_weights
    from qmri_labels.training.datamodule import InMemoryDataModule as DM

    data = DM({"signals": tiny.signals, "theta": tiny.theta_true}, batch_size=64, val_fraction=0.1, split_seed=0)
    loss = LabelLoss(resolve_weights("gt"), "ivim", tiny.protocol,
                     ParameterNormalisation.from_dict(est.normalisation_))
    idx = data.val_indices
    with torch.no_grad():
        pred = est.network_(torch.as_tensor(tiny.signals)[idx])
        value = loss(pred, {"theta": torch.as_tensor(tiny.theta_true)[idx]})[0]
    assert float(value) == pytest.approx(est.best_val_loss_, rel=1e-5)


def test_training_reduces_the_loss(tiny, fit):
    est = fit(tiny, max_epochs=6, lr=1e-2)
    assert est.history_[-1]["val_loss"] < 0.7 * est.history_[0]["val_loss"]


def test_mle_labels_are_cached_by_fingerprint_and_settings(tmp_path):
    ds = DatasetSpec(n=64, seed=1).generate()
    first = compute_mle_labels(ds, n_starts=1, cache_dir=tmp_path)
    assert not first.from_cache and first.params.shape == (64, 4)
    assert first.dataset_fingerprint == ds.fingerprint
    again = compute_mle_labels(ds, n_starts=1, cache_dir=tmp_path)
    assert again.from_cache and again.key == first.key
    np.testing.assert_array_equal(again.params, first.params)
    # a different setting or dataset gives another cache entry
    other = compute_mle_labels(ds, n_starts=2, cache_dir=tmp_path)
    assert not other.from_cache and other.key != first.key
    ds2 = DatasetSpec(n=64, seed=2).generate()
    assert compute_mle_labels(ds2, n_starts=1, cache_dir=tmp_path).key != first.key
    # a corrupt cache file is recomputed
    (tmp_path / f"{first.key}.npz").write_bytes(b"garbage")
    redo = compute_mle_labels(ds, n_starts=1, cache_dir=tmp_path)
    assert not redo.from_cache
    np.testing.assert_array_equal(redo.params, first.params)
    assert len(list(tmp_path.glob("*.npz"))) == 3


def test_mle_settings_are_checked():
    ds = DatasetSpec(n=8, seed=1).generate()
    with pytest.raises(ValueError, match="sigma"):
        compute_mle_labels(ds, sigma="estimate", cache=False)
    with pytest.raises(ValueError, match="dtype"):
        compute_mle_labels(ds, dtype="float16", cache=False)


def test_training_without_validation_keeps_best_training_epoch(tiny, fit):
    est = fit(tiny, val_fraction=0.0, max_epochs=4, lr=0.3)
    train = [h["train_loss"] for h in est.history_]
    assert est.n_val_ == 0 and len(train) == 4 and "val_loss" not in est.history_[0]
    assert est.best_epoch_ == int(np.argmin(train))
    assert est.best_val_loss_ == pytest.approx(min(train))
