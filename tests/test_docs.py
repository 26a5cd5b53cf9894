"""The docs agree with what the code accepts and writes.

README.md and docs/guide.md name files, figures, columns, manifest keys and command-line flags;
these tests read those names out of the docs and hold them against a tiny label study (run once,
by executing the README's own Python example), a tiny ``qmri-fit`` run and the two commands'
parsers. Every Python block of the README and the guide is executed at a tiny size, with the
user's own data (a scan, signals, a field map) supplied by the test.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import qmri_labels
from qmri_labels.cli import fit as fit_cli
from qmri_labels.cli import study as study_cli
from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec
from qmri_labels.physics import get_model
from qmri_labels.threads import torch_threads

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
GUIDE = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
#: every text that names flags: the docs, the model cards and the two commands' module docstrings
DOCS = {"README.md": README, "docs/guide.md": GUIDE,
        **{f"docs/{n}.md": (ROOT / "docs" / f"{n}.md").read_text(encoding="utf-8")
           for n in ("architecture", "performance", "osipi", "label_ranking")},
        **{str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
           for p in sorted((ROOT / "qmri_labels" / "models").glob("*/MODEL_CARD.md"))},
        "qmri_labels/cli/fit.py": fit_cli.__doc__.replace("``", "`"),
        "qmri_labels/cli/study.py": study_cli.__doc__.replace("``", "`")}
CARDS = [name for name in DOCS if name.endswith("MODEL_CARD.md")]

# ---------------------------------------------------------------------------------------------
# reading the docs


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line, code) of every fenced ```python block, dedented (blocks inside list items)."""
    return [(text[:m.start()].count("\n") + 1, textwrap.dedent(m.group(1)))
            for m in re.finditer(r"^[ \t]*```python\n(.*?)^[ \t]*```", text, re.S | re.M)]


def section(text: str, number: int) -> str:
    """The text of the guide's section ``## <number>. ...`` up to the next ``## `` heading."""
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, re.S | re.M)
    assert match, f"the guide has no section {number}"
    return match.group(0)


def table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row (header and separator rows included)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and line.rstrip().endswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
            rows.append([c.strip().replace("\\|", "|") for c in cells])
    return rows


def spans(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def file_pattern(name: str) -> str:
    """A documented file name as an fnmatch pattern: ``<placeholder>`` and ``*`` match anything."""
    return re.sub(r"<[^>]+>", "*", name)


def row_named(rows: list[list[str]], first_cell: str) -> list[str]:
    found = [r for r in rows if r[0] == first_cell]
    assert found, f"no table row starting with {first_cell}"
    return found[0]


def column_list(cell: str) -> list[str]:
    """The column names of comma-separated code spans, ``coverage_50/90/95`` expanded."""
    names = []
    for span in spans(cell):
        if "," not in span:
            continue
        for name in (n.strip() for n in span.split(",")):
            stem, *more = name.split("/")
            if more:
                base = stem.rsplit("_", 1)[0]
                names += [stem] + [f"{base}_{m}" for m in more]
            else:
                names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# the user's own data for the examples, at a tiny size


def write_scan(folder: Path, shape=(6, 6, 5), s0=1000.0, snr=50.0, seed=0) -> None:
    """``sub-01_dwi.nii.gz`` / ``.bval``: Rician IVIM signals over Epstein's b-values."""
    rng = np.random.default_rng(seed)
    theta = np.stack([rng.uniform(0.8, 1.2, shape) * s0, rng.uniform(0.1, 0.35, shape),
                      rng.uniform(0.0008, 0.002, shape), rng.uniform(0.02, 0.06, shape)], -1)
    clean = get_model("ivim").forward(torch.tensor(theta), torch.tensor(EPSTEIN_BVALUES, dtype=torch.float64))
    sigma = s0 / snr
    noisy = np.hypot(clean.numpy() + sigma * rng.standard_normal(clean.shape), sigma * rng.standard_normal(clean.shape))
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(noisy.astype(np.float32), affine), str(folder / "sub-01_dwi.nii.gz"))
    np.savetxt(folder / "sub-01_dwi.bval", np.asarray(EPSTEIN_BVALUES, float)[None], fmt="%g")
    nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), affine), str(folder / "sub-01_brainmask.nii.gz"))


def user_data(folder: Path) -> dict:
    """What the examples take from the user: a scan (``folder``'s), a mask, signals, a noise level,
    a training set, a field."""
    from qmri_labels.maps import load_dwi

    dwi, bvalues, _ = load_dwi(folder / "sub-01_dwi.nii.gz", folder / "sub-01_dwi.bval")
    sim = DatasetSpec(n=300, snr=30, seed=1).generate()
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(32) - 15.5] * 3, indexing="ij"))
    brain = (grid ** 2).sum(0) < 13 ** 2
    return {"dwi": dwi, "bvalues": bvalues, "mask": np.ones((6, 6, 5), bool),
            "signals": sim.signals, "sigma": float(sim.sigma[0]),
            "signals_n_by_m": sim.signals * 1000.0, "my_signals": sim.signals * 1000.0,
            "train": DatasetSpec(n=600, snr=30, seed=0).generate(),
            "total_field_ppm": (0.01 * rng.standard_normal((32, 32, 32))).astype(np.float32),
            "brain_mask": brain}


#: (pattern, replacement): the examples' sizes, devices and launchers brought down to a test's size
TINY = [(r"n=100_000", "n=600"), (r"max_epochs=\d+", "max_epochs=2"),
        (r"NetworkEstimator\((?![^)]*max_epochs)", "NetworkEstimator(max_epochs=2, "),
        (r"n_members=5", "n_members=2"), (r"devices=4", "devices=1"), (r'accelerator="gpu"', 'accelerator="cpu"'),
        (r'strategy="ddp"', 'strategy="auto"'), (r"n_boot=\d+", "n_boot=5"), (r"repeats=100", "repeats=2")]


def tiny(code: str) -> str:
    for pattern, replacement in TINY:
        code = re.sub(pattern, replacement, code)
    return code


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    write_scan(folder)
    return folder


@pytest.fixture(scope="module")
def readme_study(workdir):
    """The README's Python example, run in a fresh folder: its tiny study is the one these tests
    read (with figures, which the tiny configuration leaves out to save time)."""
    (line, code), = python_blocks(README)
    assert "run_study(" in code
    real = qmri_labels.run_study
    mp = pytest.MonkeyPatch()
    mp.chdir(workdir)
    mp.setattr(qmri_labels, "run_study", lambda *a, **k: real(*a, figures=True, threads=1, **k))
    namespace = user_data(workdir)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    finally:
        mp.undo()
    folder = workdir / "runs" / "smoke"
    assert (folder / "summary.csv").is_file()
    return folder


# ---------------------------------------------------------------------------------------------
# Python examples


def test_readme_example_runs_and_loads_what_it_wrote(readme_study):
    assert qmri_labels.load_results(readme_study).methods[0] == "fit-mle"


@pytest.mark.parametrize("line", [line for line, _ in python_blocks(GUIDE)])
def test_guide_python_examples_run(line, workdir, monkeypatch):
    code = dict(python_blocks(GUIDE))[line]
    monkeypatch.chdir(workdir)
    with torch_threads(1):
        exec(compile(tiny(code), f"docs/guide.md:{line}", "exec"), user_data(workdir))


@pytest.mark.parametrize("card", CARDS)
def test_model_card_examples_run(card):
    for line, code in python_blocks(DOCS[card]):
        exec(compile(code, f"{card}:{line}", "exec"), {})


# ---------------------------------------------------------------------------------------------
# a study's files, columns and figures (guide section 3)


def test_guide_lists_the_files_and_figures_a_study_writes(readme_study):
    rows = table_rows(section(GUIDE, 3))
    named = {n for row in rows for n in spans(" ".join(row))
             if re.fullmatch(r"[\w.<>*/-]+\.(csv|md|json|yaml|png)|[\w.<>*/-]+/", n)}
    figure_row = row_named(rows, "`figures/`")
    figures = [f"figures/{n}" for n in spans(figure_row[1]) if n.endswith(".png") or n.endswith("*")]
    # a folder's row explains what is in it; but every figure must be one the figures row names
    patterns = [file_pattern(n) + ("*" if n.endswith("/") else "") for n in named - {"figures/"} | set(figures)]
    written = sorted(str(p.relative_to(readme_study)) for p in readme_study.rglob("*") if p.is_file())
    unexplained = [w for w in written if not any(fnmatch.fnmatch(w, p) for p in patterns)]
    assert not unexplained, f"the study wrote files the guide does not list: {unexplained}"
    # every unconditional row's files, and every figure but the per-SNR ones, are written
    for row in rows[2:]:
        if row[0].startswith("with "):
            continue
        for name in spans(row[0]):
            pattern = file_pattern(name) + ("*" if name.endswith("/") else "")
            assert any(fnmatch.fnmatch(w, pattern) for w in written), f"the guide lists {name}; not written"
    for figure in figures:
        if "snr-" not in figure:  # one test SNR here
            assert any(fnmatch.fnmatch(w, file_pattern(figure)) for w in written), f"no {figure} written"
    report = (readme_study / "report.md").read_text()
    for link in re.findall(r"\]\((figures/[^)]+)\)", report):
        assert (readme_study / link).is_file(), link


def test_guide_lists_the_columns_of_summary_and_grid(readme_study):
    rows = table_rows(section(GUIDE, 3))
    summary = column_list(row_named(rows, "`summary.csv`")[1])
    assert summary == (readme_study / "summary.csv").read_text().splitlines()[0].split(",")
    params = get_model("ivim").param_names
    grid = []
    for name in column_list(row_named(rows, "`grid.csv`, `grid_spec.json`")[1]):
        grid += [f"true_{p}" for p in params] if name == "true_<parameter>..." else [name]
    assert grid == (readme_study / "grid.csv").read_text().splitlines()[0].split(",")


def test_default_results_folder_is_the_one_the_docs_name():
    from qmri_labels.workflows.run import default_out

    out = default_out("default")
    assert re.fullmatch(r"runs/default-\d{8}-\d{6}", out.as_posix())
    for text in (README, GUIDE, study_cli.__doc__):
        assert "runs/default-<YYYYMMDD-HHMMSS>" in text or "runs/<name>-<YYYYMMDD-HHMMSS>" in text


# ---------------------------------------------------------------------------------------------
# what qmri-fit writes (guide section 9)


@pytest.fixture(scope="module")
def fit_output(workdir):
    out = workdir / "fit_out"
    code = fit_cli.main(["--dwi", str(workdir / "sub-01_dwi.nii.gz"), "--bval", str(workdir / "sub-01_dwi.bval"),
                         "--mask", str(workdir / "sub-01_brainmask.nii.gz"), "--uncertainty", "--threads", "1",
                         "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_guide_lists_the_files_qmri_fit_writes(fit_output):
    rows = table_rows(section(GUIDE, 9))
    named = [n for row in rows[2:] for n in spans(row[0])]
    this_run = ["<prefix>_model-<model>_param-<name>_dwimap.nii.gz", "<prefix>_model-<model>_desc-status_dseg.nii.gz",
                "<prefix>_model-<model>_param-<name>_desc-sd_dwimap.nii.gz", "*.json", "dataset_description.json",
                "<prefix>_qc.png", "manifest.json"]
    assert set(this_run) <= set(named)
    written = sorted(p.name for p in fit_output.iterdir())
    for name in this_run:
        assert any(fnmatch.fnmatch(w, file_pattern(name)) for w in written), name
    unexplained = [w for w in written if not any(fnmatch.fnmatch(w, file_pattern(n)) for n in named)]
    assert not unexplained, f"qmri-fit wrote files the guide does not list: {unexplained}"


def _keys(record) -> set[str]:
    if isinstance(record, dict):
        return set(record) | {k for v in record.values() for k in _keys(v)}
    if isinstance(record, list):
        return {k for v in record for k in _keys(v)}
    return set()


def test_guide_names_the_manifest_and_sidecar_keys_qmri_fit_writes(fit_output):
    rows = table_rows(section(GUIDE, 9))
    manifest = json.loads((fit_output / "manifest.json").read_text())
    # QSM's timing and the cohort's record are not in a single diffusion scan's manifest
    other_runs = {"inversion", "cohort"}
    named = {s for s in spans(row_named(rows, "`manifest.json`")[1]) if re.fullmatch(r"\w+", s)} - other_runs
    assert named - _keys(manifest) == set()
    sidecar = json.loads((fit_output / "sub-01_model-ivim_param-f_dwimap.json").read_text())
    sidecar_row = row_named(rows, "`*.json` beside every NIfTI")[1]
    assert {s for s in spans(sidecar_row) if re.fullmatch(r"[A-Z]\w+", s)} - set(sidecar) == set()
    sd_sidecar = json.loads((fit_output / "sub-01_model-ivim_param-f_desc-sd_dwimap.json").read_text())
    sd_row = row_named(rows, "`<prefix>_model-<model>_param-<name>_desc-sd_dwimap.nii.gz`")[1]
    assert {s for s in spans(sd_row) if re.fullmatch(r"[A-Z]\w+", s)} - set(sd_sidecar) == set()


# ---------------------------------------------------------------------------------------------
# flags


def _options(parser) -> dict[str, object]:
    return {s: a for a in parser._actions for s in a.option_strings}


FIT = _options(fit_cli.build_parser())
STUDY = _options(study_cli.build_parser())


def _flags_in_source(path: Path) -> set[str]:
    """The ``--flags`` an argparse script defines (read from its source: benchmarks are not imported)."""
    return set(re.findall(r"""add_argument\(\s*["'](--[\w-]+)""", path.read_text(encoding="utf-8")))


#: other programs the docs give command lines for, and their flags
PROGRAMS = {f"benchmarks/{p.name}": _flags_in_source(p) for p in (ROOT / "benchmarks").glob("*.py")}
PROGRAMS["qmri_labels.workflows.qsm"] = _flags_in_source(ROOT / "qmri_labels" / "workflows" / "qsm" / "model.py")
#: launchers and schedulers whose flags are theirs, not ours
FOREIGN = ("torchrun", "srun", "#SBATCH", "pip ", "pytest", "bash benchmarks/gpu_check.sh")
#: a SLURM job's options, named on their own where the guide says how to launch on several nodes
SCHEDULER_FLAGS = {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--array"}


def command_spans(text: str) -> list[str]:
    """Code spans and the lines of code blocks (a line ending in ``\\`` joined to the next)."""
    blocks = re.findall(r"```\w*\n(.*?)```", text, re.S)
    inline = spans(re.sub(r"```\w*\n.*?```", "", text, flags=re.S))
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [s.replace("\\|", "|") for s in inline + lines]


def flags_of(span: str) -> list[tuple[str, str | None]]:
    """(flag, the value written after it or None) for every ``--flag`` in a span."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"(?<![\w-])(--[a-z][\w-]*)(?:(?=[ =]([^\s`]+)))?", span)]


def check_value(flag: str, value: str | None, options: dict) -> str | None:
    """A problem with ``flag value`` for a parser's option with choices, or None."""
    choices = getattr(options[flag], "choices", None)
    if not choices or value is None or value.startswith(("-", "$", "<")) or value.isupper():
        return None
    bad = [v for v in value.split("|") if v not in choices]
    return f"{flag} {value}: {bad} not among {sorted(choices)}" if bad else None


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_flags_named_in_the_docs_exist(doc):
    problems = []
    known = set(FIT) | set(STUDY) | set().union(*PROGRAMS.values()) | SCHEDULER_FLAGS
    for span in command_spans(DOCS[doc]):
        if any(f in span for f in FOREIGN):
            continue
        program = [p for p in PROGRAMS if p in span]
        if program:
            parsers = [{f: None for f in PROGRAMS[program[0]]}]
        elif re.search(r"qmri-fit|qmri_labels\.fit\b", span):
            parsers = [FIT]
        elif re.search(r"qmri-study|qmri_labels\.study\b", span):
            parsers = [STUDY]
        else:
            parsers = None
        for flag, value in flags_of(span):
            if parsers is None:
                if flag not in known:
                    problems.append(f"{flag} (in `{span}`) is no flag of the commands or of a benchmark")
            elif flag not in parsers[0]:
                problems.append(f"{flag} (in `{span}`) is not a flag of that command")
            elif parsers[0] in (FIT, STUDY):
                problems.append(check_value(flag, value, parsers[0]))
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)


@pytest.mark.parametrize("number, options", [(2, STUDY), (4, FIT), (7, FIT)])
def test_option_tables_of_the_guide_name_that_commands_flags(number, options):
    rows = [r for r in table_rows(section(GUIDE, number)) if r[0].startswith("`--")]
    assert rows
    problems = []
    for row in rows:
        for span in spans(row[0]):
            for flag, value in flags_of(span):
                if flag not in options:
                    problems.append(f"section {number}: {flag} is not a flag of that command")
                else:
                    problems.append(check_value(flag, value, options))
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)


@pytest.mark.parametrize("name, options", [("qmri-fit", FIT), ("qmri-study", STUDY)])
def test_every_flag_of_the_commands_is_in_the_guide(name, options):
    missing = [f for f in options if f.startswith("--") and f != "--help"
               and not re.search(re.escape(f) + r"(?![\w-])", GUIDE)]
    assert not missing, f"{name} flags the guide does not mention: {missing}"


def test_threads_is_described_where_cpu_use_is():
    assert "--threads N|auto" in README and "threads=" in README
    assert "--threads N\\|auto" in section(GUIDE, 2) and "--threads N\\|auto" in section(GUIDE, 4)
    assert "benchmarks/threads.py" in README and "benchmarks/threads.py" in GUIDE


# ---------------------------------------------------------------------------------------------
# install, paths and names


def test_install_instructions_agree():
    def install_lines(text):
        block = re.search(r"```bash\n(pip install .*?)```", text, re.S).group(1)
        return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("pip ")]

    readme, guide = install_lines(README), install_lines(GUIDE)
    assert readme == guide
    ci = (ROOT / ".ci" / "run").read_text()
    torch_pin = next(line for line in readme if "torch" in line)
    assert f"python -m {torch_pin}" in ci
    assert 'python -m pip install -e ".[dev]"' in ci and 'pip install -e ".[dev]"' in readme
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"^dev = \[", pyproject, re.M)
    python = re.search(r'requires-python = ">=(\d+\.\d+)"', pyproject).group(1)
    assert f"Python >= {python}" in README and f"Python {python} or newer" in GUIDE


@pytest.mark.parametrize("doc", [d for d in DOCS if d.endswith(".md") and d not in CARDS])
def test_paths_and_names_in_the_docs_exist(doc):
    text = DOCS[doc]
    missing = []
    for path in set(re.findall(r"(?<![\w/.])((?:tests|benchmarks|docs|\.ci)/[\w./-]+\.(?:py|sh|md|ipynb))", text)):
        if not (ROOT / path).exists():
            missing.append(path)
    for path, name in set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", text)):
        if (ROOT / path).exists() and f"def {name}(" not in (ROOT / path).read_text():
            missing.append(f"{path}::{name}")
    for dotted in set(re.findall(r"\bqmri_labels(?:\.\w+)+", text)):
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                continue
        for part in parts[i:]:
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(dotted)
    assert not missing, f"{doc} names what does not exist: {sorted(missing)}"
