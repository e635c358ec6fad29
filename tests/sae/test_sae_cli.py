"""`mechscope harvest` -> `train-sae` -> `eval-sae` on a tiny model, end to end through the CLI."""

from __future__ import annotations

from mechscope.cli import main
from mechscope.sae import load


def test_harvest_train_and_evaluate_from_the_command_line(tiny_lm_folder, tmp_path, capsys):
    folder = str(tiny_lm_folder[0])
    store, out = str(tmp_path / "store"), str(tmp_path / "sae")
    hook = "blocks.1.hook_resid_post"
    assert main(["harvest", "--model", folder, "--hooks", hook, "--tokens", "4000", "--out", store,
                 "--context-len", "32", "--no-progress"]) == 0
    assert main(["train-sae", "--model", folder, "--hook", hook, "--store", store, "--out", out, "--format", "saelens",
                 "--latents", "64", "--k", "4", "--steps", "60", "--batch-size", "256", "--eval-tokens", "2000",
                 "--eval-contexts", "4", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "FVE" in text and "CE recovered vs zero-abl" in text
    coder = load(out)
    assert coder.cfg.hook_in == hook and coder.cfg.k == 4 and coder.cfg.n_latents == 64
    assert main(["eval-sae", out, "--model", folder, "--store", store, "--eval-tokens", "1000",
                 "--eval-contexts", "2"]) == 0
    assert "L0 4.0" in capsys.readouterr().out
