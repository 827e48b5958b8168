"""report.html: one self-contained page per run and per evaluation, checked as headless Chromium renders it."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHECK_SCRIPT = """<script>addEventListener("load", () => {
  const p = document.createElement("pre"); p.id = "tlcli-check";
  p.textContent = JSON.stringify({height: document.documentElement.scrollHeight, images: [...document.images].map(
    i => ({alt: i.alt, width: i.naturalWidth, box: i.parentElement.className}))});
  document.body.appendChild(p);
});</script>"""


def browse(chromium: str, page: Path, work: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a page from disk, with its own profile and console messages on stderr."""
    work.mkdir(parents=True, exist_ok=True)
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
    command += [f"--user-data-dir={work / 'profile'}", "--enable-logging=stderr", "--v=0", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def render(chromium: str, report: Path, work: Path) -> dict:
    """What the browser made of a report: each image's decoded width, the page height, console messages, and a
    full-page screenshot (work/report.png)."""
    checked = work / "checked.html"
    work.mkdir(parents=True, exist_ok=True)
    checked.write_text(report.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dumped = browse(chromium, checked, work, "--dump-dom", "--virtual-time-budget=10000")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    found = re.search(r'<pre id="tlcli-check">(.*?)</pre>', dumped.stdout, re.S)
    assert found, dumped.stdout[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    console = [line for line in dumped.stderr.splitlines() if ":CONSOLE" in line]
    shot = work / "report.png"
    size = f"--window-size=1280,{min(seen['height'], 12000)}"
    taken = browse(chromium, report, work, f"--screenshot={shot}", size)
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    return {**seen, "console": console, "screenshot": shot}


def assert_self_contained(report: Path) -> str:
    """No scripts, nothing fetched: every image is a data: URI, links stay beside the file."""
    text = report.read_text()
    assert "<script" not in text.lower()
    sources = re.findall(r'src="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert not re.search(r'(href|src)="(https?:)?//', text)
    return text


@pytest.fixture(scope="module")
def cats_run(runner, keras_home, shared_data, tmp_path_factory) -> Path:
    """A fresh cats_vs_dogs run at its cheapest: 30 cats and 30 dogs at 64 px, 40% of them held out for test
    (24 photos, so the report has at least 20 to show)."""
    from tlcli.cli.app import app

    root = tmp_path_factory.mktemp("cats-report")
    for kind in ("cat", "dog"):
        (root / "data" / kind).mkdir(parents=True)
        for photo in sorted((shared_data / "cats_vs_dogs" / kind).iterdir())[:30]:
            shutil.copy(photo, root / "data" / kind / photo.name)
    extract = ["extract", root / "data", "--out", root / "f", "--alpha", "0.25", "--size", "64"]
    for args in (
        [*extract, "--split", "0.4,0.2,0.4", "--quiet"],
        ["train-head", root / "f", "--out", root / "runs", "--quiet", "--json"],
    ):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return (root / "runs" / "latest").resolve()


def test_a_fresh_runs_report_shows_curves_matrix_and_photos_in_a_browser(chromium, cats_run, tmp_path, record_property):
    """The run's report as Chromium renders it: every image decodes, no console message, the curves, the matrix
    and 20 photo cards (5 of 24 test photos wrong at 64 px with seed 0, filled with the 15 least sure)."""
    report = cats_run / "report.html"
    text = assert_self_contained(report)
    seen = render(chromium, report, tmp_path)
    assert seen["console"] == []
    assert seen["images"] and all(i["width"] > 0 for i in seen["images"]), seen["images"]
    alts = {i["alt"] for i in seen["images"]}
    assert {"training curves", "confusion matrix"} <= alts
    cards = [i for i in seen["images"] if "photo" in i["box"]]
    wrong = json.loads((cats_run / "misclassified.json").read_text())
    assert len(cards) >= 20 and sum("wrong" in i["box"] for i in cards) == len(wrong)
    assert "mobilenet" in text and "head.dropout" in text and "photos to look at" in text.lower()
    with Image.open(seen["screenshot"]) as shot:
        pixels = np.asarray(shot.convert("L"))
    assert shot.width == 1280 and shot.height >= 1500 and pixels.std() > 20
    record_property("measured", f"report.html {report.stat().st_size / 1e3:.0f} kB; screenshot {seen['screenshot']}")


def test_evaluate_writes_a_report_and_its_json_matches_metrics_json(cli, chromium, cats_run, tmp_path):
    """evaluate --json carries the confusion matrix and top-k under the names metrics.json uses; the report of
    its folder shows any extra figure or JSON found there (calibration, audit suspects) once rebuilt."""
    out = tmp_path / "eval"
    result = cli("evaluate", cats_run, "--out", out, "--json", "--quiet", "--top-k", "1")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    saved = json.loads((out / "metrics.json").read_text())
    assert doc["confusion"] == saved["confusion"] and np.sum(doc["confusion"]) == doc["n"] == 24
    assert doc["top_k"] == 1 and doc["top_k_accuracy"] == doc["accuracy"] == saved["top_k_accuracy"]
    assert Path(doc["report"]) == out / "report.html" and (out / "least_confident.json").is_file()
    shutil.copy(cats_run / "curves.png", out / "reliability.png")
    suspects = [{"path": m["path"], "reason": "looks like the other class"} for m in doc["misclassified"][:3]]
    (out / "audit.json").write_text(json.dumps({"suspects": suspects, "checked": 24}))
    rebuilt = cli("report", out, "--json")
    assert rebuilt.exit_code == 0 and json.loads(rebuilt.stdout)["report"] == str(out / "report.html")
    text = assert_self_contained(out / "report.html")
    assert 'alt="reliability.png"' in text and "looks like the other class" in text and "audit.json" in text
    seen = render(chromium, out / "report.html", tmp_path / "browser")
    assert seen["console"] == [] and all(i["width"] > 0 for i in seen["images"])
    assert sum("photo" in i["box"] for i in seen["images"]) >= 20 + len(suspects)


def test_report_of_a_thousand_photo_evaluation_stays_small(cats_run, shared_data, tmp_path, record_property):
    """Worst case of a 1,002-photo evaluation: 250 mistakes (the 200 most confident shown, no unsure ones then),
    built by the light 'tlcli report' (no TensorFlow, Keras or matplotlib imported). Measured: 1.34 MB."""
    photos = sorted((shared_data / "cats_vs_dogs").glob("*/*.jpg"))
    assert len(photos) >= 1000
    records = [{"path": str(p), "true": p.parent.name, "predicted": "?", "confidence": 0.9} for p in photos]
    out = tmp_path / "eval"
    out.mkdir()
    metrics = json.loads((cats_run / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps({**metrics, "n": len(photos), "run": str(cats_run)}))
    (out / "misclassified.json").write_text(json.dumps(records[:250]))
    (out / "least_confident.json").write_text(json.dumps(records[250:270]))
    shutil.copy(cats_run / "confusion.png", out)
    code = (
        "import sys\nfrom tlcli.cli.app import app\n"
        f"try:\n    app(['report', {str(out)!r}, '--quiet'])\nexcept SystemExit as e:\n    assert e.code in (0, None)\n"
        "print('HEAVY', sorted(m for m in ('tensorflow', 'keras', 'matplotlib') if m in sys.modules), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "HEAVY []" in done.stderr, done.stderr[-2000:]
    size = (out / "report.html").stat().st_size
    assert size < 5e6 and (out / "report.html").read_text().count('class="photo ') == 200
    record_property("measured", f"report of a 1,002-photo evaluation, 200 thumbnails: {size / 1e6:.2f} MB")


def test_report_rebuilds_an_older_run_opens_it_and_refuses_other_folders(cli, colour_run, tmp_path, monkeypatch):
    """A run saved before reports existed gets one when evaluated (linking the evaluation) or by 'tlcli report';
    --open hands it to the browser."""
    import webbrowser

    run = Path(colour_run.copy_runs(tmp_path / "runs")) / "latest"
    for name in ("report.html", "misclassified.json", "least_confident.json"):
        (run / name).unlink(missing_ok=True)
    evaluated = cli("evaluate", run, "--quiet")
    assert evaluated.exit_code == 0 and "report.html" in evaluated.stdout
    assert 'href="evaluations/test/report.html"' in (run / "report.html").read_text(), "evaluate links itself"
    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)
    result = cli("report", run, "--open", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["opened"] and opened == [(run.resolve() / "report.html").as_uri()]
    assert doc["reports"] == [str(run.resolve() / "report.html"), str(run.resolve() / "evaluations/test/report.html")]
    text = (run / "report.html").read_text()
    assert "holds no per-photo predictions" in text and 'href="evaluations/test/report.html"' in text
    refused = cli("report", tmp_path)
    assert refused.exit_code == 2 and "is not a tlcli run" in refused.stderr


def test_shell_completion_is_offered(cli):
    assert "--install-completion" in cli("--help").stdout
