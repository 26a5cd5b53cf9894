"""A quick-look figure of parameter maps (headless, PNG), for checking a fit at a glance."""

from __future__ import annotations

import io as _io
from pathlib import Path

import numpy as np

from qmri_labels.fileio import atomic_write_bytes


def write_qc_figure(path: Path, maps: dict, title: str = "", orthogonal: bool = False,
                    voxel_size=(1.0, 1.0, 1.0)) -> Path:
    """PNG with the middle axial slice of each map (or three orthogonal slices), headless.

    Pixels are drawn with the voxels' aspect ratio; colour limits are the 1st and 99th
    percentiles of the finite, non-zero values.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(maps)
    rows = 3 if orthogonal else 1
    fig = Figure(figsize=(3.0 * len(names), 2.9 * rows + 0.4), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = np.atleast_2d(fig.subplots(rows, len(names), squeeze=False))
    for j, name in enumerate(names):
        volume = np.asarray(maps[name], dtype=np.float32)
        finite = volume[np.isfinite(volume) & (volume != 0)]
        lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        if hi <= lo:
            hi = lo + 1.0
        cx, cy, cz = (s // 2 for s in volume.shape[:3])
        vx, vy, vz = (float(v) for v in voxel_size)
        slices = [(volume[:, :, cz], vy / vx)]
        if orthogonal:
            slices += [(volume[:, cy, :], vz / vx), (volume[cx, :, :], vz / vy)]
        for i, (section, aspect) in enumerate(slices):
            ax = axes[i, j]
            image = ax.imshow(section.T, origin="lower", cmap="gray" if name.lower().startswith(("s0", "field"))
                              else "viridis", vmin=lo, vmax=hi, interpolation="nearest", aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
            fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
