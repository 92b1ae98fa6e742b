"""`nanguard report RUN_DIR`: one self-contained, well-formed HTML file from whatever the run folder holds."""

from __future__ import annotations

import json
import os
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nanguard.cli import main
from nanguard.errors import UserError
from nanguard.report.html import MARKER, build_report, write_report
from nanguard.report.svg import WIDTH, Marker, Series, choose_log, format_number, line_chart

SVG = "{http://www.w3.org/2000/svg}"
EVIL = "<script>alert('x')</script>"

CONFIG = """\
train:
  log_every: 10
  steps: 200
guard:
  spike_window: 50
  spike_min_ratio: 3.0
"""


def metric(step: int, total: float | str, grad: float | str = 2.0, **extra) -> dict:
    return {"step": step, "loss_box_reg": 0.3, "loss_classifier": 0.5, "loss_objectness": 0.1,
            "loss_rpn_box_reg": 0.02, "total_loss": total, "lr": 0.01, "grad_norm": grad,
            "images_per_second": 12.5, "applied": True, **extra}


INCIDENTS = [
    {"step": 40, "kind": "nonfinite_loss", "kinds": ["nonfinite_loss", "nonfinite_grad"], "components": ["loss_box_reg"],
     "values": {"total_loss": "nan"}, "image_ids": [11, 12], "annotation_ids": [101], "lr": 0.01, "lr_factor": 1.0,
     "action": "skip", "reason": "non-finite loss " + EVIL, "verdict": None, "quarantined": [], "rollback_to_step": None,
     "restored_step": None, "batch": {"epoch": 0, "position": 40}, "invalid_targets": [], "model_error": None,
     "applied": False, "rank": 0,
     "diagnosis": {"verdict": "bad_annotation", "reproduced": True, "phase": "forward", "first_op": "aten::log",
                   "module": "roi_heads.box_coder", "loss_component": "loss_box_reg", "image_ids": [12],
                   "annotation_ids": [101], "evidence": ["box 101 has width 0"],
                   "advice": "Drop annotation 101 & run nanguard audit --fix", "seconds": 0.8}},
    {"step": 90, "kind": "grad_spike", "kinds": ["grad_spike"], "components": [], "values": {}, "image_ids": [3],
     "annotation_ids": [], "lr": 0.01, "lr_factor": 0.5, "action": "rollback", "reason": "3 bad steps in a row",
     "verdict": None, "quarantined": [], "rollback_to_step": 50, "restored_step": 50, "batch": None,
     "invalid_targets": [], "model_error": None, "applied": False, "rank": 0, "diagnosis": None},
    {"step": 120, "kind": "loss_spike", "kinds": ["loss_spike"], "components": [], "values": {}, "image_ids": [],
     "annotation_ids": [], "lr": 0.01, "lr_factor": 0.5, "action": "lr_backoff", "reason": "spikes: halve the LR",
     "verdict": None, "quarantined": [], "rollback_to_step": None, "restored_step": None, "batch": None,
     "invalid_targets": [], "model_error": None, "applied": True, "rank": 0},
]

FINAL = {"status": "completed", "steps": 200, "train_seconds": 61.5, "images_per_second": 13.0, "skipped_steps": 2,
         "rollbacks": 1, "incidents": 3, "incidents_by_kind": {"grad_spike": 1, "loss_spike": 1, "nonfinite_loss": 1},
         "actions": {"lr_backoff": 1, "rollback": 1, "skip": 1}, "quarantined": [], "stopped": False, "verdict": None,
         "injections": 0, "weights_finite": True, "mAP": 0.6512, "mAP50": 0.9234}

AUDIT = {"file": "ann.json", "summary": {"images": 40, "annotations": 120, "errors": 1, "warnings": 0, "info": 0,
                                         "by_check": {"zero_width": 1, "nan_coord": 0, "tiny_box": 0}},
         "findings": [{"check": "zero_width", "severity": "error", "image_id": 12, "annotation_id": 101,
                       "message": "width 0", "fix": "annotation dropped"}]}


def write_lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def run(tmp_path) -> Path:
    folder = tmp_path / "run-a"
    folder.mkdir()
    (folder / "config.yaml").write_text(CONFIG)
    metrics = [metric(step, 1.0 / (1 + step / 50)) for step in range(0, 200, 10)]
    metrics[4] = metric(40, "nan", "inf", applied=False)
    metrics[9] = metric(90, 0.9, 400.0, applied=False)
    write_lines(folder / "metrics.jsonl", metrics)
    with open(folder / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 200, "total_lo')  # a torn last line: the run was killed mid-append
    write_lines(folder / "incidents.jsonl", INCIDENTS)
    (folder / "audit.json").write_text(json.dumps(AUDIT))
    (folder / "final.json").write_text(json.dumps(FINAL))
    return folder


def svgs(html: str) -> list[ET.Element]:
    return [element for element in ET.fromstring(html.split(MARKER, 1)[1]).iter() if element.tag == SVG + "svg"]


def test_report_is_written_and_well_formed(run):
    assert main(["report", str(run), "--quiet"]) == 0
    html = (run / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and MARKER in html
    charts = svgs(html)  # the whole page parses as XML, SVG included
    assert len(charts) == html.count("<svg") == 4  # loss, gradient norm, LR, skipped steps (no loss scale logged)
    assert all(chart.get("viewBox") for chart in charts)
    for forbidden in ("<script", "http://", "https://", "<link", "@import", "url("):
        assert forbidden not in html.replace("http://www.w3.org/2000/svg", "")


def test_incidents_diagnosis_and_escaping(run):
    html = build_report(run)
    for step in (">40<", ">90<", ">120<"):
        assert step in html
    assert "bad_annotation" in html and "roi_heads.box_coder" in html and "aten::log" in html
    assert "Drop annotation 101 &amp; run nanguard audit --fix" in html
    assert EVIL not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "restored state after step 50" in html
    with_big_id = _report_with_image_id(run, 139077)
    assert "images: 139077" in with_big_id and "139,077" not in with_big_id  # an id as written
    assert "0.651" in html and "0.923" in html  # mAP, mAP50 in the header


def _report_with_image_id(run: Path, image_id: int) -> str:
    write_lines(run / "incidents.jsonl", [{**INCIDENTS[1], "image_ids": [image_id]}])
    return build_report(run)


def test_nonfinite_values_are_drawn_at_the_edge(run):
    html = build_report(run)
    loss_chart = ET.tostring(svgs(html)[0], encoding="unicode")
    assert ">NaN<" in loss_chart
    grad_chart = ET.tostring(svgs(html)[1], encoding="unicode")
    assert ">Inf<" in grad_chart and "spike ratio" in grad_chart  # the band from guard.spike_min_ratio
    assert "nan" not in "".join(e.get("d", "") + e.get("points", "") for e in svgs(html)[0].iter()).lower()


def test_audit_shows_only_nonzero_checks_and_totals(run):
    html = build_report(run)
    assert "zero_width" in html and "nan_coord" not in html and "tiny_box" not in html
    assert "annotations" in html and ">120<" in html


def test_torn_line_is_reported(run):
    assert "metrics.jsonl: 1 of 21 lines could not be read" in build_report(run)


def test_missing_files_are_named_not_fatal(tmp_path):
    folder = tmp_path / "young"
    folder.mkdir()
    (folder / "config.yaml").write_text("train: {log_every: 20}\n")
    assert main(["report", str(folder), "--quiet"]) == 0
    html = (folder / "report.html").read_text()
    for missing in ("metrics.jsonl is missing", "audit.json is missing", "final.json is missing"):
        assert missing in html
    assert "nothing to plot" in html
    ET.fromstring(html.split(MARKER, 1)[1])


def test_torn_json_and_partial_metrics(tmp_path):
    folder = tmp_path / "torn"
    folder.mkdir()
    (folder / "config.yaml").write_text(": not yaml : [\n")
    (folder / "final.json").write_text('{"status": "compl')
    write_lines(folder / "metrics.jsonl", [{"step": 0, "total_loss": None, "loss_x": "inf"}, {"step": 5, "lr": "text"}])
    html = build_report(folder)
    assert "final.json could not be read" in html and "config.yaml could not be read" in html
    assert len(svgs(html)) == 4


def test_foreign_report_is_not_overwritten(run, capsys):
    (run / "report.html").write_text("<html>my own notes</html>")
    assert main(["report", str(run)]) == 2
    assert "not written by nanguard" in capsys.readouterr().err
    assert (run / "report.html").read_text() == "<html>my own notes</html>"


def test_own_report_is_replaced(run, capsys):
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    (run / "final.json").write_text(json.dumps({**FINAL, "status": "stopped", "stopped": True,
                                                "verdict": "lr_divergence: lower train.lr"}))
    assert write_report(run) == run / "report.html"
    assert "lr_divergence: lower train.lr" in (run / "report.html").read_text()


@pytest.mark.parametrize("make", ["missing", "file", "no_config"])
def test_not_a_run_exits_2(tmp_path, capsys, make):
    target = tmp_path / "x"
    if make == "file":
        target.write_text("hi")
    elif make == "no_config":
        target.mkdir()
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(target) in err and "nanguard train --out" in err and "\n" not in err
    with pytest.raises(UserError):
        build_report(target)
    assert not (tmp_path / "x" / "report.html").exists()


def test_chart_scales_and_labels():
    assert choose_log([0.001, 0.5, 2.0]) and not choose_log([0.1, 0.5, 2.0]) and not choose_log([-1.0, 1000.0])
    assert [format_number(v) for v in (0, 0.30000000000000004, 2.5e-05, 1e6)] == ["0", "0.3", "2.5e-5", "1e6"]
    decay = [(float(i), 10.0 ** (-i / 10)) for i in range(40)] + [(40.0, math.inf)]
    chart = line_chart([Series("a <b>", decay, "#000")], markers=[Marker(5, "#f00", "skip", "step 5")], label="t")
    assert "(log)" in chart and ">Inf<" in chart and "a &lt;b&gt;" in chart and ET.fromstring(chart).get("viewBox")

    def highest(spike: float) -> tuple[float, int]:  # the topmost pixel of the line, and its segments
        flat = [(float(i), spike if i == 12_345 else 1.0) for i in range(30_000)]
        root = ET.fromstring(line_chart([Series("flat", flat, "#000")], log_y=False))
        path = next(e for e in root.iter() if e.tag == SVG + "path").get("d")
        return min(float(y) for y in re.findall(r"[ML][\d.]+,([\d.]+)", path)), path.count("L")

    top, segments = highest(10.0)
    assert segments < 4 * WIDTH  # 30,000 points thinned to a few per pixel column ...
    assert top < 60  # ... and the one spike survives: it reaches the top of the plot (1.0 sits near the bottom)


def test_single_step_and_hostile_text(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "config.yaml").write_text("train: {log_every: 1}\n")
    write_lines(folder / "metrics.jsonl", [metric(0, 2.0)])
    write_lines(folder / "incidents.jsonl", [{**INCIDENTS[1], "step": 0, "reason": "bad \x00\x1b[31m \ud800 ]]> -->"}])
    html = build_report(folder)
    svgs(html)  # still parses
    assert ">-1<" not in html and "]]&gt; --&gt;" in html
    assert write_report(folder).read_bytes().decode("utf-8")


def test_long_run_stays_small_and_fast(tmp_path):
    folder = tmp_path / "long"
    folder.mkdir()
    (folder / "config.yaml").write_text(CONFIG)
    write_lines(folder / "metrics.jsonl", [metric(step, 1.0 + (step % 7) / 10) for step in range(0, 90_000, 5)])
    write_lines(folder / "incidents.jsonl", [{**INCIDENTS[2], "step": step} for step in range(5, 90_000, 60)])
    html = build_report(folder)
    assert len(svgs(html)) == 4 and len(html) < 3_000_000
    assert "The first 1000 of 1,500 incidents are shown" in html


def test_report_is_framework_free(tmp_path, run):
    import subprocess
    import sys

    from conftest import REPO
    code = ("import sys; sys.modules['torch'] = None; sys.modules['mindspore'] = None\n"
            "from nanguard.cli import main; sys.exit(main(['report', sys.argv[1], '--quiet']))")
    result = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr


def test_hostile_run_files_are_notes_not_hangs(run, tmp_path):
    """A FIFO as a log (a read would wait for a writer forever), /dev/zero as final.json (a read without
    end), a line nested past Python's recursion limit, a step of 10^18: each a note or a point on a chart;
    the report is written."""
    (run / "incidents.jsonl").unlink()
    os.mkfifo(run / "incidents.jsonl")
    (run / "final.json").unlink()
    (run / "final.json").symlink_to("/dev/zero")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write("\n" + "[" * 100_000 + "]" * 100_000 + "\n" + json.dumps(metric(10**18, 0.5)) + "\n")
    html = build_report(run)
    assert "incidents.jsonl could not be read" in html and "final.json could not be read" in html
    assert "not a regular file" in html and len(svgs(html)) == 4
    long = tmp_path / "long"  # the step of 10^18 alone with step 0: two points, not 10^18 slots
    long.mkdir()
    (long / "config.yaml").write_text(CONFIG)
    write_lines(long / "metrics.jsonl", [metric(0, 1.0), metric(10**18, 0.5)])
    assert len(svgs(build_report(long))) == 4
