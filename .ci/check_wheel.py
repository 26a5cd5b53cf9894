"""CI check: the package works when installed from its wheel, outside the checkout.

1. builds the wheel (``pip wheel . --no-deps``) and checks that it holds every shipped model
   bundle and named study of the checkout, the licence and the console scripts;
2. installs it into a fresh virtual environment (``--system-site-packages``, so torch and the
   other dependencies are reused; the package itself must come from the wheel, which is
   verified through ``qmri_labels.__file__``);
3. from a temporary folder outside the checkout: ``qmri-study --list`` shows every named study,
   every shipped bundle loads, and ``qmri-fit`` maps a generated IVIM DWI that has one b = 0
   volume and no background with ``--sigma auto`` (Rician MLE, noise from MP-PCA).

Run: ``python .ci/check_wheel.py`` (``--no-build-isolation`` to build with the installed
setuptools, e.g. offline). Exits non-zero with a message on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GENERATE = r"""
import sys
import nibabel as nib
import numpy as np
import torch
from qmri_labels.physics import get_model

rng = np.random.default_rng(0)
bvals = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 600, 800, 1000.0])   # one b = 0 volume
shape = (12, 12, 8)                                                          # tissue everywhere
theta = np.stack([rng.uniform(800, 1200, shape), rng.uniform(0.1, 0.3, shape),
                  rng.uniform(0.0008, 0.002, shape), rng.uniform(0.02, 0.08, shape)], -1)
clean = get_model("ivim").forward(torch.tensor(theta), torch.tensor(bvals)).numpy()
sigma = 25.0
noisy = np.hypot(clean + sigma * rng.standard_normal(clean.shape), sigma * rng.standard_normal(clean.shape))
nib.save(nib.Nifti1Image(noisy.astype(np.float32), np.eye(4)), "sub-01_dwi.nii.gz")
np.savetxt("sub-01_dwi.bval", bvals[None], fmt="%g")
np.save("truth.npy", theta)
"""

LOAD_BUNDLES = r"""
import json, sys
import qmri_labels
from qmri_labels.estimators import load
from qmri_labels.paths import models_dir

loaded = {}
for folder in sorted(p for p in models_dir().iterdir() if p.is_dir()):
    estimator = load(folder)
    loaded[folder.name] = type(estimator).__name__
print(json.dumps({"package": qmri_labels.__file__, "models_dir": str(models_dir()), "loaded": loaded}))
"""


def fail(message: str) -> None:
    print(f"check_wheel: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def run(command, cwd, env=None, timeout=600) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        fail(f"{' '.join(map(str, command))} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-build-isolation", action="store_true", help="build with the installed setuptools")
    args = parser.parse_args()
    started = time.perf_counter()
    studies = sorted(p.stem for p in (ROOT / "qmri_labels" / "studies").glob("*.yaml"))
    models = sorted(p.name for p in (ROOT / "qmri_labels" / "models").iterdir() if (p / "manifest.json").exists())
    if not studies or not models:
        fail(f"the checkout has studies {studies} and models {models}; expected some of each")

    with tempfile.TemporaryDirectory(prefix="qmri-wheel-") as tmp:
        tmp = Path(tmp)
        # 1. the wheel and what it holds, built from a clean copy of the source tree (a stale
        # build/ folder in the checkout could otherwise leak deleted modules into the wheel)
        source = tmp / "source"
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "runs", "__pycache__", ".pytest_cache", ".benchmarks", ".cache"))
        build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", tmp / "dist", "-q"]
        if args.no_build_isolation:
            build.append("--no-build-isolation")
        run(build, cwd=tmp)
        wheels = list((tmp / "dist").glob("qmri_labels-*.whl"))
        if len(wheels) != 1:
            fail(f"expected one wheel, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as archive:
            names = set(archive.namelist())
            entry_points = next((archive.read(n).decode() for n in names if n.endswith("entry_points.txt")), "")
        for study in studies:
            if f"qmri_labels/studies/{study}.yaml" not in names:
                fail(f"the wheel lacks the named study {study}")
        for model in models:
            for file in ("manifest.json", "weights.safetensors", "MODEL_CARD.md"):
                if f"qmri_labels/models/{model}/{file}" not in names:
                    fail(f"the wheel lacks qmri_labels/models/{model}/{file}")
        if not any(n.endswith("LICENSE") for n in names):
            fail("the wheel carries no LICENSE file")
        for script in ("qmri-study = qmri_labels.cli.study:main", "qmri-fit = qmri_labels.cli.fit:main"):
            if script not in entry_points:
                fail(f"the wheel's entry points lack '{script}'")

        # 2. a fresh environment with the package from the wheel only
        venv = tmp / "venv"
        run([sys.executable, "-m", "venv", "--system-site-packages", venv], cwd=tmp)
        python, bindir = venv / "bin" / "python", venv / "bin"
        run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheels[0]], cwd=tmp)
        outside = tmp / "elsewhere"
        outside.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QMRI_LABELS_MODELS",
                                                                 "QMRI_LABELS_STUDIES")}
        env.update(MPLBACKEND="Agg", QMRI_LABELS_CACHE=str(tmp / "cache"), PATH=f"{bindir}{os.pathsep}{env['PATH']}")

        # 3a. every named study is listed
        listing = run([bindir / "qmri-study", "--list"], cwd=outside, env=env)
        listed = {line.split()[0] for line in listing.splitlines() if line.strip()}
        missing = sorted(set(studies) - listed)
        if missing:
            fail(f"qmri-study --list misses {missing}; it printed:\n{listing}")

        # 3b. every shipped bundle loads, from the installed package
        report = json.loads(run([python, "-c", LOAD_BUNDLES], cwd=outside, env=env).strip().splitlines()[-1])
        if not Path(report["package"]).resolve().is_relative_to(venv.resolve()):
            fail(f"qmri_labels was imported from {report['package']}, not from the wheel in {venv}")
        if sorted(report["loaded"]) != models:
            fail(f"loaded bundles {sorted(report['loaded'])}, the checkout ships {models}")

        # 3c. qmri-fit: one b = 0 volume, no background, --sigma auto (Rician MLE)
        run([python, "-c", GENERATE], cwd=outside, env=env)
        run([bindir / "qmri-fit", "--dwi", "sub-01_dwi.nii.gz", "--bval", "sub-01_dwi.bval", "--sigma", "auto",
             "--out", "maps", "--quiet"], cwd=outside, env=env)
        manifest = json.loads((outside / "maps" / "manifest.json").read_text())
        noise = manifest["noise"]
        if noise.get("model") != "rician" or noise.get("method") != "mppca":
            fail(f"expected a Rician fit with the MP-PCA noise estimate, got {noise}")
        if not abs(noise["value"] - 25.0) < 0.15 * 25.0:
            fail(f"--sigma auto gave {noise['value']:.2f}, the data were made with sigma 25")
        check = (
            "import json, nibabel as nib, numpy as np; t = np.load('truth.npy'); "
            "d = np.asarray(nib.load('maps/sub-01_model-ivim_param-D_dwimap.nii.gz').dataobj); "
            "print(json.dumps(float(np.median(np.abs(d - t[..., 2]) / t[..., 2]))))"
        )
        error = json.loads(run([python, "-c", check], cwd=outside, env=env).strip().splitlines()[-1])
        if not error < 0.1:
            fail(f"qmri-fit's D map is off by a median {error:.1%} (expected < 10 % at SNR 40)")
        if manifest["voxels"]["estimated"] != 12 * 12 * 8:
            fail(f"qmri-fit estimated {manifest['voxels']['estimated']} of {12 * 12 * 8} voxels")

    print(f"check_wheel: ok: wheel with {len(studies)} studies and {len(models)} bundles; from outside the "
          f"checkout --list shows them all, every bundle loads, qmri-fit --sigma auto used MP-PCA "
          f"(sigma {noise['value']:.2f} for 25) and D is within {error:.1%}; {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
