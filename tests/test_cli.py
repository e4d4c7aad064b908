"""The fastinf command line: info, demo (end to end on the bundled digits), one-line errors."""
import json
import subprocess
import sys

import pytest

from fastinf.__main__ import main


def _cli(*args, cwd):
    # cwd outside the repository: `python -m` puts cwd on sys.path, and the source folder
    # ./fastinf (without the compiled module) must not shadow the installed package.
    return subprocess.run([sys.executable, "-m", "fastinf", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fastinf" in out and "backends:" in out and "cpu" in out


@pytest.mark.parametrize("args,needle", [
    (["demo", "--method", "nope"], "unknown method 'nope'"),
    (["demo", "--noise", "1.5"], "noise must be in [0, 0.9)"),
])
def test_user_errors_are_one_line(args, needle, tmp_path):
    r = _cli(*args, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("fastinf: error:") and needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_demo_end_to_end(tmp_path):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn (fastinf[demo])")
    pytest.importorskip("matplotlib", reason="the demo needs matplotlib (fastinf[demo])")
    out = tmp_path / "demo"
    r = _cli("demo", "--quiet", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "flipped labels found" in r.stdout
    report = json.loads((out / "report.json").read_text())
    for name in ("mislabel_curve.png", "removal_curve.png", "proponents_ekfac.png",
                 "proponents_tracin.png"):
        assert (out / name).stat().st_size > 1000, name
    det = report["detection"]
    # Self-influence finds flipped labels far better than random inspection (20 % at top 20 %).
    assert det["ekfac"]["top20%"] >= 0.8, det
    assert det["tracin"]["top20%"] >= 0.6, det
    assert report["model"]["test_accuracy"] > 0.85
    rm = report["removal"]  # retrained without the top x % by self-influence / at random
    assert rm["fraction"] == [0.0, 0.05, 0.1, 0.2] and len(rm["influence"]) == len(rm["random"]) == 4
    assert min(rm["influence"] + rm["random"]) > 0.8, rm
    assert set(report["timings"]) >= {"train_s", "ekfac_fit_s", "ekfac_self_scores_s"}


def test_version(capsys):
    import fastinf

    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastinf {fastinf.__version__}"


def test_demo_out_unwritable_fails_before_training(tmp_path, monkeypatch):
    """`demo --out` into a place that cannot be written is one line, before any work is done."""
    from fastinf import demo

    def no_training(*a, **k):
        raise AssertionError("the demo trained before checking --out")

    monkeypatch.setattr(demo, "train", no_training)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for bad in (blocker, blocker / "sub"):
        with pytest.raises(demo.DemoError, match=f"--out {bad}: ") as ei:
            demo.run(out=str(bad), progress=False)
        assert "\n" not in str(ei.value)
    r = _cli("demo", "--out", str(blocker / "sub"), cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith(f"fastinf: error: --out {blocker / 'sub'}: ")
    assert len(r.stderr.strip().splitlines()) == 1
