"""Model cards of the exports and their upload to the Hub (offline: ``HfApi`` is replaced, nothing reaches the
network)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import call_and_reset, read_metrics
from huggingface_hub import ModelCard
from PIL import Image
from sdt_diffusion.pipelines import SDTPipeline

from sdt_diffusion import hub
from sdt_diffusion.training import classifier_trainer, export, trainer

pytestmark = pytest.mark.usefixtures("offline_env")

TINY_SDT = json.dumps({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "gate_rank": 4,
                       "lpe_kernel_size": 3})
TINY_SDT_H = json.dumps({"embed_dims": [16, 32, 32, 32], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 2],
                         "mlp_ratios": [2, 2, 2, 2], "head_hidden_size": 32, "gate_rank": 2})
SECRET = "hf_not_a_real_token_1234"


class FakeHfApi:
    """Stands in for ``huggingface_hub.HfApi``: records every call (and the files an upload would send)."""

    calls: list[tuple[str, dict]] = []
    fail: str | None = None

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if FakeHfApi.fail:
            raise OSError(FakeHfApi.fail)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        files = sorted(str(p.relative_to(kwargs["folder_path"])) for p in Path(kwargs["folder_path"]).rglob("*")
                       if p.is_file())
        FakeHfApi.calls.append(("upload_folder", {**kwargs, "files": files}))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0")


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.calls, FakeHfApi.fail = [], None
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    return FakeHfApi


def _images(root: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("apple", "banana", "cherry")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.full((32, 32, 3), 40 * c, np.float64) + rng.normal(0, 30, (32, 32, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub_data")
    _images(root / "train", 4, 0)
    _images(root / "val", 2, 1)
    return {"train": root / "train", "val": root / "val"}


def _front_matter(card: Path) -> dict:
    text = card.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def diffusion_run(data, tmp_path_factory) -> dict:
    """A finished 2-step pixel-space run with held-out loss and a sample grid, pushed with --hub-token."""
    out = tmp_path_factory.mktemp("diffusion_run") / "run"
    argv = ["--model", "SDT-P-S/2", "--model-kwargs", TINY_SDT, "--data-dir", str(data["train"]), "--vae", "none",
            "--resolution", "8", "--global-batch-size", "2", "--max-steps", "2", "--checkpoint-every", "2",
            "--eval-data-dir", str(data["val"]), "--eval-every", "2", "--sample-every", "2", "--sample-steps", "2",
            "--num-workers", "0", "--report-to", "none", "--no-progress-bar", "--output-dir", str(out),
            "--push-to-hub", "--hub-model-id", "someone/tiny-sdt", "--hub-token", SECRET, "--hub-license", "mit"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        FakeHfApi.calls, FakeHfApi.fail = [], None
        mp.setattr(hub, "HfApi", FakeHfApi)
        assert call_and_reset(trainer.main, argv) == 0
        calls = list(FakeHfApi.calls)
    return {"out": out, "calls": calls}


def test_the_trainers_pipeline_export_carries_its_model_card(diffusion_run):
    out = diffusion_run["out"]
    pipeline = out / "pipeline"
    meta = _front_matter(pipeline / "README.md")
    assert meta["library_name"] == "diffusers" and meta["license"] == "mit"
    assert {"sdt-diffusion", "spatial-decay-transformer", "class-conditional", "image-generation"} <= set(meta["tags"])
    assert ModelCard.load(pipeline / "README.md").data.library_name == "diffusers"
    text = (pipeline / "README.md").read_text()
    assert "| preset | SDT-P-S/2 |" in text and "| steps | 2 |" in text and "| global batch | 2 |" in text
    assert "| decay mode | cdsf |" in text and "apple, banana, cherry" in text and '"num_layers": 1' in text
    held_out = [r["eval_loss_ema"] for r in read_metrics(out) if "eval_loss_ema" in r and r["step"] == 2]
    assert f"| held-out loss (EMA weights) | {held_out[0]:.4g} | hub_data0/val, step 2 |" in text
    assert "EMA samples of step 2, one per sample class" in text and "![samples](samples.png)" in text
    assert (pipeline / "samples.png").read_bytes() == (out / "samples" / "step-0000002.png").read_bytes()
    assert 'SDTPipeline.from_pretrained("someone/tiny-sdt")' in text
    assert SDTPipeline.from_pretrained(str(pipeline)).id2label == {0: "apple", 1: "banana", 2: "cherry"}


def test_the_finished_run_is_pushed_once_and_its_token_is_never_recorded(diffusion_run):
    out, calls = diffusion_run["out"], diffusion_run["calls"]
    assert [name for name, _ in calls] == ["create_repo", "upload_folder"]
    create, upload = calls[0][1], calls[1][1]
    assert create == {"repo_id": "someone/tiny-sdt", "token": SECRET, "private": None, "repo_type": "model",
                      "exist_ok": True}
    assert upload["repo_id"] == "someone/tiny-sdt" and upload["folder_path"] == str(out / "pipeline")
    assert upload["token"] == SECRET and upload["repo_type"] == "model"
    assert {"README.md", "samples.png", "model_index.json"} <= set(upload["files"])
    assert yaml.safe_load((out / "train_config.yaml").read_text())["hub_token"] == "<hidden>"
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".md", ".txt"):
            assert SECRET not in path.read_text(), path


def test_sdt_export_card_holds_the_fid_results_and_the_push_sends_the_folder(diffusion_run, fake_hub, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    out = diffusion_run["out"]
    results = {"fid": 12.25, "sfid": 6.5, "inception_score": 80.25, "precision": 0.61, "recall": 0.55,
               "num_samples": 50000, "samples": "s.npz", "reference": "/data/VIRTUAL_imagenet256_labeled.npz",
               "settings": {}}
    (tmp_path / "fid.json").write_text(json.dumps(results))
    target = tmp_path / "exported"
    argv = [str(out / "checkpoint-2"), "--output-dir", str(target), "--fid-results", str(tmp_path / "fid.json"),
            "--push-to-hub", "--hub-model-id", "someone/exported", "--hub-private"]
    assert export.main(argv) == 0
    text = (target / "README.md").read_text()
    meta = _front_matter(target / "README.md")
    assert meta["library_name"] == "diffusers" and "license" not in meta  # none given: none stated
    assert {"fid", "loss"} <= set(meta["metrics"])
    for row in ("| FID | 12.25 | 50,000 samples against VIRTUAL_imagenet256_labeled.npz |", "| sFID | 6.5 |",
                "| Inception Score | 80.25 |", "| Precision | 0.61 |", "| Recall | 0.55 |",
                "| held-out loss (EMA weights) |", "| steps | 2 |"):
        assert row in text, row
    assert (target / "samples.png").read_bytes() == (out / "samples" / "step-0000002.png").read_bytes()
    assert 'SDTPipeline.from_pretrained("someone/exported")' in text
    create, upload = fake_hub.calls[0][1], fake_hub.calls[1][1]
    assert create["repo_id"] == "someone/exported" and create["private"] is True and create["exist_ok"] is True
    assert create["token"] is None and upload["token"] is None  # huggingface_hub reads HF_TOKEN itself
    assert upload["folder_path"] == str(target) and "README.md" in upload["files"]

    # without --hub-model-id the card names the folder; a failed upload is one line with status 1, export kept
    fake_hub.calls, fake_hub.fail = [], "401 Client Error: Unauthorized\nmore detail"
    local = tmp_path / "local"
    assert export.main([str(out / "checkpoint-2"), "--output-dir", str(local)]) == 0
    assert 'SDTPipeline.from_pretrained("path/to/local")' in (local / "README.md").read_text()
    assert fake_hub.calls == []  # no --push-to-hub: no upload
    assert export.main([str(out / "checkpoint-2"), "--output-dir", str(local), "--push-to-hub", "--hub-model-id",
                        "someone/x"]) == 1
    assert (local / "README.md").is_file()


def test_a_file_that_is_not_an_sdt_fid_result_is_refused_before_the_export(diffusion_run, tmp_path, capsys):
    (tmp_path / "other.json").write_text(json.dumps({"fid": 3.0}))
    target = tmp_path / "exported"
    argv = [str(diffusion_run["out"] / "checkpoint-2"), "--output-dir", str(target)]
    assert export.main([*argv, "--fid-results", str(tmp_path / "other.json")]) == 2
    assert "not an sdt-fid --output result" in capsys.readouterr().err and not target.exists()
    assert export.main([*argv, "--fid-results", str(tmp_path / "missing.json")]) == 2
    assert not target.exists()


def test_a_card_that_cannot_be_written_leaves_the_previous_export_whole(diffusion_run, tmp_path, monkeypatch):
    target = tmp_path / "exported"
    checkpoint = str(diffusion_run["out"] / "checkpoint-2")
    assert export.main([checkpoint, "--output-dir", str(target), "--hub-model-id", "someone/first"]) == 0
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}

    def full_disk(folder, facts):
        (Path(folder) / "README.md").write_text("---\nlibrary_")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_model_card", full_disk)
    assert export.main([checkpoint, "--output-dir", str(target), "--hub-model-id", "someone/second"]) == 2
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no half-written folder left beside it


@pytest.mark.parametrize("command", ["sdt-train", "sdt-train-classifier", "sdt-export"])
@pytest.mark.parametrize("case", ["no model id", "bad model id", "no token"])
def test_push_to_hub_without_what_it_needs_is_refused_at_start_up(command, case, data, fake_hub, tmp_path,
                                                                  monkeypatch, capsys):
    out = tmp_path / "run"
    flags = {"no model id": ["--push-to-hub"], "bad model id": ["--push-to-hub", "--hub-model-id", "a/b/c"],
             "no token": ["--push-to-hub", "--hub-model-id", "someone/model"]}[case]
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    if case == "no token":
        monkeypatch.setattr(hub, "get_token", lambda: None)
    if command == "sdt-export":
        (tmp_path / "ckpt").mkdir()
        code = export.main([str(tmp_path / "ckpt"), "--output-dir", str(out), *flags])
    else:
        main = trainer.main if command == "sdt-train" else classifier_trainer.main
        base = ["--model-kwargs", TINY_SDT, "--vae", "none"] if command == "sdt-train" else [
            "--model-kwargs", TINY_SDT_H]
        code = call_and_reset(main, [*base, "--data-dir", str(data["train"]), "--resolution", "32", "--max-steps",
                                     "1", "--global-batch-size", "2", "--report-to", "none", "--output-dir", str(out),
                                     *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert {"no model id": "--push-to-hub needs --hub-model-id", "bad model id": "--hub-model-id 'a/b/c'",
            "no token": "--push-to-hub needs a Hub token"}[case] in err
    assert len(err.strip().splitlines()) == 1 and not out.exists() and fake_hub.calls == []


def test_the_classifier_export_carries_its_model_card_and_is_pushed(data, fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path / "run"
    argv = ["--model-kwargs", TINY_SDT_H, "--data-dir", str(data["train"]), "--eval-data-dir", str(data["val"]),
            "--resolution", "32", "--global-batch-size", "4", "--lr-base-batch", "4", "--repeated-aug", "1",
            "--max-steps", "2", "--num-workers", "0", "--report-to", "none", "--no-progress-bar", "--output-dir",
            str(out), "--push-to-hub", "--hub-model-id", "someone/tiny-sdt-h"]
    try:
        assert call_and_reset(classifier_trainer.main, argv) == 0
    finally:
        torch.set_num_threads(threads)
    model = out / "model"
    meta = _front_matter(model / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-classification"
    assert {"sdt-diffusion", "spatial-decay-transformer", "image-classification", "timm"} <= set(meta["tags"])
    assert meta["metrics"] == ["accuracy"]
    text = (model / "README.md").read_text()
    best = json.loads((out / "best" / "best.json").read_text())
    assert f"| top-1 accuracy (%) | {best['top1']:.4g} | hub_data0/val, step {best['step']}" in text
    assert "| preset | SDT-H-T |" in text and "| steps | 2 |" in text and "apple, banana, cherry" in text
    assert "| decay mode | decomposed, decomposed, cdsf, cdsf |" in text
    assert 'pipeline("image-classification", model="someone/tiny-sdt-h")' in text
    assert 'snapshot_download("someone/tiny-sdt-h", allow_patterns="timm/*") + "/timm"' in text
    assert not (model / "samples.png").exists() and "## Samples" not in text
    upload = fake_hub.calls[1][1]
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"] and upload["folder_path"] == str(model)
    assert {"README.md", "config.json", "timm/config.json", "timm/model.safetensors"} <= set(upload["files"])

    # a resume of the finished run retries the upload (e.g. after a failed one) and trains nothing
    fake_hub.calls = []
    assert call_and_reset(classifier_trainer.main, [*argv, "--resume", "latest"]) == 0
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"]


def test_without_a_hub_id_the_load_snippets_name_the_folder_but_not_its_local_path(tmp_path):
    facts = hub.CardFacts(kind="classifier", model="SDT-H-T", architecture="SDTHForImageClassification",
                          parameters=10, config={"num_labels": 1000}, id2label=dict(enumerate(["x"] * 1000)), step=1,
                          location=str(tmp_path / "model"))
    text = str(hub.model_card(facts))
    assert 'pipeline("image-classification", model="path/to/model")' in text and str(tmp_path) not in text
    assert 'timm.create_model("local-dir:" + "path/to/model/timm", pretrained=True)' in text
    assert "datasets" not in text.split("---")[1]  # 1000 classes, but not ImageNet's names
    from sdt_diffusion.utils.labels import get_imagenet_id2label

    imagenet = hub.CardFacts(**{**facts.__dict__, "id2label": get_imagenet_id2label(),
                                "datasets": hub.known_datasets(get_imagenet_id2label())})
    assert hub.model_card(imagenet).data.datasets == ["ILSVRC/imagenet-1k"]
