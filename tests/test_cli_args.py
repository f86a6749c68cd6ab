"""The shared command-line vocabulary: deprecated aliases and dtype names."""

import argparse

import pytest
import torch

from sdt_diffusion.utils.cli_args import (
    add_deprecated_alias,
    add_dtype_argument,
    class_arg,
    torch_dtype,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--guidance-scale", type=float, default=1.5)
    add_deprecated_alias(p, "--guidance", "--guidance-scale")
    p.add_argument("--verbose", action="store_true")
    add_deprecated_alias(p, "--loud", "--verbose")
    add_dtype_argument(p, default="float32")
    return p


def test_new_flag_and_default():
    args = _parser().parse_args([])
    assert args.guidance_scale == 1.5 and args.dtype == "float32" and not args.verbose
    assert _parser().parse_args(["--guidance-scale", "4"]).guidance_scale == 4.0


def test_old_spelling_warns_once_and_maps(capsys):
    args = _parser().parse_args(["--guidance", "3", "--loud", "--dtype", "bf16"])
    assert args.guidance_scale == 3.0 and args.verbose and args.dtype == "bfloat16"
    err = capsys.readouterr().err
    assert "--guidance is deprecated" in err and "--guidance-scale" in err
    assert "--loud is deprecated" in err and "--dtype bf16 is deprecated" in err
    assert len(err.strip().splitlines()) == 3


def test_old_spelling_hidden_from_help():
    text = _parser().format_help()
    assert "--guidance-scale" in text and "--guidance " not in text and "--loud" not in text


def test_bad_dtype_is_named(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--dtype", "float8"])
    assert "float8" in capsys.readouterr().err


def test_torch_dtype_and_class_arg():
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="int8"):
        torch_dtype("int8")
    assert class_arg(" 207 ") == 207 and class_arg("golden retriever") == "golden retriever"
    with pytest.raises(argparse.ArgumentTypeError):
        class_arg("  ")


def test_alias_needs_the_new_flag():
    with pytest.raises(ValueError, match="--nope"):
        add_deprecated_alias(argparse.ArgumentParser(), "--old", "--nope")
