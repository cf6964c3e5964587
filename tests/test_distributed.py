"""Distributed training under real torchrun (invariant 8): two gloo ranks on the CPU against one process.

One torchrun launch runs every scenario of tests/scripts/dist_run.py (a launch costs seconds, a
scenario a fraction of one); each test then compares rank 0's final weights (and gradients,
counters, logs) with a hand-written one-process PyTorch loop on the combined batches, float64,
rtol 1e-10, and checks that every rank ends with the same; the ``distributed="fsdp"`` scenarios
(tests/scripts/fsdp_run.py) run in the same launch, their sharded weights gathered whole. Each launch runs under a timeout in
its own process group, so a rank left waiting in a collective fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from trainflow import Step, Trainer, checkpoint
from trainflow.data.sharding import ShardedBatches, shard
from trainflow.distributed import check_mode, check_world_size_change, resolve

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from dist_setups import (  # noqa: E402
    WORLD, d_loss_sum, dataset, float32_data, float32_mlp, g_loss_sum, gan, gan_data, mlp, sq_sum, token_loss, tokens,
)

SCRIPT = Path(__file__).resolve().parent / "scripts" / "dist_run.py"
SRC = Path(__file__).resolve().parent.parent / "src"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
}
TIMEOUT = 240  # seconds for one launch: far above the normal 10-30 s, so only a hang reaches it
F = torch.nn.functional


def torchrun(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 dist_run.py ARGS``, killed
    (with every rank) when it runs past ``timeout``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "--max-restarts=0", str(SCRIPT), *args]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun {args} ran past {timeout} s (a rank waiting in a collective?):\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = torchrun("scenarios", str(out))
    # every scenario ran; then the launch's last run, into out/killed, ended with rank 1 killed by SIGKILL
    assert (out / "scenarios.done").exists(), done.stdout[-6000:]
    assert done.returncode != 0 and "Signal 9 (SIGKILL) received by PID" in done.stdout, done.stdout[-6000:]
    return out


def result(out: Path, name: str) -> dict:
    """Rank 0's record of scenario ``name``, after checking that every rank holds the same."""
    records = [torch.load(out / f"{name}.rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for other in records[1:]:
        for key in ("updates", "epoch", "skipped", "stop_reason", "world_size"):
            assert other[key] == records[0][key], (name, key)
        for kind in ("params", "grads"):
            assert other[kind].keys() == records[0][kind].keys()
            for k in other[kind]:
                assert torch.equal(other[kind][k], records[0][kind][k]), (name, kind, k)
    assert records[0]["world_size"] == WORLD
    return records[0]


def assert_same(got: dict[str, torch.Tensor], models: dict[str, torch.nn.Module], grads: bool = False) -> None:
    """Every parameter (or gradient) of ``models`` equals ``got``'s, float64, rtol 1e-10."""
    expected = {f"{m}.{k}": (p.grad if grads else p.detach())
                for m, model in models.items() for k, p in model.named_parameters()}
    expected = {k: v for k, v in expected.items() if v is not None}
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-13, msg=k)


def global_batches(ds, per_rank: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=per_rank * WORLD, shuffle=shuffle)


# ---------------------------------------------------------------- replicate, exact against one process


def test_accumulate_uneven_windows_metrics_validation_and_writers(runs):
    r = result(runs, "accum")
    model = mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = list(global_batches(dataset(22, seed=2), 4))  # 8, 8, 6 samples
    assert [len(b[0]) for b in batches] == [8, 8, 6]
    for _ in range(2):
        window_losses, sq, n_all = [], 0.0, 0
        for window in (batches[:2], batches[2:]):
            opt.zero_grad()
            n = sum(len(x) for x, _ in window)
            loss = sum(sq_sum(model, x, y) for x, y in window) / n
            sq, n_all = sq + loss.item() * n, n_all + n
            loss.backward()
            opt.step()
            window_losses.append(loss.item())
    assert_same(r["params"], {"m": model})
    assert r["updates"] == 4 and r["epoch"] == 2
    assert r["logs"]["fit/loss"] == pytest.approx(sum(window_losses) / 2, rel=1e-10)  # global means
    assert r["logs"]["train/mse"] == pytest.approx(sq / n_all, rel=1e-10)  # torchmetrics synced over the ranks
    x, y = dataset(11, seed=3).tensors
    # validation sums its losses in float32 (as in one process)
    assert r["logs"]["val/loss"] == pytest.approx(F.mse_loss(model(x), y).item(), rel=1e-6)


def test_only_rank_zero_writes(runs):
    r0 = result(runs, "accum")
    r1 = torch.load(runs / "accum.rank1.pt", weights_only=True)
    assert (r0["printed"], r1["printed"]) == (4, 0)  # LossLogger(every=1): 4 updates, printed on rank 0 only
    written = sorted(p.relative_to(runs / "writers.r0").as_posix() for p in (runs / "writers.r0").rglob("*")
                     if p.is_file())
    assert written == ["checkpoints/ckpt-u000000002-e1.pt", "checkpoints/ckpt-u000000004-e2.pt",
                       "checkpoints/index.json", "metrics.csv"]
    assert [p for p in (runs / "writers.r1").rglob("*") if p.is_file()] == []


def test_shuffled_loader_equals_one_process_with_the_same_seed(runs):
    r = result(runs, "shuffled")
    model = mlp(4)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(5)
    loader = global_batches(dataset(21, seed=6), 4, shuffle=True)
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    assert_same(r["params"], {"m": model})
    assert r["updates"] == 9


def test_average_with_uneven_token_counts(runs):
    r = result(runs, "tokens")
    model = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64))
        model.bias.fill_(0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = list(global_batches(tokens(14, seed=7), 3))  # 6, 6, 2 sequences
    for _ in range(2):
        for window in (batches[:2], batches[2:]):
            opt.zero_grad()
            sums = [token_loss(model, *b) for b in window]
            (sum(s for s, _ in sums) / sum(c for _, c in sums)).backward()
            opt.step()
    assert_same(r["params"], {"m": model})


def test_dataset_not_dividing_leaves_a_rank_empty_and_micro_batches(runs):
    r = result(runs, "empty")
    model = mlp(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = list(global_batches(dataset(17, seed=9), 4))
    assert [len(b[0]) for b in batches] == [8, 8, 1]  # rank 1's share of the last one is empty
    for _ in range(2):
        for x, y in batches:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    assert_same(r["params"], {"m": model})
    assert r["updates"] == 6


def skipping_loop(model_seed: int, data_seed: int) -> torch.nn.Module:
    """The one-process loop of the non-finite scenarios: 2 epochs of 17 samples in global batches
    of 4, the batch holding the NaN (batch 1, a row of rank 1's) skipped."""
    model = mlp(model_seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = list(global_batches(dataset(17, seed=data_seed, nan_at=9), 4))
    for _ in range(2):
        for i, (x, y) in enumerate(batches):
            if i == 1:
                continue
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    return model


def test_a_nonfinite_loss_on_one_rank_makes_every_rank_skip(runs):
    r = result(runs, "nonfinite")  # every rank: the same counters and weights
    assert (r["updates"], r["skipped"]) == (6, 2)
    assert_same(r["params"], {"m": skipping_loop(8, 9)})


def test_a_nonfinite_loss_on_one_rank_raises_on_every_rank(runs):
    r0, r1 = (torch.load(runs / f"raise.rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["raised"] == r1["raised"] == (
        "Step 'fit': loss 'loss' is nan at update 2. Lower the learning rate, clip gradients "
        "(Step(..., clip_grad_norm=1.0)), or check the data for NaN/inf."
    )
    assert r0["updates"] == r1["updates"] == 1


def test_gan_d3_g1_with_isolation(runs):
    r = result(runs, "gan")
    G, D = gan(10)
    d_opt = torch.optim.Adam(D.parameters(), lr=0.01)
    g_opt = torch.optim.SGD(G.parameters(), lr=0.05)
    batches = list(global_batches(gan_data(24, seed=11), 4))
    plan = [("D", 0), ("D", 1), ("D", 2), ("G", 2)] * 2 + [("D", 0)]
    for who, i in plan:
        real, z, _ = batches[i]
        if who == "D":
            d_opt.zero_grad()
            (d_loss_sum(G, D, real, z) / len(real)).backward(inputs=list(D.parameters()))
            d_opt.step()
        else:
            g_opt.zero_grad()
            (g_loss_sum(G, D, z) / len(z)).backward(inputs=list(G.parameters()))
            g_opt.step()
    assert_same(r["params"], {"G": G, "D": D})
    # non-owned gradients untouched: D's from its own last step, G's from the G step before it
    assert_same(r["grads"], {"G": G, "D": D}, grads=True)


def test_partial_ownership_of_one_model(runs):
    r = result(runs, "partial")
    model = mlp(12)
    body = torch.optim.SGD(model[0].parameters(), lr=0.1)
    head = torch.optim.SGD(model[2].parameters(), lr=0.2)
    steps = [(body, list(model[0].parameters()), 2), (head, list(model[2].parameters()), 1)]
    batches = list(global_batches(dataset(26, seed=13), 2))  # 4 x 6, then 2
    current = 0  # the cycle position persists across epochs
    for _ in range(2):
        i = 0
        while True:
            opt, params, accumulate = steps[current]
            window = batches[i:i + accumulate]
            if not window:
                break
            i += len(window)
            opt.zero_grad()
            n = sum(len(x) for x, _ in window)
            (sum(sq_sum(model, x, y) for x, y in window) / n).backward(inputs=params)
            opt.step()
            current = 1 - current
    assert_same(r["params"], {"m": model})
    assert_same(r["grads"], {"m": model}, grads=True)


def test_custom_step(runs):
    r = result(runs, "custom")
    G, D = gan(14)
    d_opt = torch.optim.Adam(D.parameters(), lr=0.01)
    g_opt = torch.optim.Adam(G.parameters(), lr=0.02)
    batches = list(global_batches(gan_data(20, seed=15), 3))  # 6, 6, 6, 2
    for _ in range(2):
        for real, z1, z2 in batches:
            labels = torch.cat([torch.zeros(len(real), 1), torch.ones(len(real), 1)]).double()
            d_loss = F.binary_cross_entropy_with_logits(D(torch.cat([G(z1), real])), labels)
            d_opt.zero_grad()
            d_loss.backward(inputs=list(D.parameters()))
            d_opt.step()
            g_loss = F.binary_cross_entropy_with_logits(D(G(z2)), torch.ones(len(real), 1).double())
            g_opt.zero_grad()
            g_loss.backward(inputs=list(G.parameters()))
            g_opt.step()
    assert_same(r["params"], {"G": G, "D": D})
    assert r["losses"]["gan/d_loss"] == pytest.approx(d_loss.item(), rel=1e-10)  # logged: global means
    assert r["losses"]["gan/g_loss"] == pytest.approx(g_loss.item(), rel=1e-10)


def test_a_step_on_two_streams_with_two_normalisers(runs):
    r = result(runs, "streams")
    model = mlp(23)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    valid_loader = global_batches(dataset(10, seed=25), 2)
    valid = iter(valid_loader)
    for _ in range(2):
        for x, y in global_batches(dataset(18, seed=24), 2):
            try:
                vx, vy = next(valid)
            except StopIteration:
                valid = iter(valid_loader)
                vx, vy = next(valid)
            opt.zero_grad()
            (F.mse_loss(model(x), y) + 0.5 * sq_sum(model, vx, vy) / len(vx)).backward()
            opt.step()
    assert_same(r["params"], {"m": model})
    assert r["updates"] == 10


def test_a_list_of_batches_is_read_whole_by_every_rank(runs):
    r = result(runs, "list")
    model = mlp(26)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = dataset(12, seed=27).tensors
    for _ in range(2):
        for i in (0, 4, 8):
            opt.zero_grad()
            F.mse_loss(model(x[i:i + 4]), y[i:i + 4]).backward()
            opt.step()
    assert_same(r["params"], {"m": model})
    assert r["updates"] == 6


def test_a_stop_on_one_rank_stops_every_rank(runs):
    r = result(runs, "stop")  # rank 1 alone asked, after update 3
    assert (r["updates"], r["stop_reason"]) == (3, "requested")


# ---------------------------------------------------------------- fsdp, exact against one process


def test_fsdp_gan_d3_g1_two_sharded_models_two_adams_with_isolation(runs):
    r = result(runs, "fsdp_gan")
    G, D = gan(40)
    d_opt = torch.optim.Adam(D.parameters(), lr=0.01)
    g_opt = torch.optim.Adam(G.parameters(), lr=0.02)
    batches = list(global_batches(gan_data(24, seed=41), 4))
    for who, i in [("D", 0), ("D", 1), ("D", 2), ("G", 2)] * 2 + [("D", 0)]:
        real, z, _ = batches[i]
        if who == "D":
            d_opt.zero_grad()
            (d_loss_sum(G, D, real, z) / len(real)).backward(inputs=list(D.parameters()))
            d_opt.step()
        else:
            g_opt.zero_grad()
            (g_loss_sum(G, D, z) / len(z)).backward(inputs=list(G.parameters()))
            g_opt.step()
    assert_same(r["params"], {"G": G, "D": D})
    assert_same(r["grads"], {"G": G, "D": D}, grads=True)  # non-owned gradients untouched


def test_fsdp_accumulate_uneven_windows_micro_batches_and_groups_by_name(runs):
    r = result(runs, "fsdp_accum")
    model = mlp(42)
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}],
                          lr=0.1, momentum=0.9)
    batches = list(global_batches(dataset(21, seed=43), 4))
    assert [len(b[0]) for b in batches] == [8, 8, 5]  # the last: 3 rows (2 micro-batches) and 2 (1)
    for _ in range(2):
        for window in (batches[:2], batches[2:]):
            opt.zero_grad()
            (sum(sq_sum(model, x, y) for x, y in window) / sum(len(x) for x, _ in window)).backward()
            opt.step()
    assert_same(r["params"], {"m": model})
    assert r["updates"] == 4
    x, y = dataset(9, seed=3).tensors  # validation runs every rank's share, the empty one too
    assert r["logs"]["val/loss"] == pytest.approx(F.mse_loss(model(x), y).item(), rel=1e-6)


def test_fsdp_partial_ownership_clipping_on_the_global_norm_and_an_empty_rank(runs):
    r = result(runs, "fsdp_partial")
    model = mlp(44)
    body = torch.optim.SGD(model[0].parameters(), lr=0.1)
    head = torch.optim.SGD(model[2].parameters(), lr=0.2)
    steps = [(body, list(model[0].parameters()), 2, 0.05), (head, list(model[2].parameters()), 1, None)]
    batches = list(global_batches(dataset(17, seed=45), 2))
    assert [len(b[0]) for b in batches] == [4, 4, 4, 4, 1]  # rank 1's share of the last one is empty
    current, clipped = 0, []
    for _ in range(2):
        i = 0
        while i < len(batches):
            opt, params, accumulate, clip = steps[current]
            window = batches[i:i + accumulate]
            i += len(window)
            opt.zero_grad()
            (sum(sq_sum(model, x, y) for x, y in window) / sum(len(x) for x, _ in window)).backward(inputs=params)
            if clip is not None:
                clipped.append(torch.nn.utils.clip_grad_norm_(params, clip).item() > clip)
            opt.step()
            current = 1 - current
    assert all(clipped)  # every body update was clipped: the global norm decides
    assert_same(r["params"], {"m": model})
    assert_same(r["grads"], {"m": model}, grads=True)


def test_fsdp_a_nonfinite_loss_on_one_rank_makes_every_rank_skip(runs):
    r = result(runs, "fsdp_nonfinite")
    assert (r["updates"], r["skipped"]) == (6, 2)
    assert_same(r["params"], {"m": skipping_loop(46, 47)})


def test_fsdp_float32_reduce_scatter_is_a_plain_sum_on_gloo(runs):
    r = result(runs, "fsdp_float32")  # gloo has no pre-multiplied sum: FSDP2 is set to ReduceOp.SUM
    model = float32_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in global_batches(float32_data(), 2):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    for k, p in model.named_parameters():
        torch.testing.assert_close(r["params"][f"m.{k}"], p.detach(), rtol=1e-5, atol=1e-6, msg=k)


def test_fsdp_refuses_a_stepped_optimizer_and_two_normalisers_on_every_rank(runs):
    r0, r1 = (torch.load(runs / f"fsdp_refused.rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0 == r1
    assert r0["stepped"].startswith(
        "Trainer: distributed='fsdp' shards the models, so the optimizers are rebound to the sharded parameters; "
        "Adam optimizer #0 has stepped already (it holds state for 4 parameter(s)")
    assert "Received: an optimizer with state. Build the Trainer before stepping the optimizers" in r0["stepped"]
    assert r0["normalisers"].startswith(
        "Step 'two': under distributed='fsdp' a loss must have one normaliser, but its terms are normalised by 2: "
        "[\"Average 'sum'\", 'samples']. Received:")
    assert "use distributed='replicate'" in r0["normalisers"]


# ---------------------------------------------------------------- resume


@pytest.mark.filterwarnings("ignore:The state holds callback state")  # the 2-rank run had a CSVLogger
def test_world_size_change_is_refused_unless_allowed(runs):
    path = checkpoint.latest(runs / "writers.r0" / "checkpoints")  # saved by the 2-rank run at update 4
    model = mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = DataLoader(dataset(22, seed=2), batch_size=8)
    trainer = Trainer(model, [Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="fit", accumulate=2)],
                      metrics={"train/mse": __import__("torchmetrics").MeanSquaredError().double()},
                      progress=False)
    with pytest.raises(ValueError, match=r"saved by a run of world size 2, this run has world size 1\. "
                                         r"Received: world_size=1 .*world_size_change='allow'"):
        trainer.fit(data, epochs=3, resume=path)
    with pytest.warns(UserWarning, match="saved with world size 2 under world size 1"):
        trainer.fit(data, epochs=3, resume=path, world_size_change="allow")
    # exact up to rounding: the third epoch of the one-process loop from the same start
    ref = mlp(1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    batches = list(DataLoader(dataset(22, seed=2), batch_size=8))
    for _ in range(3):
        for window in (batches[:2], batches[2:]):
            ref_opt.zero_grad()
            (sum(sq_sum(ref, x, y) for x, y in window) / sum(len(x) for x, _ in window)).backward()
            ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-13)


@pytest.fixture(scope="module")
def resumed(runs) -> Path:
    """The killed replicate run resumed under torchrun; the same launch then runs the fsdp run whose
    rank 1 dies by SIGKILL mid-window (into runs/fsdp_killed), which ends it."""
    killed = runs / "killed"  # the scenarios' launch ended there: rank 1 killed in update 6's second chunk
    assert not (killed / "resume.digest").exists()
    newest = checkpoint.latest(killed / "run" / "checkpoints")
    assert newest is not None and newest.name == "ckpt-u000000005-e2.pt"  # mid-epoch 3
    done = torchrun("resume", str(killed), "--then-fsdp-killed", str(runs / "fsdp_killed"))
    assert (killed / "resume.digest").exists(), done.stdout[-6000:]
    assert done.returncode != 0 and "Signal 9 (SIGKILL) received by PID" in done.stdout, done.stdout[-6000:]
    return runs


@pytest.mark.slow
def test_sigkill_of_one_rank_mid_window_then_resume_is_bit_identical(resumed):
    expected = (resumed / "uninterrupted" / "resume.digest").read_text()  # the same run, never interrupted
    assert expected.split()[1] == "8"
    assert (resumed / "killed" / "resume.digest").read_text() == expected


@pytest.mark.slow
def test_fsdp_dcp_checkpoint_sigkill_of_one_rank_then_resume_is_bit_identical(resumed):
    killed = resumed / "fsdp_killed"
    folder = killed / "run" / "checkpoints"
    assert not list(killed.glob("resume.digest.*"))
    # every rank wrote its shard into one folder per checkpoint; nothing temporary is left as a checkpoint
    assert [p.name for p in checkpoint.checkpoints(folder)] == ["ckpt-u000000004-e2.dcp", "ckpt-u000000005-e2.dcp"]
    assert sorted(p.name for p in checkpoint.latest(folder).iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "trainflow.pt"]
    assert [e["file"] for e in checkpoint.read_index(folder)] == ["ckpt-u000000004-e2.dcp", "ckpt-u000000005-e2.dcp"]
    newest = checkpoint.latest(folder)
    whole = checkpoint.load(newest)  # read whole here, to compare with what each rank reads of it
    left = folder / ".ckpt-u000000006-e2.dcp.x1y2.tmp"  # what a kill during a save leaves
    left.mkdir()
    (left / "__0_0.distcp").write_bytes(b"partial")
    done = torchrun("fsdp-resume", str(killed))
    assert done.returncode == 0, done.stdout[-6000:]
    assert not left.exists()  # removed by rank 0 when fit starts
    for rank in range(WORLD):  # each rank's slices and the rest of its state, SHA-256, as never interrupted
        expected = (resumed / "fsdp_uninterrupted" / f"resume.digest.rank{rank}").read_text()
        assert expected.split()[1] == "8"
        assert (killed / f"resume.digest.rank{rank}").read_text() == expected
    # each rank read its own rows of every sharded tensor (dim 0, as torch.chunk splits it: the last
    # layer's one-row bias is rank 0's, rank 1 reads none of it), never the whole checkpoint
    sharded = 0
    for rank in range(WORLD):
        [read] = torch.load(killed / f"resume.read.rank{rank}.pt", weights_only=True)
        assert read["file"] == newest.name and read["mesh"] == tuple(range(WORLD))
        for key, (is_sharded, got) in read["tensors"].items():
            value = whole
            for part in key.strip("/").split("/"):  # an optimizer's state is keyed by int
                value = value[int(part)] if part.isdigit() and int(part) in value else value[part]
            if is_sharded:
                sharded += 1
                rows = value.chunk(WORLD)
                want = rows[rank] if rank < len(rows) else value[:0]
                assert torch.equal(got, want), (rank, key)
            else:
                assert torch.equal(got, value), (rank, key)
    assert sharded == WORLD * 3 * 4  # 4 parameters, each with its Adam moments, on every rank


def test_fsdp_dcp_checkpoint_loads_in_one_process_without_a_group(runs):
    import torch.distributed as dist

    path = checkpoint.latest(runs / "fsdp_uninterrupted" / "run" / "checkpoints")
    assert path.name == "ckpt-u000000008-e4.dcp" and not dist.is_initialized()
    state = checkpoint.load(path)  # read whole: every tensor full
    final = result(runs / "fsdp_uninterrupted", "fsdp_resume")  # the run's own end, gathered whole
    for k, v in state["models"]["model"].items():
        assert torch.equal(v, final["params"][f"m.{k}"]), k
    assert state["ranks"]["world_size"] == WORLD and state["loop"]["updates"] == 8
    model = mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.load_state_dict(state["models"]["model"])
    opt.load_state_dict(state["optimizers"]["fit"])  # torch's own layout: a plain optimizer takes it
    assert int(opt.state_dict()["state"][0]["step"]) == 8


@pytest.mark.filterwarnings("ignore:The state holds callback state")
def test_fsdp_checkpoint_under_another_world_size_is_refused_unless_allowed(runs):
    """The 2-rank fsdp run's checkpoint at update 7 (mid-epoch 4), resumed in one process: refused;
    allowed, it continues exactly up to rounding to the 2-rank run's end."""
    path = checkpoint.checkpoints(runs / "fsdp_uninterrupted" / "run" / "checkpoints")[0]
    assert path.name == "ckpt-u000000007-e3.dcp"
    model = mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = Trainer(model, [Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="fit", accumulate=2)],
                      progress=False)
    data = DataLoader(dataset(27, seed=52), batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match=r"saved by a run of world size 2, this run has world size 1\. "
                                         r"Received: world_size=1 .*world_size_change='allow'"):
        trainer.fit(data, epochs=4, resume=path)
    with pytest.warns(UserWarning, match="saved with world size 2 under world size 1"):
        trainer.fit(data, epochs=4, resume=path, world_size_change="allow")
    assert trainer.updates == 8
    final = result(runs / "fsdp_uninterrupted", "fsdp_resume")
    assert_same(final["params"], {"m": model})


# ---------------------------------------------------------------- in one process


def test_sharding_is_world_size_invariant_without_padding():
    data = DataLoader(range(11), batch_size=2, shuffle=False)
    shares = [list(shard(data, rank, 3)) for rank in range(3)]  # global batches of 6: 6 and 5 samples
    assert [[b.tolist() for b in s] for s in shares] == [[[0, 3], [6, 9]], [[1, 4], [7, 10]], [[2, 5], [8]]]
    for (a, b, c), big in zip(zip(*shares), DataLoader(range(11), batch_size=6)):
        assert sorted(torch.cat([a, b, c]).tolist()) == big.tolist()
    assert len(shares[0]) == len(ShardedBatches(range(11), 2, False, 0, 3)) == 2
    assert list(ShardedBatches(range(11), 2, True, 2, 3)) == [[2, 5]]  # drop_last drops the short global batch


def test_sharding_refuses_what_it_cannot_shard():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(4))

    with pytest.raises(ValueError, match=r"IterableDataset \(Stream\), which trainflow cannot shard\. Received"):
        shard(DataLoader(Stream(), batch_size=2), 0, 2)
    sampler = torch.utils.data.BatchSampler(range(4), 2, False)
    with pytest.raises(ValueError, match=r"has a batch_sampler \(batch_size=None\)\. Received: DataLoader"):
        shard(DataLoader(range(4), batch_sampler=sampler), 0, 2)
    padded = DataLoader(range(5), batch_size=2,
                        sampler=torch.utils.data.DistributedSampler(range(5), num_replicas=2, rank=0))
    with pytest.warns(UserWarning, match="DistributedSampler, which is kept as it is: it pads"):
        assert shard(padded, 0, 2) is padded


def test_modes_and_arguments_are_checked():
    with pytest.raises(ValueError, match=r"`distributed` must be one of .*Received: distributed='ddp'"):
        check_mode("ddp")
    with pytest.raises(ValueError, match=r"`world_size_change` must be one of .*Received: world_size_change='yes'"):
        check_world_size_change("yes")
    assert resolve("auto", torch.device("cpu")) is None  # not under torchrun: one process
    assert resolve("off", torch.device("cpu")) is None
    if "WORLD_SIZE" not in os.environ:
        with pytest.raises(ValueError, match=r"needs several processes, .*Received: distributed='replicate'"):
            resolve("replicate", torch.device("cpu"))
        with pytest.raises(ValueError, match=r"distributed='fsdp' needs several processes, .*Received: "
                                             r"distributed='fsdp'\. Launch the script with `torchrun"):
            Trainer(torch.nn.Linear(1, 1), [Step(lambda b: b, torch.optim.SGD(torch.nn.Linear(1, 1).parameters(),
                                                                              lr=0.1))], distributed="fsdp")


@pytest.fixture
def group_of_one():
    """A process group of one (gloo, in this process): what fsdp mode shards over at world size 1."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp_refuses_what_it_cannot_make_exact(group_of_one):
    model = mlp(60)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"distributed='fsdp' cannot train the custom step 'gan'\. Received: "
                                         r"Step\.custom\(\.\.\.\) named 'gan'\. .*use distributed='replicate'"):
        Trainer(model, [Step.custom(lambda b, ctx: None, [opt], name="gan")], distributed="fsdp")
    with pytest.raises(ValueError, match=r"cannot train compiled models\. Received: compile=True\. Pass compile=False"):
        Trainer(model, [Step(mse_of(model), opt)], compile=True, distributed="fsdp")
    with pytest.raises(ValueError, match=r"cannot train under float16 loss scaling\. Received: "
                                         r"precision='16-mixed'\. .*use precision='bf16-mixed'"):
        Trainer(model, [Step(mse_of(model), opt)], precision="16-mixed", distributed="fsdp")
    scale = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    with_free = torch.optim.SGD([*model.parameters(), scale], lr=0.1)
    with pytest.raises(ValueError, match=r"cannot train tensors outside the models\. Received: an optimizer "
                                         r"\(SGD\) that trains 1 tensor\(s\) of shape\(s\) \[\(1,\)\] in none of "
                                         r"`models`\. Put them in a module"):
        Trainer(model, [Step(mse_of(model), with_free)], distributed="fsdp")
    shared = torch.nn.Linear(2, 2, dtype=torch.float64)
    two = {"a": torch.nn.Sequential(shared, torch.nn.Linear(2, 1, dtype=torch.float64)),
           "b": torch.nn.Sequential(shared, torch.nn.Linear(2, 1, dtype=torch.float64))}
    with pytest.raises(ValueError, match=r"cannot train a parameter held by two models\. Received: models 'a' and "
                                         r"'b' share a parameter of shape \(2, 2\)\. .*pass the module they share as "
                                         r"a model of its own"):
        Trainer(two, [Step(lambda b: two["a"](b).sum(), torch.optim.SGD(two["a"].parameters(), lr=0.1))],
                distributed="fsdp")
    # a refused Trainer leaves the models as they were: not sharded, their optimizers not rebound
    from torch.distributed.tensor import DTensor

    assert type(model) is torch.nn.Sequential and type(two["a"]) is torch.nn.Sequential
    assert not any(isinstance(p, DTensor) for p in [*model.parameters(), *with_free.param_groups[0]["params"]])
    from trainflow.callbacks import SampleGrid

    G, D = gan(63)
    grid = SampleGrid(G, torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"cannot run the callback SampleGrid, which calls model 'G' \(its "
                                         r"`generator`\) on rank 0 only .*Received: callbacks=\[SampleGrid\(\.\.\.\)\]"):
        Trainer({"G": G, "D": D}, [Step(lambda b: D(G(b)).mean(), torch.optim.SGD(G.parameters(), lr=0.1))],
                callbacks=[grid], distributed="fsdp")
    assert not any(isinstance(p, DTensor) for p in [*G.parameters(), *D.parameters()])


def test_a_dcp_checkpoint_that_is_damaged_or_would_run_code_is_refused(group_of_one, tmp_path):
    import pickle

    import torch.distributed as dist

    model = mlp(64)
    trainer = Trainer(model, [Step(mse_of(model), torch.optim.Adam(model.parameters(), lr=0.1), name="fit")],
                      progress=False, distributed="fsdp")
    trainer.fit([dataset(4, seed=65).tensors], epochs=1)
    folder = checkpoint.save_sharded(trainer.state_dict(), checkpoint.path_for(tmp_path, 1))
    assert checkpoint.load(folder)["loop"]["updates"] == 1
    with pytest.raises(ValueError, match=r"checkpoint\.save: `state` holds sharded tensors \(DTensor\), .*one rank "
                                         r"would hold that rank's slices only\. Received: a sharded state for "
                                         r"path='.*ckpt-u000000002\.pt'\. Call checkpoint\.save_sharded"):
        checkpoint.save(trainer.state_dict(), checkpoint.path_for(tmp_path, 2))
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob(".*.tmp"))  # nothing written
    dist.barrier()
    for damage, error, message in [
        (lambda f: (f / "__0_0.distcp").write_bytes(b"torn"), ValueError, r"is truncated or corrupt and cannot be read"),
        (lambda f: (f / ".metadata").unlink(), ValueError,
         r"is truncated or corrupt .*a sharded checkpoint folder without 'trainflow\.pt' or '\.metadata'"),
        (lambda f: (f / ".metadata").write_bytes(pickle.dumps(__import__("collections").Counter("ab"))), ValueError,
         r"was refused: its '\.metadata' would build objects other than torch\.distributed\.checkpoint's metadata "
         r"\(WeightsUnpickler error: Unsupported global: collections\.Counter\)"),
        (lambda f: (f / ".metadata").write_bytes(b"\x80\x04"), ValueError, r"is truncated or corrupt .*'\.metadata'"),
        (lambda f: (f / ".metadata").write_bytes(pickle.dumps(__import__("torch.distributed.checkpoint.format_utils", fromlist=["x"]).dcp_to_torch_save)),
         ValueError, r"was refused: its '\.metadata' would build objects other than .*Unsupported global: "
                     r"torch\.distributed\.checkpoint\.format_utils\.dcp_to_torch_save"),
        (lambda f: (f / ".metadata").write_bytes(pickle.dumps(__import__("collections").OrderedDict())), ValueError,
         r"is truncated or corrupt .*'\.metadata' lists items other than tensors"),
    ]:
        copy = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}.dcp"
        __import__("shutil").copytree(folder, copy)
        damage(copy)
        with pytest.raises(error, match=message):
            checkpoint.load(copy)
        with pytest.raises(error, match=message):  # read on the mesh, as an fsdp trainer's resume reads it
            checkpoint.load(copy, mesh=trainer._ranks.mesh)
    sliced = checkpoint.load(folder, mesh=trainer._ranks.mesh)["models"]["model"]
    assert all(type(v).__name__ == "DTensor" and torch.equal(v.full_tensor(), w.full_tensor())
               for v, w in zip(sliced.values(), trainer.state_dict()["models"]["model"].values()))


def mse_of(model):
    return lambda b: F.mse_loss(model(b[0]), b[1])


def test_fsdp_at_world_size_one_equals_one_process(group_of_one):
    """fsdp in a group of one: sharding, rebinding, the sum form and the division, against a plain loop."""
    model = mlp(61)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = Trainer(model, [Step(mse_of(model), opt, name="fit", accumulate=2, clip_grad_norm=0.1)],
                      progress=False, distributed="fsdp")
    assert type(model).__name__ == "FSDPSequential" and trainer.world_size == 1
    trainer.fit(DataLoader(dataset(21, seed=62), batch_size=4), epochs=2)
    ref = mlp(61)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    batches = list(DataLoader(dataset(21, seed=62), batch_size=4))
    for _ in range(2):
        for i in range(0, len(batches), 2):
            window = batches[i:i + 2]
            ref_opt.zero_grad()
            (sum(sq_sum(ref, x, y) for x, y in window) / sum(len(x) for x, _ in window)).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
            ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.filterwarnings("ignore:The state holds callback state")
def test_fsdp_resumes_a_two_rank_checkpoint_in_a_group_of_one(runs, group_of_one):
    """A sharded checkpoint read on the mesh of another world size (world_size_change="allow"): DCP
    gives the one rank every row of every tensor, and the run ends where the 2-rank run ended."""
    path = checkpoint.checkpoints(runs / "fsdp_uninterrupted" / "run" / "checkpoints")[0]
    assert path.name == "ckpt-u000000007-e3.dcp"
    model = mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = Trainer(model, [Step(mse_of(model), opt, name="fit", accumulate=2)], progress=False,
                      distributed="fsdp")
    with pytest.warns(UserWarning, match="saved with world size 2 under world size 1"):
        trainer.fit(DataLoader(dataset(27, seed=52), batch_size=8, shuffle=True), epochs=4, resume=path,
                    world_size_change="allow")
    assert trainer.updates == 8
    final = result(runs / "fsdp_uninterrupted", "fsdp_resume")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.full_tensor(), final["params"][f"m.{name}"], rtol=1e-10, atol=1e-13, msg=name)


def test_fsdp_with_a_frozen_layer_equals_one_process(group_of_one):
    """A model whose first layer is frozen: the frozen weights stay as they were, the rest trains as in one process."""
    def frozen_mlp():
        model = mlp(66)
        model[0].requires_grad_(False)
        return model

    model = frozen_mlp()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    trainer = Trainer(model, [Step(mse_of(model), opt, name="fit", accumulate=2)], progress=False, distributed="fsdp")
    trainer.fit(DataLoader(dataset(12, seed=67), batch_size=4), epochs=2)
    ref = frozen_mlp()
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    batches = list(DataLoader(dataset(12, seed=67), batch_size=4))
    for _ in range(2):
        for i in range(0, len(batches), 2):
            window = batches[i:i + 2]
            ref_opt.zero_grad()
            (sum(sq_sum(ref, x, y) for x, y in window) / sum(len(x) for x, _ in window)).backward()
            ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.requires_grad == q.requires_grad, name
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-10, atol=1e-13, msg=name)
    assert torch.equal(model[0].weight.full_tensor(), mlp(66)[0].weight.detach())  # frozen: untouched


def test_one_process_trainer_is_global_zero():
    model = torch.nn.Linear(2, 1)
    trainer = Trainer(model, [Step(lambda b: model(b).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.1))])
    assert (trainer.is_global_zero, trainer.world_size) == (True, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.fit([torch.ones(2, 2)], epochs=1)
    assert "ranks" not in trainer.state_dict()  # one process: the state is as before


@pytest.mark.slow
def test_cli_nproc_launches_torchrun_and_rank_zero_writes(tmp_path):
    out = tmp_path / "mlp"
    cmd = [sys.executable, "-m", "trainflow.cli", "run", "mlp", "--nproc", "2", "--epochs", "1", "--out", str(out),
           "--no-progress"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT, start_new_session=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("'mlp' finished in") == 1  # rank 0 speaks; rank 1 trains quietly
    assert done.stdout.count("epoch 1/1") == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "curves.png", "metrics.csv", "weights.pt"]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,updates") and rows[1].startswith("1,12,")  # 1,438 digits / (2 x 64) per update


def test_cli_nproc_refuses_a_search(capsys):
    from trainflow.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["run", "nas-digits", "--nproc", "2"])
    assert exit.value.code == 2
    assert "--nproc trains one model with several processes; nas-digits runs a search" in capsys.readouterr().err


def test_replicate_at_world_size_one_equals_one_process(monkeypatch):
    """torchrun --nproc-per-node 1 (its environment, in this process): the distributed path alone."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    weights = []
    for mode in ("off", "replicate"):
        model = mlp(30)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        trainer = Trainer(model, [Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="fit", accumulate=2)],
                          progress=False, distributed=mode)
        assert trainer.world_size == 1 and trainer.is_global_zero
        try:
            trainer.fit(DataLoader(dataset(21, seed=31), batch_size=4, shuffle=True), epochs=2)
            assert ("ranks" in trainer.state_dict()) == (mode == "replicate")
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        weights.append([p.detach() for p in model.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


EXIT_CHECK = """
import atexit, sys
import torch, torch.distributed as dist
from trainflow import Step, Trainer

# registered before the trainer's handler, so it runs after it (atexit runs last in, first out)
atexit.register(lambda: print("group at exit:", dist.is_initialized(), flush=True))
model = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
trainer = Trainer(model, [Step(lambda b: model(b).pow(2).mean(), opt)], progress=False, distributed="replicate")
good, bad = [torch.ones(3, 2)], [torch.ones(3, 5)]  # (3, 5) fails in the loss
for epochs, data in enumerate({"ok": [good], "raises": [bad], "raises-then-ok": [bad, good]}[sys.argv[1]], 1):
    try:
        trainer.fit(data, epochs=epochs)
    except RuntimeError:
        print("fit raised")
"""


@pytest.mark.parametrize("how, destroyed", [("ok", True), ("raises", False), ("raises-then-ok", True)])
def test_the_joined_group_is_destroyed_at_exit_unless_the_last_fit_raised(tmp_path, how, destroyed):
    """A script that ends without ``dist.destroy_process_group()`` used to exit with its gloo group
    alive, and gloo's threads could then abort the process at interpreter exit ("terminate called
    without an active exception") after a finished run. The trainer that joined the group now
    destroys it from an atexit handler, unless the last fit raised (another rank may be in a collective)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    script = tmp_path / "exit_check.py"
    script.write_text(EXIT_CHECK)
    done = subprocess.run([sys.executable, str(script), how], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("fit raised" in done.stdout) == how.startswith("raises"), done.stdout
    assert done.stdout.strip().endswith(f"group at exit: {not destroyed}"), done.stdout + done.stderr[-3000:]
