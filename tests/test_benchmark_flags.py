"""The benchmark scripts name their flags as the trainers do (``--batch-size``, ``--resolution``,
``--model-size``, ``--attention-backend``, ``--mixed-precision``); the spellings they had before still parse to the
same values, with a one-line deprecation warning naming the new flag."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

CASES = [  # script, new spelling, old spelling, the values both must give
    ("benchmark", ["--model-sizes", "S", "B", "--batch-size", "4", "--attention-backend", "flex"],
     ["--sizes", "S", "B", "--batch", "4", "--backend", "flex"],
     {"model_sizes": ["S", "B"], "batch_size": 4, "attention_backend": "flex"}),
    ("profile_sdt", ["--model-size", "B", "--batch-size", "2"], ["--size", "B", "--batch", "2"],
     {"model_size": "B", "batch_size": 2}),
    ("sdt_h_speed", ["--batch-size", "2", "--resolution", "64", "--attention-backend", "math",
                     "--mixed-precision", "bf16"],
     ["--batch", "2", "--size", "64", "--backend", "math", "--amp"],
     {"batch_size": 2, "resolution": 64, "attention_backend": "math", "mixed_precision": "bf16"}),
    ("sdt_h_cost", ["--resolution", "256"], ["--size", "256"], {"resolution": 256}),
]


@pytest.mark.parametrize("script, new, old, values", CASES, ids=[c[0] for c in CASES])
def test_old_spellings_give_the_new_flags_values_with_a_warning(script, new, old, values, capsys):
    parser = importlib.import_module(script).build_parser()
    got_new = vars(parser.parse_args(new))
    assert capsys.readouterr().err == ""
    got_old = vars(parser.parse_args(old))
    err = capsys.readouterr().err
    assert {k: got_new[k] for k in values} == {k: got_old[k] for k in values} == values
    for flag in old:
        if flag.startswith("--"):
            assert f"{flag} is deprecated" in err, err
    help_text = parser.format_help()
    assert all(f"{flag} " not in help_text for flag in old if flag.startswith("--"))  # hidden from --help


def test_sdt_h_speed_defaults_to_float32():
    assert importlib.import_module("sdt_h_speed").build_parser().parse_args([]).mixed_precision == "no"
