"""The core a second backend reuses imports neither torch nor mindspore."""

import subprocess
import sys

from conftest import REPO

CODE = """
import sys
sys.modules["torch"] = None
sys.modules["mindspore"] = None
import nanguard.guard, nanguard.audit, nanguard.data.coco, nanguard.data.loader, nanguard.data.synth
import nanguard.evaluation.coco, nanguard.config, nanguard.cli, nanguard.progress, nanguard.data.targets
import nanguard.run, nanguard.run.backend, nanguard.run.trainer, nanguard.run.folder, nanguard.run.checkpoints
import nanguard.run.data, nanguard.run.train_command, nanguard.run.eval_command
import nanguard.explain, nanguard.explain.verdict, nanguard.explain.diagnose, nanguard.explain.command, nanguard.explain.config
import nanguard.report, nanguard.report.html, nanguard.report.command
from nanguard.cli import main
assert main(["synth", sys.argv[1], "--images", "2", "--val-images", "1", "--size", "32", "--quiet"]) == 0
assert main(["audit", sys.argv[1] + "/annotations/instances_train.json", "--quiet"]) == 0
print("ok")
"""


def test_core_imports_no_framework(tmp_path):
    result = subprocess.run([sys.executable, "-c", CODE, str(tmp_path / "d")], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
