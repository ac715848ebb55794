"""Every ``volseg`` error is one line on stderr naming the problem, with a documented exit code
(volseg/cli/common.py), never a traceback: run as a user would, ``python -m volseg``."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from volseg.cli.common import EXIT_FAILED, EXIT_INTERNAL, EXIT_USAGE, run_command


def volseg(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "volseg", *map(str, args)], capture_output=True, text=True,
                          check=False, cwd=cwd, timeout=600)


def assert_one_line(res: subprocess.CompletedProcess, code: int, prog: str, *names: str) -> str:
    """Exit ``code``, nothing on stdout, stderr exactly ``<prog>: error: ...`` naming ``names``."""
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), res.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert res.stdout == "", res.stdout
    return lines[0]


def test_unknown_device_is_a_usage_error_before_any_work(tiny_head, tmp_path):
    image, _ = tiny_head
    for cmd in (("strip", image), ("anomaly", image), ("run", image), ("calibrate", image),
                ("evaluate", "anomaly")):
        res = volseg(*cmd, "-o", tmp_path / "out", "--device", "bogus")
        line = assert_one_line(res, EXIT_USAGE, f"volseg {cmd[0]}", "--device", "'bogus'")
        assert "auto, cpu, cuda or cuda:N" in line
    assert not (tmp_path / "out").exists()
    res = volseg("strip", image, "-o", tmp_path / "out", "--device", "cuda:x")
    assert_one_line(res, EXIT_USAGE, "volseg strip", "'cuda:x'")


def test_missing_config_file(tiny_head, tmp_path):
    image, _ = tiny_head
    res = volseg("strip", image, "-o", tmp_path / "out", "-c", "nope.yaml", cwd=tmp_path)
    assert_one_line(res, EXIT_FAILED, "volseg strip", "nope.yaml", "not found")
    res = volseg("preprocess", image, "-o", tmp_path / "out", "-c", tmp_path / "gone.yaml")
    assert_one_line(res, EXIT_FAILED, "volseg preprocess", "gone.yaml", "not found")
    res = volseg("train", "strip", "-c", tmp_path / "gone.yaml")
    assert_one_line(res, EXIT_FAILED, "volseg train", "gone.yaml", "not found")


def test_unknown_config_key(tiny_head, tmp_path):
    image, _ = tiny_head
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("n4:\n  iterations: [5]\n  shrink_factr: 2\n")  # configs/default.yaml's format
    res = volseg("preprocess", image, "-o", tmp_path / "out", "-c", cfg)
    assert_one_line(res, EXIT_FAILED, "volseg preprocess", "bad.yaml", "shrink_factr")
    cfg.write_text("preprocess:\n  n4:\n    iterations: [5]\n    shrink_factr: 2\n")  # configs/strip.yaml's
    res = volseg("strip", image, "-o", tmp_path / "out", "-c", cfg)
    assert_one_line(res, EXIT_FAILED, "volseg strip", "bad.yaml", "shrink_factr")
    cfg.write_text("bogus_key: 1\n")
    res = volseg("run", image, "-o", tmp_path / "run", "-c", cfg, "--stages", "n4,strip", "--no-report")
    assert_one_line(res, EXIT_FAILED, "volseg run", "bad.yaml", "bogus_key")


def test_missing_input_file(tmp_path):
    missing = tmp_path / "sub-gone_T1w.nii.gz"
    for cmd in ("preprocess", "strip"):
        res = volseg(cmd, missing, "-o", tmp_path / "out")
        assert_one_line(res, EXIT_FAILED, f"volseg {cmd}", "sub-gone_T1w.nii.gz", "not found")
    res = volseg("evaluate", "anomaly", "--cases", tmp_path / "cases.csv", "-o", tmp_path / "ev")
    assert_one_line(res, EXIT_FAILED, "volseg evaluate", "cases.csv", "not found")
    res = volseg("gather", tmp_path / "no_run")
    assert_one_line(res, EXIT_FAILED, "volseg gather", "no_run", "not found")
    assert not (tmp_path / "no_run").exists()


def test_usage_errors_are_one_line_with_exit_code_2(tiny_head, tmp_path):
    image, mask = tiny_head
    cases = [
        (("strip", image), "volseg strip", ("-o/--output", "required")),
        (("strip", image, "-o", tmp_path / "o", "--border", "wide"), "volseg strip", ("--border", "'wide'")),
        (("frobnicate",), "volseg", ("frobnicate",)),
        (("preprocess", image, "-o", tmp_path / "o", "--no-such-option"), "volseg", ("--no-such-option",)),
        (("synth", "-o", tmp_path / "s", "-n", "0"), "volseg synth", ("-n",)),
        (("anomaly", image, image, "--mask", mask, "-o", tmp_path / "a"), "volseg anomaly", ("--mask",)),
        (("run", image, "-o", tmp_path / "r", "--stages", "strip,bogus"), "volseg run", ("bogus",)),
        (("run", image, "-o", tmp_path / "r", "--shard", "3/3", "--list"), "volseg run", ("shard",)),
        (("train", "strip"), "volseg train", ("-c CONFIG",)),
        (("slurm", "submit", image, "-o", tmp_path / "q", "--scans-per-task", "0"), "volseg slurm submit",
         ("--scans-per-task",)),
    ]
    for args, prog, names in cases:
        assert_one_line(volseg(*args), EXIT_USAGE, prog, *names)
    assert not any((tmp_path / d).exists() for d in ("o", "s", "a", "r", "q"))


def test_the_handler_maps_each_kind_of_error_to_one_line(capsys):
    from volseg.errors import ConfigError, InputError

    def args(exc):
        def func(_):
            raise exc
        return argparse.Namespace(func=func, cli_prog="volseg x")

    expected = [
        (InputError("scan.nii.gz", "file not found"), EXIT_FAILED, "scan.nii.gz: file not found"),
        (ConfigError("a.yaml: unknown key 'k'\n(allowed here: x, y)"), EXIT_FAILED, "unknown key 'k'; (allowed"),
        (FileNotFoundError(2, "No such file or directory", "weights.bin"), EXIT_FAILED,
         "weights.bin: No such file or directory"),
        (ZeroDivisionError("division by zero"), EXIT_INTERNAL, "unexpected ZeroDivisionError: division by zero"),
    ]
    for exc, code, text in expected:
        assert run_command(args(exc)) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("volseg x: error: ") and text in err, err
    ok = argparse.Namespace(func=lambda _: None, cli_prog="volseg x")
    assert run_command(ok) == 0 and capsys.readouterr().err == ""


@pytest.mark.parametrize("argv", [["--help"], ["strip", "--help"]])
def test_help_still_exits_0(argv):
    res = volseg(*argv)
    assert res.returncode == 0 and res.stdout.startswith("usage: volseg") and res.stderr == ""
