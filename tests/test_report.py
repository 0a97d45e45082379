"""The run report: what ``harmonia train`` writes at the end of a run, ``harmonia report``, and the page in a
real browser (headless Chromium)."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from harmonia.app.cli import main
from harmonia.app.config import dump_config
from harmonia.app.report import epoch_panels, load_run, write_run_report, write_run_report_safely
from helpers import tiny_experiment

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run with two balancing methods, trained through the command line."""
    root = tmp_path_factory.mktemp("report")
    config = root / "tiny.yaml"
    config.write_text(
        dump_config(tiny_experiment(root / "runs", "train.epochs=2", "balance=[ogm_ge, opm]", "name=run"))
    )
    assert main(["train", str(config), "--quiet"]) == 0
    return root / "runs" / "run"


def _code_block(markdown: str, language: str) -> str:
    return re.search(rf"```{language}\n(.*?)```", markdown, re.S).group(1)  # type: ignore[union-attr]


@pytest.mark.integration
def test_train_writes_a_report_with_metrics_commands_curves_and_config(trained: Path) -> None:
    report = (trained / "report.md").read_text()
    results = json.loads((trained / "results.json").read_text())
    assert report.startswith("# Run `run`")
    for heading in ("## Final metrics", "## Reproduce and resume", "## Curves", "## Method diagnostics"):
        assert heading in report
    assert f"| `test/accuracy` | {results['test']['accuracy']:.4f} |" in report
    assert f"| `probe/audio` | {results['probe']['audio']:.4f} |" in report
    assert "balancing: `ogm_ge`, `opm`" in report
    for figure in ("report_curves.png", "balance_curves.png"):
        assert f"]({figure})" in report
        assert (trained / figure).read_bytes().startswith(PNG)
    assert _code_block(report, "yaml") == (trained / "config.yaml").read_text()
    assert (trained / "index.html").is_file()


@pytest.mark.integration
def test_the_report_commands_resume_and_reproduce_the_run(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(trained.parent.parent)  # the commands name paths relative to the working directory
    write_run_report(trained.relative_to(trained.parent.parent))
    reproduce, resume, extend = _code_block((trained / "report.md").read_text(), "bash").splitlines()
    assert resume == "harmonia train runs/run/config.yaml --resume"
    assert extend == "harmonia train runs/run/config.yaml train.epochs=12 --resume"
    assert reproduce.startswith("harmonia train runs/run/config.yaml name=run_again")
    before = json.loads((trained / "results.json").read_text())
    assert main([*shlex.split(resume)[1:], "--quiet"]) == 0  # finished: evaluates the last checkpoint again
    assert json.loads((trained / "results.json").read_text())["test"] == before["test"]
    assert main([*shlex.split(reproduce)[1:], "--quiet"]) == 0
    again = json.loads((trained.parent / "run_again" / "results.json").read_text())
    assert again["test"] == before["test"] and again["probe"] == before["probe"]  # bitwise, same machine
    assert "report: " in capsys.readouterr().out


@pytest.mark.integration
def test_index_html_is_one_self_contained_page(trained: Path) -> None:
    page = (trained / "index.html").read_text()
    report = (trained / "report.md").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == report.count("![") >= 2  # every figure of report.md, embedded
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)


@pytest.mark.integration
def test_report_command_compares_runs_side_by_side(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    config = (other / "config.yaml").read_text().replace("lr: 0.01", "lr: 0.02")
    (other / "config.yaml").write_text(config)
    out = tmp_path / "compare"
    assert main(["report", str(trained), str(other), "--out", str(out)]) == 0
    assert f"report: {out / 'index.html'}" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "| run | `run` | `other` |" in report
    accuracy = json.loads((trained / "results.json").read_text())["test"]["accuracy"]
    assert f"| `test/accuracy` | {accuracy:.4f} | {accuracy:.4f} |" in report
    assert "| `optim.lr` | `0.01` | `0.02` |" in report
    assert "](report_curves.png)" in report and "](balance_curves.png)" in report
    assert f"[run]({os.path.relpath(trained / 'report.md', out)})" in report  # links that survive a move
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert f'<a href="{os.path.relpath(trained / "index.html", out)}">run</a>' in page  # the page links pages

    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def _write_run(folder: Path, records: list[dict], results: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("name: partial\nout_dir: runs\ndata:\n  modalities: [audio, image]\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_epoch_panels_group_the_logged_values_by_what_they_measure(tmp_path: Path) -> None:
    step = {"kind": "step", "step": 0, "train/loss": 2.0, "train/lr": 0.1}
    records = [
        {**step, "epoch": 0, "balance/pmr/beta/audio": 1.0, "balance/rho/audio": 3.0},
        {**step, "epoch": 0, "balance/pmr/beta/audio": 3.0, "balance/rho/audio": 3.0},
        {**step, "epoch": 1, "balance/pmr/beta/audio": 5.0, "balance/rho/audio": 3.0},
        *(
            {
                "kind": "epoch",
                "step": e,
                "epoch": e,
                "train/loss": 2.0 - e,
                "train/accuracy": 0.1 * e,
                "train/epoch_seconds": 1.0,
                "val/accuracy": 0.2 * e,
                "train/unimodal_accuracy/audio": 0.3,
                "val/unimodal_accuracy/image": 0.4 + e,
                "gate/loss_va": 3.0 - e,
                "gate/loss_va_threshold": 2.5,
                "gate/ln_batch": 4.1,
            }
            for e in range(2)
        ),
    ]
    run = load_run(_write_run(tmp_path / "partial", records))
    evaluation, diagnostic = epoch_panels([run])
    shown = {p.title: {s.label: (s.x, s.y) for s in p.series} for p in evaluation}
    assert shown == {
        "loss": {"train": ([1, 2], [2.0, 1.0])},
        "accuracy": {"train": ([1, 2], [0.0, 0.1]), "val": ([1, 2], [0.0, 0.2])},
        "unimodal accuracy": {"train audio": ([1, 2], [0.3, 0.3]), "val image": ([1, 2], [0.4, 1.4])},
    }
    # gate values that never change are left out; ρ is balance_curves.png's; PMR's β: per-epoch means
    assert {p.title: {s.label: s.y for s in p.series} for p in diagnostic} == {
        "gate/loss va": {"gate/loss_va": [3.0, 2.0]},
        "balance/pmr/beta (step mean)": {"audio": [2.0, 5.0]},
    }


def test_an_unfinished_run_gets_a_report_and_a_broken_one_only_a_warning(tmp_path: Path) -> None:
    records = [
        {"kind": "epoch", "step": e, "epoch": e, "train/loss": 1.0, "test/accuracy": 0.5} for e in (0, 1)
    ]
    folder = _write_run(tmp_path / "partial", records)
    write_run_report(folder)
    report = (folder / "report.md").read_text()
    assert "**not finished** (no `results.json`): 2 of ? epochs logged" in report
    assert "## Last evaluation" in report and "| `test/accuracy` | 0.5000 |" in report

    with pytest.warns(UserWarning, match=r"could not be written \(InputError: .* is not a run folder"):
        assert write_run_report_safely(tmp_path / "nothing") is None


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "headless Chromium not found (Debian: apt-get install chromium; .ci/run installs it when it can): "
        "the report page was not checked in a browser"
    )


def _browser(*args: str) -> subprocess.CompletedProcess[bytes]:
    command = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", *args]
    try:
        done = subprocess.run(command, capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"headless Chromium could not run here ({exc})")
    if done.returncode != 0:
        pytest.skip(f"headless Chromium could not run here (exit {done.returncode}: {done.stderr[-300:]!r})")
    return done


@pytest.mark.integration
def test_chromium_shows_every_figure_of_the_page(trained: Path, tmp_path: Path) -> None:
    """The page as a browser shows it: every <img> decoded (naturalWidth > 0, read back through the DOM by a
    probe script added to a copy of the page), and a screenshot with the figures' coloured lines in it."""
    page = (trained / "index.html").read_text()
    probe = (
        "<script>window.addEventListener('load', () => { const all = [...document.images]; "
        "document.body.dataset.images = all.length + ':' + "
        "all.filter(i => i.complete && i.naturalWidth > 0).length; });</script>"
    )
    copy = tmp_path / "probe.html"
    copy.write_text(page.replace("</body>", probe + "</body>"))
    dom = _browser("--virtual-time-budget=5000", "--dump-dom", copy.as_uri()).stdout.decode()
    figures = page.count("<img ")
    assert f'data-images="{figures}:{figures}"' in dom

    shot = tmp_path / "shot.png"
    _browser("--window-size=1200,2600", f"--screenshot={shot}", (trained / "index.html").as_uri())
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    colourful = (pixels.max(-1) - pixels.min(-1)) > 0.25  # the figures' lines; text and tables are grey
    assert pixels.std() > 0.05 and colourful.mean() > 0.002
