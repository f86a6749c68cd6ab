"""--init-from: fine-tuning starts from exactly the source's weights (pipeline, checkpoint online/EMA, classifier),
class changes resize the class rows by name (or refuse with --strict-classes), bad sources fail by name before
any compute, and a resume wins over the source (CPU, offline, tiny models)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import call_and_reset
from safetensors.torch import load_file
from test_training import TINY, _argv, _write_folder, data  # noqa: F401 - the module's data fixture

from sdt_diffusion.training import classifier_trainer, trainer
from sdt_diffusion.training.diffusion_config import parse_args
from sdt_diffusion.training.init_from import resolve_init_path
from sdt_diffusion.utils.errors import ConfigError

pytestmark = pytest.mark.usefixtures("offline_env")


class _Built(Exception):
    """Raised right after the task built its model: the test reads the step-0 state, no step is trained."""


def _step0(monkeypatch, task_class, run) -> dict[str, dict[str, torch.Tensor]]:
    """The model's state and the EMA's shadow (by parameter name) right after ``task_class.build``."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    build = task_class.build

    def spy(self, settings, plan, accelerator):
        core = build(self, settings, plan, accelerator)
        model = core.unwrapped
        seen["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        names = [n for n, _ in model.named_parameters()]
        seen["ema"] = {n: s.detach().clone() for n, s in zip(names, core.ema.shadow)}
        raise _Built

    monkeypatch.setattr(task_class, "build", spy)
    with pytest.raises(_Built):
        call_and_reset(run)
    monkeypatch.setattr(task_class, "build", build)
    return seen


def _assert_equal(state: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    assert sorted(state) == sorted(source)
    for k, v in source.items():
        assert torch.equal(state[k], v), k


@pytest.fixture(scope="module")
def source_run(data, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny 1-step run: checkpoint-1 (online != EMA) and its pipeline export."""
    out = tmp_path_factory.mktemp("init_source") / "run"
    call_and_reset(trainer.train, parse_args(_argv(data, out, "--max-steps", "1", "--checkpoint-every", "1",
                                                   "--ema-decay", "0.5")))
    return out


def _diffusion(argv):
    return lambda: trainer.train(parse_args(argv))


def test_a_pipeline_source_gives_exactly_its_weights_and_its_architecture(source_run, data, tmp_path,  # noqa: F811
                                                                          monkeypatch, caplog):
    pipeline = source_run / "pipeline"
    argv = _argv(data, tmp_path / "ft", "--max-steps", "1", "--init-from", str(pipeline))
    del argv[:4]  # no --model / --model-kwargs: the source's architecture
    with caplog.at_level(logging.INFO, logger="sdt_diffusion.training"):
        seen = _step0(monkeypatch, trainer.DiffusionTask, _diffusion(argv))
    weights = load_file(str(pipeline / "transformer" / "diffusion_pytorch_model.safetensors"))
    _assert_equal(seen["model"], weights)
    _assert_equal(seen["ema"], weights)  # the EMA starts from the loaded weights
    assert "the model is the source's SDTTransformer2DModel" in caplog.text
    assert "a new run from the saved weights of a pipeline" in caplog.text


@pytest.mark.parametrize("ema", [False, True])
def test_a_checkpoint_source_gives_its_online_or_ema_weights(ema, source_run, data, tmp_path,  # noqa: F811
                                                             monkeypatch):
    checkpoint = source_run / "checkpoint-1"
    flags = ["--init-from", str(checkpoint)] + (["--init-from-ema"] if ema else [])
    seen = _step0(monkeypatch, trainer.DiffusionTask,
                  _diffusion(_argv(data, tmp_path / "ft", "--max-steps", "1", *flags)))
    if ema:
        shadow = load_file(str(checkpoint / "ema.safetensors"))
        expected = {n: shadow[str(i)] for i, n in enumerate(seen["ema"])}
    else:
        expected = load_file(str(checkpoint / "model.safetensors"))
    _assert_equal(seen["model"], expected)
    online = load_file(str(checkpoint / "model.safetensors"))
    assert any(not torch.equal(online[k], expected[k]) for k in expected) == ema  # the two sets differ


def test_a_class_change_keeps_rows_by_name_and_strict_classes_refuses(source_run, data, tmp_path,  # noqa: F811
                                                                      monkeypatch, caplog, capsys):
    root = tmp_path / "three"
    _write_folder(root, 2, 3)  # red thing, blue thing
    _write_folder(tmp_path / "green", 2, 4)
    (tmp_path / "green" / "red thing").rename(root / "green thing")
    argv = _argv({**data, "train": root}, tmp_path / "ft", "--max-steps", "1", "--init-from",
                 str(source_run / "pipeline"))
    with caplog.at_level(logging.INFO, logger="sdt_diffusion.training"):
        seen = _step0(monkeypatch, trainer.DiffusionTask, _diffusion(argv))
    old = load_file(str(source_run / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"))
    table, old_table = seen["model"]["emb.class_embedder.weight"], old["emb.class_embedder.weight"]
    assert table.shape[0] == 4 and old_table.shape[0] == 3  # 3 classes + null, 2 + null
    # source ids: blue thing 0, red thing 1; data: blue thing 0, green thing 1, red thing 2
    assert torch.equal(table[0], old_table[0]) and torch.equal(table[2], old_table[1])
    assert torch.equal(table[3], old_table[2])  # the null row stays the null row
    assert not torch.equal(table[1], old_table[1]) and not torch.equal(table[1], old_table[0])
    assert "the source has 2 classes, the data 3: class table resized, 2 rows kept by name, 1 new" in caplog.text

    rc = call_and_reset(trainer.main, [*argv, "--strict-classes"])
    err = capsys.readouterr().err
    assert rc == 2 and "--strict-classes" in err and "2 classes" in err and "the data 3" in err


@pytest.mark.parametrize("case", ["missing", "file", "run folder", "empty folder", "hub offline", "ema of pipeline",
                                  "ema without init", "model contradicts"])
def test_bad_sources_fail_by_name_before_any_compute(case, source_run, data, tmp_path, capsys):  # noqa: F811
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.safetensors").write_bytes(b"x")
    value, extra, words = {
        "missing": (str(tmp_path / "nope"), [], "no such folder"),
        "file": (str(tmp_path / "file.safetensors"), [], "a file, not a folder"),
        "run folder": (str(source_run), [], "looks like a run folder"),
        "empty folder": (str(tmp_path / "empty"), [], "not a pipeline folder"),
        "hub offline": ("nobody-here/no-such-model-xyz", [], "cannot be fetched"),
        "ema of pipeline": (str(source_run / "pipeline"), ["--init-from-ema"], "drop --init-from-ema"),
        "ema without init": (None, ["--init-from-ema"], "--init-from-ema applies to --init-from"),
        "model contradicts": (str(source_run / "pipeline"), ["--model", "SDT-P-B/2"], "--model SDT-P-B/2 contradicts"),
    }[case]
    argv = _argv(data, tmp_path / "out", "--max-steps", "1", *(["--init-from", value] if value else []), *extra)
    if case == "model contradicts":
        del argv[:4]
    rc = call_and_reset(trainer.main, argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert words in err and ("--init-from" in err), err
    assert not (tmp_path / "out").exists()  # a refused start leaves no empty run folder


def test_a_hub_id_is_fetched_with_json_and_safetensors_only(source_run, monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(source_run / "pipeline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_init_path("someone/sdt-p-tiny") == source_run / "pipeline"
    assert calls[0][0] == "someone/sdt-p-tiny" and not any("bin" in p or "pt" in p for p in calls[0][1])
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # so that ../x names a folder known not to exist
    with pytest.raises(ConfigError, match="--init-from ../x: no such folder"):
        resolve_init_path("../x")


def test_a_resume_wins_over_init_from_and_the_run_records_its_source(source_run, data, tmp_path,  # noqa: F811
                                                                     caplog):
    out = tmp_path / "ft"
    pipeline = source_run / "pipeline"
    first = _argv(data, out, "--max-steps", "1", "--init-from", str(pipeline), "--resume", "auto")
    call_and_reset(trainer.train, parse_args(first))
    config = (out / "train_config.yaml").read_text()
    assert "init_from:" in config and str(pipeline.resolve()) in config and "sha256:" in config
    assert "initialised from" in (out / "pipeline" / "README.md").read_text()
    with caplog.at_level(logging.INFO, logger="sdt_diffusion.training"):
        result = call_and_reset(trainer.train, parse_args([*first[:-4], "--max-steps", "2", "--init-from",
                                                           str(pipeline), "--resume", "auto"]))
    assert result.step == 2
    assert "wins over --init-from" in caplog.text and "a new run from" not in caplog.text
    state = json.loads((out / "checkpoint-2" / "training_state.json").read_text())
    assert state["init_from"]["kind"] == "pipeline"


# ------------------------------------------------------------------------------------------ classifier
CLS_TINY = json.dumps({"embed_dims": [16, 32, 32, 32], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 2],
                       "mlp_ratios": [2, 2, 2, 2], "head_hidden_size": 32, "gate_rank": 2})


def _cls_argv(train: Path, out: Path, *extra: str) -> list[str]:
    return ["--model-kwargs", CLS_TINY, "--data-dir", str(train), "--resolution", "32", "--global-batch-size", "4",
            "--lr-base-batch", "4", "--repeated-aug", "1", "--num-workers", "0", "--report-to", "none",
            "--no-progress-bar", "--max-steps", "1", "--output-dir", str(out), *extra]


def test_a_classifier_gets_a_new_head_when_the_label_count_changes(tmp_path, monkeypatch, caplog, capsys):
    from sdt_diffusion.training.classifier_config import parse_args as cls_parse_args

    three, two = tmp_path / "three", tmp_path / "two"
    _write_folder(three, 4, 0)
    (three / "red thing").rename(three / "green thing")
    _write_folder(three, 4, 1)  # blue thing, green thing, red thing
    _write_folder(two, 4, 2)
    call_and_reset(classifier_trainer.train_classifier, cls_parse_args(_cls_argv(three, tmp_path / "src")))
    checkpoint = tmp_path / "src" / "checkpoint-1"
    run = lambda: classifier_trainer.train_classifier(cls_parse_args(  # noqa: E731
        _cls_argv(two, tmp_path / "ft", "--init-from", str(checkpoint))))
    with caplog.at_level(logging.INFO, logger="sdt_diffusion.training"):
        seen = _step0(monkeypatch, classifier_trainer.ClassifierTask, run)
    source = load_file(str(checkpoint / "model.safetensors"))
    assert seen["model"]["head.fc.weight"].shape[0] == 2 and source["head.fc.weight"].shape[0] == 3
    for k, v in source.items():
        if not k.startswith("head.fc."):
            assert torch.equal(seen["model"][k], v), k
    assert "the source has 3 classes, the data 2: a new head of 2 classes" in caplog.text

    rc = call_and_reset(classifier_trainer.main, _cls_argv(two, tmp_path / "ft2", "--init-from", str(checkpoint),
                                                           "--strict-classes"))
    assert rc == 2 and "--strict-classes" in capsys.readouterr().err


def test_a_diffusers_dit_trains_as_dit_or_is_converted_for_an_sdt_p_model(data, tmp_path, monkeypatch):  # noqa: F811
    from sdt_diffusion.models.convert_dit import convert_dit
    from sdt_diffusion.models.dit import DiTTransformer2DModel
    from sdt_diffusion.models.registry import build_transformer

    sizes = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2}
    dit = build_transformer({"_class_name": "DiTTransformer2DModel", **sizes, "sample_size": 4, "in_channels": 4,
                             "out_channels": 8, "num_embeds_ada_norm": 2})
    dit.save_pretrained(tmp_path / "dit")
    argv = _argv(data, tmp_path / "ft", "--max-steps", "1", "--init-from", str(tmp_path / "dit"))
    seen = _step0(monkeypatch, trainer.DiffusionTask, _diffusion(argv[4:]))  # no --model: trained as DiT
    _assert_equal(seen["model"], load_file(str(tmp_path / "dit" / "diffusion_pytorch_model.safetensors")))
    argv[1:4] = ["SDT-P-S/2", "--model-kwargs", json.dumps(sizes)]
    seen = _step0(monkeypatch, trainer.DiffusionTask, _diffusion(argv))  # an SDT-P --model: converted
    converted = convert_dit(DiTTransformer2DModel.from_pretrained(tmp_path / "dit"))
    _assert_equal(seen["model"], converted.state_dict())
