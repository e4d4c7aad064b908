"""Issue 12: bad or unusual input gets a clear error naming the argument, layer or path and
what to do, never NaN scores or a raw library error."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastinf

from _models import ce_loss


def mlp_data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def mlp(seed=0, act=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh() if act else nn.Identity(), nn.Linear(8, 3))


# --------------------------------------------------------------------------- item 5: damping
@pytest.mark.parametrize("damping", [float("inf"), float("-inf"), float("nan"), -0.1, True, "1"])
def test_non_finite_or_negative_damping_is_rejected(damping):
    with pytest.raises(ValueError, match=r"damping must be None \(heuristic\) or a finite float "
                                         r">= 0, got"):
        fastinf.EKFAC(mlp(), ce_loss, damping=damping, progress=False)


# --------------------------------------------------------------------------- item 12: loss name
def test_scalar_loss_names_the_argument_given():
    train = mlp_data()

    def mean_loss(m, b):
        return ce_loss(m, b).mean()
    with pytest.raises(ValueError, match=r"^loss_fn returned a scalar"):
        fastinf.EKFAC(mlp(), mean_loss, progress=False).fit(train)
    with pytest.raises(ValueError, match=r"^fisher_loss_fn returned a scalar"):
        fastinf.EKFAC(mlp(), ce_loss, fisher_loss_fn=mean_loss, progress=False).fit(train)


# --------------------------------------------------------------------------- items 4, 11: Λ = 0, overflow
class WithUnused(nn.Module):
    """``side`` is called in the forward but its output is not used by the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.side = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(5, 2)

    def forward(self, x):
        self.side(x)
        return self.b(torch.tanh(self.a(x)))


def _dead_relu():
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        m[0].weight.zero_()
        m[0].bias.fill_(-1.0)         # every unit of layer 0 dead: its gradient is 0
    return m, "0"


def _unused():
    return WithUnused(), "side"


@pytest.mark.parametrize("make", [_unused, _dead_relu])
def test_zero_gradient_layer_is_named_never_nan(make):
    model, name = make()
    train = mlp_data()
    with pytest.raises(ValueError, match=rf"layer '{name}'.*gradient is exactly zero.*"
                                         r"modules=.*damping"):
        fastinf.EKFAC(model, ce_loss, progress=False).fit(train)
    with pytest.raises(ValueError, match=rf"layer '{name}'"):
        fastinf.EKFAC(model, ce_loss, damping=0.0, progress=False).fit(train)
    # the two ways out named in the message work and give finite scores
    keep = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != name]
    for ek in (fastinf.EKFAC(model, ce_loss, modules=keep, progress=False).fit(train),
               fastinf.EKFAC(model, ce_loss, damping=1e-3, progress=False).fit(train)):
        assert torch.isfinite(ek.self_scores(train)).all()
        assert torch.isfinite(ek.pairwise_scores(mlp_data(3, 2), train)).all()


def _scaled(s, act=False):
    m = mlp(act=act)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(s)
    return m


def test_covariance_overflow_names_the_layer():
    """Inputs x 1e20: the input covariance of layer 0 overflows float32 (was a raw LinAlgError
    from eigh); weights x 1e20 saturate the tanh, so layer 0's gradient is exactly zero."""
    X, y = mlp_data()
    with pytest.raises(fastinf.capture.NonFiniteError,
                       match=r"input covariance of layer '0' overflows in torch.float32.*modules="):
        fastinf.EKFAC(mlp(), ce_loss, progress=False).fit((X * 1e20, y))
    with pytest.raises(ValueError, match=r"layer '0'.*gradient is exactly zero.*modules="):
        fastinf.EKFAC(_scaled(1e20, act=True), ce_loss, progress=False).fit((X, y))


def test_covariance_underflow_names_the_layer():
    with pytest.raises(ValueError, match=r"layer '0'.*underflows in torch.float32.*modules=.*damping"):
        fastinf.EKFAC(_scaled(1e-30), ce_loss, progress=False).fit(mlp_data())
    # factors handed in with Λ = 0 and no damping are refused the same way
    lam0 = {"0": dict(QA=torch.eye(6), QS=torch.eye(8), lam=torch.zeros(8, 6)),
            "2": dict(QA=torch.eye(9), QS=torch.eye(3), lam=torch.ones(3, 9))}
    with pytest.raises(ValueError, match=r"layer '0' has Λ \+ damping = 0"):
        fastinf.EKFAC.from_factors(mlp(), ce_loss, lam0, progress=False)


# --------------------------------------------------------------------------- items 7, 8: factor files
class FakeConv1D(nn.Module):
    """transformers' Conv1D (weight [in, out]) with the same gradient shape as Linear(5, 8)."""

    def __init__(self, nx, nf):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.fixture
def saved(tmp_path):
    model, train = mlp(), mlp_data()
    ek = fastinf.EKFAC(model, ce_loss, progress=False).fit(train)
    p = tmp_path / "f.pt"
    ek.save(p)
    return p, model, train, ek


def test_load_checks_module_types_and_weights(saved):
    import warnings
    p, model, train, ek = saved
    other_type = mlp()
    other_type[0] = FakeConv1D(5, 8)
    with pytest.raises(ValueError, match=r"module '0' is a FakeConv1D.*fitted on a Linear"):
        fastinf.EKFAC.load(p, other_type, ce_loss)
    with pytest.warns(UserWarning, match=r"f.pt.*fitted on other weights"):
        fastinf.EKFAC.load(p, mlp(seed=3), ce_loss, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # same weights: no warning, same scores
        ek2 = fastinf.EKFAC.load(p, model, ce_loss, progress=False)
    assert torch.equal(ek2.pairwise_scores(train, train), ek.pairwise_scores(train, train))


def test_truncated_or_missing_factor_file(saved):
    p, model, _, _ = saved
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"^{p}: cannot read the EK-FAC factor file.*truncated"):
        fastinf.EKFAC.load(p, model, ce_loss)
    p.unlink()
    with pytest.raises(FileNotFoundError, match=rf"no EK-FAC factor file at {p}"):
        fastinf.EKFAC.load(p, model, ce_loss)


def test_unwritable_factor_file(saved):
    p, model, _, ek = saved
    blocker = p.parent / "a-file"
    blocker.write_text("")
    for bad in (blocker / "f.pt", p.parent / "missing-dir" / "f.pt"):
        with pytest.raises(OSError, match=rf"^EKFAC.save: cannot write {bad}: .*still in memory"):
            ek.save(bad)
    before = p.read_bytes()
    ek.save(p)                                  # overwriting an existing file works, atomically
    assert p.read_bytes() == before and not list(p.parent.glob("*.tmp*"))


# --------------------------------------------------------------------------- items 8, 9, 10: stores
def _tracin():
    return fastinf.TracIn(mlp(), ce_loss, progress=False)


def test_overwrite_means_overwrite(tmp_path):
    train = mlp_data(12)
    fastinf.GradientStore.build(tmp_path / "s", _tracin(), train, batch_size=4, shard_size=4,
                                progress=False)
    ek = fastinf.EKFAC(mlp(), ce_loss, progress=False).fit(train)
    # different method and shard size, default resume=True: overwrite=True replaces the store
    s = fastinf.GradientStore.build(tmp_path / "s", ek, train, batch_size=4, shard_size=8,
                                    overwrite=True, progress=False)
    assert s.manifest["method"]["kind"] == "ekfac" and len(s.shards) == 2
    with pytest.raises(fastinf.StoreError, match=r"cannot resume.*shard_size.*pass overwrite=True "
                                                 r"to replace it$"):
        fastinf.GradientStore.build(tmp_path / "s", ek, train, batch_size=4, shard_size=4,
                                    progress=False)


def test_unwritable_store_fails_before_any_pass(tmp_path, monkeypatch):
    import errno
    import os
    calls = []

    def loss(m, b):
        calls.append(1)
        return ce_loss(m, b)
    tr = fastinf.TracIn(mlp(), loss, progress=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(fastinf.StoreError, match=rf"^{blocker / 's'}: cannot write a store here"):
        fastinf.GradientStore.build(blocker / "s", tr, mlp_data(8), progress=False)
    # a read-only filesystem (simulated: root ignores permission bits)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def ro_open(p, flags, *a, **k):
        if str(p).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(p))
        return real_open(p, flags, *a, **k)
    monkeypatch.setattr(os, "open", ro_open)
    with pytest.raises(fastinf.StoreError, match=rf"^{ro}: cannot write a store here: "
                                                 r"Read-only file system"):
        fastinf.GradientStore.build(ro, tr, mlp_data(8), progress=False)
    assert not calls


LOCK_SCRIPT = """
import os, sys, time, torch, torch.nn.functional as F
from torch import nn
import fastinf
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
g = torch.Generator().manual_seed(1)
train = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
gate = sys.argv[2] if len(sys.argv) > 2 else None
t0 = time.time()

def loss(m, b):
    while gate and not os.path.exists(gate) and time.time() - t0 < 120:
        time.sleep(0.05)                       # hold the build until the test opens the gate
    return F.cross_entropy(m(b[0]), b[1], reduction="none")

fastinf.GradientStore.build(sys.argv[1], fastinf.TracIn(model, loss, progress=False), train,
                            batch_size=4, shard_size=8, progress=False)
"""


def test_concurrent_builds_are_locked_out(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path
    script = tmp_path / "job.py"
    script.write_text(LOCK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               OMP_NUM_THREADS="1")
    store, gate = tmp_path / "s", tmp_path / "gate"
    first = subprocess.Popen([sys.executable, str(script), str(store), str(gate)], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (store / "build.lock").exists():
            assert first.poll() is None and time.time() - t0 < 120, "no build.lock appeared"
            time.sleep(0.1)
        second = subprocess.run([sys.executable, str(script), str(store)], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert (f"StoreError: {store}: the store is being built by pid {first.pid} on host "
                f"{socket.gethostname()}") in second.stderr
    finally:
        gate.write_text("")
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert not (store / "build.lock").exists()
    assert len(fastinf.GradientStore.open(store)) == 16


def test_stale_lock_is_recovered_by_resume(tmp_path):
    import json
    import socket
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = tmp_path / "s"
    store.mkdir()
    lock = store / "build.lock"
    train = mlp_data(12)
    lock.write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "started": "x"}))
    with pytest.raises(fastinf.StoreError, match=rf"being built by pid {dead.pid} on host "
                                                 r"elsewhere.*delete .*build.lock"):
        fastinf.GradientStore.build(store, _tracin(), train, batch_size=4, progress=False)
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    with pytest.raises(fastinf.StoreError, match=rf"pid {dead.pid} .* no longer runs.*resume=True"):
        fastinf.GradientStore.build(store, _tracin(), train, batch_size=4, resume=False,
                                    progress=False)
    s = fastinf.GradientStore.build(store, _tracin(), train, batch_size=4, progress=False)
    assert len(s) == 12 and not lock.exists()


# --------------------------------------------------------------------------- issue 11: factor memory
def test_factor_memory_budget_names_the_layer_before_any_pass():
    from fastinf.ekfac import factor_memory
    calls = []

    def loss(m, b):
        calls.append(1)
        return ce_loss(m, b)
    big = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 300))      # an "LM head"
    need = {n: factor_memory(*fastinf.capture.layer_shape(big[int(n)]), torch.float32)
            for n in ("0", "2")}
    # float32 factors, float32 eigendecomposition (the default): 3 float32 [300, 300] matrices
    assert need["2"] == 4 * (2 * 9 * 9 + 2 * 300 * 300 + 300 * 9) + 12 * 300 * 300
    assert factor_memory(300, 9, torch.float32, torch.float64) == need["2"] + 12 * 300 * 300
    with pytest.raises(MemoryError, match=r"layer '2' \(Linear, gradient \[300, 9\]\) needs about "
                                          r".* GiB.*max_factor_memory.*modules="):
        fastinf.EKFAC(big, loss, max_factor_memory=need["2"] - 1, progress=False).fit(mlp_data())
    with pytest.raises(MemoryError, match=r"the factors of the 2 tracked layers need.*'2'"):
        fastinf.EKFAC(big, loss, max_factor_memory=need["2"] + 1, progress=False).fit(mlp_data())
    with pytest.raises(MemoryError, match=r"layer '2' .* float64 eigendecomposition"):
        fastinf.EKFAC(big, loss, modules=["2"], max_factor_memory=need["2"],
                      eigh_dtype=torch.float64, progress=False).fit(mlp_data())
    assert not calls
    fastinf.EKFAC(big, loss, modules=["0"], max_factor_memory=need["0"],
                  progress=False).fit(mlp_data())
    for bad in (0, -1.0, float("nan"), "1GB"):
        with pytest.raises(ValueError, match="max_factor_memory must be"):
            fastinf.EKFAC(big, loss, max_factor_memory=bad)
