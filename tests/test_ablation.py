"""benchmarks/ablation.py at a tiny budget: every variant trains through the same trainer, is scored, tabulated,
and a rerun trains nothing again."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ABLATION = Path(__file__).resolve().parent.parent / "benchmarks" / "ablation.py"


def _load():
    spec = importlib.util.spec_from_file_location("ablation", ABLATION)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_ablation_runs_dit_and_sdt_variants_and_resumes(tmp_path, capsys):
    ablation = _load()
    argv = ["--variants", "dit", "cdsf", "--alphas", "0.2", "--seeds", "0", "--steps", "2",
            "--batch-size", "8", "--samples-per-class", "1", "--sample-steps", "2", "--output-dir", str(tmp_path)]
    table = ablation.main(argv)
    assert list(table) == ["dit", "cdsf (alpha=0.2)"]
    for stats in table.values():
        assert 0.0 <= stats["class_consistency"]["mean"] <= 1.0
        assert stats["heldout_loss_ema"]["mean"] > 0 and stats["heldout_loss_ema"]["n"] == 1
        assert "frechet_distance_judge" not in stats  # 10 samples < 128 judge features: not computed
    text = (tmp_path / "ablation.md").read_text()
    assert "| dit |" in text and "| cdsf (alpha=0.2) |" in text
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert len(saved["runs"]) == 2
    state = json.loads((tmp_path / "dit" / "seed-0" / "train" / "checkpoint-2" / "training_state.json").read_text())
    assert state["model_config"]["_class_name"] == "DiTTransformer2DModel"
    log = tmp_path / "cdsf-alpha0.2" / "seed-0" / "train.log"
    before = log.stat().st_mtime_ns
    capsys.readouterr()
    ablation.main(argv)  # everything is done: nothing is trained again
    assert log.stat().st_mtime_ns == before
    assert capsys.readouterr().out.count("done earlier") == 2


def test_unknown_variant_is_refused():
    ablation = _load()
    with pytest.raises(SystemExit, match="unknown --variants"):
        ablation.main(["--variants", "cdsf", "rmt"])
