"""The threads benchmark runs end to end at a small size and prints its comparison."""

import re


def test_threads_benchmark_runs_and_prints_the_ratio(load_benchmark, capsys):
    load_benchmark("threads").main(["--voxels", "300", "--repeats", "1", "--busy", "1"])
    out = capsys.readouterr().out
    for row in ("idle, torch default", "idle, auto", "1 busy, torch default", "1 busy, auto"):
        assert re.search(rf"^{re.escape(row)}\s+\d+\s+\d+\.\d+\s+\d+\.\d+x$", out, re.M), row
    assert re.search(r"auto is \d+\.\d+x faster than torch's default", out)
