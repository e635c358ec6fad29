"""Every README example runs; the CLI's main job works and reports parity."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mechscope.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_setup_commands_match_ci():
    text = README.read_text()
    shell = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    install, tests = shell[0].strip(), shell[1].strip()
    ci = (README.parent / ".ci" / "run").read_text()
    assert "-m venv --clear" in ci  # a fresh virtual environment every run, as a new user has
    at = ci.index("-m venv --clear")
    for step in install.split(" && ")[:-1]:  # every install step, in order, then the test command
        assert step in ci[at:], step
        at = ci.index(step, at) + len(step)
    assert ci.strip().splitlines()[-1] == tests
    assert install.endswith("mechscope report")


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_example_runs(index):
    code = _python_blocks()[index]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_inspect_tiny_model_reports_parity(tiny_gpt2, capsys):
    _, folder, _ = tiny_gpt2
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "parity" in out and "OK" in out
    assert "blocks.{l}.attn.hook_pattern" in out and "(2, 4, " in out  # shapes are printed
    assert "parameters" in out


def test_inspect_minilm_encoder(capsys):
    assert main(["inspect", "minilm"]) == 0
    out = capsys.readouterr().out
    assert "hidden-state diff" in out and "OK" in out


def test_inspect_bad_model_is_a_clean_error(capsys):
    assert main(["inspect", "no-such-model-anywhere"]) == 2
    assert "mechscope: error:" in capsys.readouterr().err
