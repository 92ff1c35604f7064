"""The command line answers a bad invocation with one line naming the option, never a
traceback (``bayesfilter-diff validate`` / ``train``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import bayesfilter_diff as bfd
from bayesfilter_diff.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and bfd.__version__ in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["validate", "--methods", ""], "--methods is empty"),
        (["validate", "--methods", "TDS,,MCGdiff"], "empty name"),
        (["validate", "--methods", "Nope"], "unknown methods"),
        (["validate", "--device", "banana"], "--device 'banana' is not a torch device"),
        (["validate", "--out", "FILE"], "is a file, not a folder"),
        (["validate", "--out", "FILE/sub"], "cannot be created"),
        (["validate", "--threads", "0"], "--threads must be >= 1"),
        (["validate", "--num-workers", "0"], "--num-workers must be >= 1"),
        (["validate", "--address", "auto"], "--address and --gpus-per-task need --executor ray"),
        (
            [
                "train",
                "--data",
                "moons",
                "--kind",
                "diffusion",
                "--steps",
                "1",
                "--out",
                "EMPTY",
                "--resume",
            ],
            "holds no checkpoint",
        ),
        (
            [
                "train",
                "--data",
                "moons",
                "--kind",
                "diffusion",
                "--steps",
                "1",
                "--out",
                "EMPTY",
                "--threads",
                "0",
            ],
            "--threads must be >= 1",
        ),
    ],
)
def test_bad_invocations_get_one_line(argv, match, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    argv = [
        str(f)
        if a == "FILE"
        else str(f) + "/sub"
        if a == "FILE/sub"
        else str(tmp_path / "empty")
        if a == "EMPTY"
        else a
        for a in argv
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bayesfilter-diff: error:") and match in err[0], err


def test_cuda_without_a_device_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["validate", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_help_lists_the_method_names():
    out = subprocess.run(
        [sys.executable, "-m", "bayesfilter_diff.cli", "validate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    text = " ".join(out.split()).replace("- ", "-")  # argparse wraps lines (and at hyphens)
    for name in bfd.samplers.registry.names(studies=True, mask=False):
        assert name in text
    assert "default: validation/demo" in text


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["validate", "--threads", "0"], "--threads"),
        (["validate", "--methods", "Nope"], "methods"),
        (["validate", "--device", "banana"], "--device"),
        (["train", "--data", "moons", "--kind", "gan", "--steps", "1", "--out", "X"], "--kind"),
    ],
)
def test_refusals_in_a_subprocess_are_one_line_without_traceback(argv, flag, tmp_path):
    """As a user's shell sees them: exit code 2, the flag named, no traceback."""
    args = [a if a != "X" else str(tmp_path / "run") for a in argv]
    out = subprocess.run(
        [sys.executable, "-m", "bayesfilter_diff.cli", *args], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and flag in out.stderr.strip().splitlines()[-1]
