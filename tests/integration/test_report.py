"""Integration: `peftopt report` over two runs of different LoRA rank, and over an experiments log."""
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def cli(*args):
    return run_cli(*args, timeout=600)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def pixels_of(path: Path, color: str) -> int:
    """How many pixels of a PNG are drawn in one matplotlib colour (antialiased edges excluded)."""
    import matplotlib.image
    import numpy as np
    from matplotlib.colors import to_rgb

    image = matplotlib.image.imread(path)[..., :3]
    return int((np.abs(image - np.array(to_rgb(color))).max(axis=-1) < 0.02).sum())


def test_report_over_two_ranks(tmp_path, make_spec):
    evaluate = {"prompts": ["Tell me one thing about rain.", "Translate to Swedish: Good morning."],
                "max_new_tokens": 8, "targets": ["base", "adapter"]}
    for name, rank in (("rank4", 4), ("rank16", 16)):
        spec = make_spec(name, lora={"r": rank, "alpha": rank}, train={"max_steps": 4}, evaluate=evaluate)
        result = cli("run", str(spec))
        assert result.returncode == 0, result.stderr[-2000:]
    runs = tmp_path / "runs"
    out = tmp_path / "report"
    result = cli("report", str(runs / "rank4"), str(runs / "rank16"), "--out", str(out), "--baseline", "rank4")
    assert result.returncode == 0, result.stderr
    md = (out / "report.md").read_text()
    table = [line for line in md.split("## Plots")[0].splitlines() if line.startswith("| rank")]
    assert len(table) == 2 and "(baseline)" in table[0] and "| 16 |" in table[1] and "%" in table[1]
    assert "Tell me one thing about rain." in md and "rank16 / adapter" in md and "rank4 / base" in md
    html = (out / "report.html").read_text()
    assert "<table>" in html and 'src="plots/loss.png"' in html
    assert not (out / "plots" / "runtime_memory.png").exists()  # a CPU run has no GPU memory to chart
    for plot in ("loss.png", "checks.png", "runtime.png"):
        width, height = png_size(out / "plots" / plot)
        assert width > 300 and height > 200
    # What each plot draws, by its colours: a line per run, a bar series per run and target (at least its legend
    # patch, a pass rate can be 0), and the runtime bars (the longer run's bar is the axis's full height).
    plots = out / "plots"
    assert all(pixels_of(plots / "loss.png", c) > 200 for c in ("tab:blue", "tab:orange"))
    assert all(pixels_of(plots / "checks.png", c) > 30 for c in ("tab:blue", "tab:orange", "tab:green", "tab:red"))
    assert pixels_of(plots / "runtime.png", "tab:blue") > 5_000

    log = cli("report", "--log", str(runs / "experiments_log.csv"), "--out", str(tmp_path / "from-log"))
    assert log.returncode == 0, log.stderr
    log_md = (tmp_path / "from-log" / "report.md").read_text()
    assert "| rank4 (baseline) | 4 |" in log_md and "| rank16 | 16 |" in log_md


def test_report_refuses_a_non_run_directory(tmp_path):
    result = cli("report", str(tmp_path))
    assert result.returncode == 2 and "not a run directory" in result.stderr


def test_report_of_a_two_variant_sweep_shows_them_side_by_side(tmp_path, make_spec):
    """A sweep (matrix) of plain LoRA against rsLoRA, both variants run as array tasks, then one report."""
    import json

    spec = make_spec("sweep", train={"max_steps": 4},
                     evaluate={"prompts": ["Say hello.", "Translate to Swedish: Good night."], "max_new_tokens": 6,
                               "targets": ["adapter"]})
    data = json.loads(spec.read_text())
    data["matrix"] = [{"name": "plain"}, {"name": "rslora", "lora.use_rslora": True}]
    spec.write_text(json.dumps(data))
    for index in (0, 1):
        result = run_cli("run", spec, timeout=600, env={"JOB_COMPLETION_INDEX": str(index)})
        assert result.returncode == 0, result.stderr[-2000:]
    runs, out = tmp_path / "runs", tmp_path / "sweep-report"
    result = cli("report", str(runs / "plain"), str(runs / "rslora"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    md = (out / "report.md").read_text()
    rows = [line for line in md.split("## Plots")[0].splitlines() if line.startswith(("| plain", "| rslora"))]
    assert len(rows) == 2 and "(baseline)" in rows[0]
    assert "plain / adapter" in md and "rslora / adapter" in md and "Good night." in md
    for plot in ("loss.png", "checks.png"):
        assert png_size(out / "plots" / plot)[0] > 300
