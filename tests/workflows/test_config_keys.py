"""A configuration key the code does not read is an error naming it (and the known keys), in
every workflow; one merge (fileio.deep_merge) combines configurations, recursively."""

import pytest

from qmri_labels.cli import study
from qmri_labels.fileio import deep_merge
from qmri_labels.workflows.common import merge_config
from qmri_labels.workflows.registry import WORKFLOWS


def args(*argv):
    return study.build_parser().parse_args(list(argv))


def test_merge_is_recursive_and_strict_at_every_level():
    defaults = {"a": {"b": {"c": 1, "d": 2}, "e": 3}, "prior": None, "free": {"x": 1}, "empty": {}}
    merged = merge_config(defaults, {"a": {"b": {"c": 5}}})
    assert merged["a"] == {"b": {"c": 5, "d": 2}, "e": 3}  # nested values keep their other keys
    assert deep_merge(defaults, {"a": {"b": {"c": 5}}}) == merged  # one merge, one answer
    with pytest.raises(ValueError, match=r"unknown configuration key 'a\.b\.typo' in 'a\.b'; known: c, d"):
        merge_config(defaults, {"a": {"b": {"typo": 1}}})
    with pytest.raises(ValueError, match=r"'snr_db'.*known: a, empty, free, prior"):
        merge_config(defaults, {"snr_db": 30})
    # None and empty defaults take any value whole; free paths are left to their consumer
    assert merge_config(defaults, {"prior": {"kind": "uniform"}})["prior"] == {"kind": "uniform"}
    assert merge_config(defaults, {"empty": {"anything": 1}})["empty"] == {"anything": 1}
    assert merge_config(defaults, {"free": {"y": 2}}, free=("free",))["free"] == {"x": 1, "y": 2}
    with pytest.raises(ValueError, match="free.y"):
        merge_config(defaults, {"free": {"y": 2}})
    assert merge_config(defaults, {"name": "n", "description": "d"})["name"] == "n"


@pytest.mark.parametrize("option", ["mle.probe_iter=4", "mle.max_iter=10", "grid.point_per_axis=3", "bogus=1"])
def test_study_cli_refuses_keys_nobody_reads(option):
    key = option.split("=")[0]
    with pytest.raises(ValueError, match=rf"'{key}'.*known: "):
        study.resolve(args("--config", "tiny_ivim", "--set", option))


def test_mle_options_reach_the_fitter():
    from qmri_labels.workflows.ivim import make_estimators

    bounds = [[0.0, 0.0, 0.0, 0.003], [2.0, 1.0, 0.004, 0.2]]
    _, cfg, workflow, _ = study.resolve(args("--config", "tiny_ivim", "--set", "mle.n_starts=3",
                                             "--set", f"mle.bounds={bounds}"))
    cfg = workflow.check(cfg)
    assert cfg["mle"] == {"sigma": "known", "n_starts": 3, "bounds": bounds}
    for estimator in make_estimators(cfg).values():
        assert estimator.mle_options == cfg["mle"]


@pytest.mark.parametrize("kind", sorted(WORKFLOWS))
def test_every_workflow_refuses_unknown_keys(kind, tmp_path):
    module = WORKFLOWS[kind].module
    defaults = WORKFLOWS[kind].defaults
    with pytest.raises(ValueError, match=r"unknown configuration key 'colour'.*known: "):
        module.run({"kind": kind, "colour": "red"}, tmp_path / kind, quiet=True)
    with pytest.raises(ValueError, match="'colour'"):
        study.resolve(args("--config", _config_of(kind, tmp_path), "--set", "colour=red"))
    # a nested mapping the workflow reads key by key is checked too
    for key, value in defaults.items():
        if isinstance(value, dict) and value and key not in WORKFLOWS[kind].free_form_keys:
            with pytest.raises(ValueError, match=rf"'{key}\.colour'"):
                module.run({"kind": kind, key: {"colour": "red"}}, tmp_path / kind, quiet=True)
    assert not any(tmp_path.glob(f"{kind}/*"))  # refused before any work


def _config_of(kind, tmp_path):
    path = tmp_path / f"{kind}.yaml"
    path.write_text(f"kind: {kind}\n")
    return str(path)
