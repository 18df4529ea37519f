"""Every user mistake on a fastmask command line: exit status 2, one line on stderr that names the
problem, and nothing written to disk."""
import os

import pytest
import torch

from fastmask import analyze


def _analyze_cases(tmp_path):
    ckpt = tmp_path / "weights.pt"
    torch.save({"not": torch.zeros(1)}, ckpt)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 this is not a torch zip file at all")
    return {
        "missing checkpoint": (["--checkpoint", str(tmp_path / "nope.pt")], "does not exist"),
        "checkpoint is a folder": (["--checkpoint", str(tmp_path)], "not a file"),
        "zero-byte checkpoint": (["--checkpoint", str(empty)], "is empty (0 bytes)"),
        "corrupt checkpoint": (["--checkpoint", str(junk)], "truncated or corrupt"),
        "no state dict in it": (["--checkpoint", str(ckpt)], "weights.pt"),
        "bad prefix": (["--checkpoint", f"{ckpt}#student.nothing."], "weights.pt"),
        "unknown measure": (["--checkpoint", str(ckpt), "--measures", "attention,nmi"], "unknown measure(s) nmi"),
        "empty measures": (["--checkpoint", str(ckpt), "--measures", ","], "unknown measure"),
        "bad data path": (["--checkpoint", str(ckpt), "--data", str(tmp_path / "no_data")], "--data"),
        "bad builtin": (["--checkpoint", str(ckpt), "--data", "builtin:nope"], "builtin:shapes"),
        "bad max batches": (["--checkpoint", str(ckpt), "--max-batches", "0"], "--max-batches must be >= 1"),
        "labels mismatch": (["--checkpoint", str(ckpt), "--label", "a", "--label", "b"], "--label given 2 times"),
        "bad model arg": (["--checkpoint", str(ckpt), "--model-arg", "depth"], "key=value"),
    }




@pytest.mark.parametrize("case", [
    "missing checkpoint", "checkpoint is a folder", "zero-byte checkpoint", "corrupt checkpoint",
    "no state dict in it", "bad prefix", "unknown measure", "empty measures", "bad data path", "bad builtin",
    "bad max batches", "labels mismatch", "bad model arg",
])
def test_analyze_user_errors_are_one_line_exit_2(tmp_path, capsys, case):
    args, expected = _analyze_cases(tmp_path)[case]
    out = tmp_path / "out"
    code = analyze.main(args + ["--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("fastmask.analyze: "), err
    assert expected in err[0], err
    assert not out.exists()


def test_analyze_help_names_every_measure(capsys):
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for measure in analyze.ALL_MEASURES:
        assert f"  {measure} " in text
    for word in ("distance", "entropy", "NMI", "Hessian", "landscape"):
        assert word in text
    assert "``" not in text and "\\\\" not in text  # no raw RST


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMASK_DEBUG", "1")
    with pytest.raises(Exception, match="does not exist"):
        analyze.main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")])
