"""The wheel (a non-editable install) holds one top-level package, sdt_diffusion, with pipelines and data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO),
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("sdt_diffusion-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"sdt_diffusion"}  # no generic top-level names such as training, eval or pipelines
    for needed in ("sdt_diffusion/pipelines/pipeline_sdt.py", "sdt_diffusion/models/transformer_sdt.py",
                   "sdt_diffusion/attention/spatial_decay.py", "sdt_diffusion/utils/imagenet_classes.json",
                   "sdt_diffusion/training/trainer.py"):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "sdt-sample" in text and "sdt-visualize" in text


def test_import_from_another_directory(tmp_path):
    code = "import sdt_diffusion, sdt_diffusion.pipelines as p; print(sdt_diffusion.SDTTransformer2DModel.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "SDTTransformer2DModel"
