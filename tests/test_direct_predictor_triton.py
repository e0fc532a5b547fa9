"""DirectPredictor's triton backend against the float64 contract (CPU: Triton's interpreter), and on CUDA:
no host synchronisation in a step, and CUDA-graph capture and replay."""

import warnings

import pytest
import torch
from contract import assert_stream_matches, decaying_features, evaluate_stream, rel_err, run_module
from devices import TRITON_DEVICES, needs_cuda, needs_interpreter, run_without_interpreter

from fastpred import DirectPredictor
from fastpred.alerts import CounterAlert

TRITON_FLOOR = 1e-4  # DESIGN: the accuracy bound of the non-torch backends where float32 allows it


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("rho", [0.3, 0.99])
def test_stream_matches_float64_contract(rho, alpha, device):
    batches = decaying_features(96, 32, steps=50, seed=20 + int(rho * 10))
    pred = DirectPredictor(32, rho=rho, alpha=alpha, backend="triton").to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converging stream raises no solver warning
        got = run_module(pred, batches, device)
    assert_stream_matches(got, batches, rho=rho, eps=0.1, alpha=alpha, freq=1, floor=TRITON_FLOOR)
    assert int(pred.unconverged_solves) == 0


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("d", "rho", "steps"), [(32, 0.3, 6), (32, 0.99, 6), (64, 0.3, 3)])
def test_orth_solver_stream_matches_float64_contract(d, rho, steps, device):
    # solver="orth": two orthogonal iterations, then the Rayleigh-Ritz (Jacobi) step, on every warm refresh.
    batches = decaying_features(3 * d, d, steps=steps, seed=26 + d + int(rho * 10))
    pred = DirectPredictor(d, rho=rho, backend="triton", solver="orth").to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run_module(pred, batches, device)
    assert_stream_matches(got, batches, rho=rho, eps=0.1, alpha=0.5, freq=1, floor=TRITON_FLOOR)
    assert int(pred.unconverged_solves) == 0


@needs_interpreter
def test_block_solver_stream_matches_float64_contract():
    # d = 96: three blocks of 32 padded to four, the block Jacobi path (d > 64) with warm starts; rho = 0.3
    # moves F the most between refreshes. (Interpreted, ~20 s per step: kept short, a cold solve and two warm ones.)
    rho = 0.3
    batches = decaying_features(192, 96, steps=3, seed=25, decay=0.95)
    pred = DirectPredictor(96, rho=rho, backend="triton")
    got = run_module(pred, batches, "cpu")
    assert_stream_matches(got, batches, rho=rho, eps=0.1, alpha=0.5, freq=1, floor=TRITON_FLOOR)
    assert int(pred.unconverged_solves) == 0


def _hard_spectrum_batches(kind: str) -> tuple[list[torch.Tensor], float]:
    g = torch.Generator().manual_seed(21)
    d = 16
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    if kind == "condition 1e7":
        scales = torch.logspace(0, -3.5, d, dtype=torch.float64)  # eigenvalues of F from 1 to 1e-7
        return [((torch.randn(64, d, generator=g, dtype=torch.float64) * scales) @ Q.T).float() for _ in range(30)], 0.1
    if kind == "rank-deficient":
        mixing = torch.randn(4, d, generator=g)
        return [torch.randn(12, 4, generator=g) @ mixing for _ in range(30)], 0.05
    spectrum = torch.tensor([4.0] * 5 + [1.0] * 6 + [0.0] * 5, dtype=torch.float64)  # repeated
    return [(d**0.5 * spectrum.sqrt()[:, None] * Q.T).float()] * 30, 0.1


@needs_interpreter
@pytest.mark.parametrize("rho", [0.3, 0.99])
@pytest.mark.parametrize("kind", ["condition 1e7", "rank-deficient", "repeated"])
def test_hard_spectra(kind, rho):
    batches, eps = _hard_spectrum_batches(kind)
    pred = DirectPredictor(16, rho=rho, eps=eps, backend="triton")
    assert_stream_matches(run_module(pred, batches), batches, rho=rho, eps=eps, alpha=0.5, freq=1, floor=TRITON_FLOOR)


@needs_interpreter
@pytest.mark.parametrize("solver", ["jacobi", "orth"])
def test_forced_non_convergence_is_counted_warned_and_repaired(solver):
    batches = decaying_features(64, 16, steps=9, seed=22)
    pred = DirectPredictor(16, rho=0.3, backend="triton", sweeps=0, solver=solver)  # every warm solve stops at once
    exact = evaluate_stream(batches, rho=0.3, eps=0.1, alpha=0.5, freq=1, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        for t, z in enumerate(batches):
            pred(z)
            # Steps 1, 3, 5, ... run the full budget (the cold first solve, then each repair) and are exact;
            # steps 2, 4, ... are capped at 0 sweeps: counted, and repaired by the next refresh.
            assert int(pred.unconverged_solves) == (t + 1) // 2
            if t % 2 == 0:
                assert rel_err(pred.W[0], exact[t].W) <= TRITON_FLOOR, f"step {t} not repaired"
    assert int(pred.unconverged_solves) == 4


@needs_interpreter
def test_freq_and_groups_match_the_torch_backend():
    batches = decaying_features(48, 32, steps=9, seed=23)
    fast = DirectPredictor(32, rho=0.99, freq=3, groups=2, backend="triton")
    plain = DirectPredictor(32, rho=0.99, freq=3, groups=2, backend="torch")
    for t, z in enumerate(batches):
        W_before = fast.W.clone()
        torch.testing.assert_close(fast(z), plain(z), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.F, plain.F, rtol=1e-5, atol=1e-6)
        for g in range(2):
            assert rel_err(fast.W[g], plain.W[g]) <= TRITON_FLOOR
        if (t + 1) % 3:
            assert torch.equal(fast.W, W_before)  # gated on the device: no refresh between every 3rd fold


@needs_interpreter
def test_non_finite_and_overflowing_batches_are_skipped():
    pred = DirectPredictor(8, backend="triton")
    pred(torch.randn(16, 8))
    F, W = pred.F.clone(), pred.W.clone()
    poisoned = torch.randn(16, 8)
    poisoned[2, 3] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        pred(poisoned)
    pred(torch.full((16, 8), 1e30))  # z^T z overflows fp32: dropped whole as well
    assert torch.equal(pred.F, F) and torch.equal(pred.W, W)
    assert int(pred.skipped_updates) == 2 and int(pred.num_folds) == 1


@needs_interpreter
def test_bf16_input_and_state_dict_continuity():
    batches = [z.bfloat16() for z in decaying_features(32, 16, steps=12, seed=24)]
    first = DirectPredictor(16, rho=0.99, backend="triton")
    for z in batches[:6]:
        first(z)
    second = DirectPredictor(16, rho=0.99, backend="triton")
    second.load_state_dict(first.state_dict())
    for z in batches[6:]:
        assert torch.equal(first(z), second(z))
    assert torch.equal(first.W, second.W) and torch.equal(first.U, second.U)
    widened = [z.float() for z in batches]
    exact = evaluate_stream(widened, rho=0.99, eps=0.1, alpha=0.5, freq=1, dtype=torch.float64)
    assert rel_err(first.W[0], exact[-1].W) <= TRITON_FLOOR


REFUSED_WITHOUT_INTERPRETER = """
import torch
from fastpred import DirectPredictor
from fastpred.alerts import CounterAlert
pred = DirectPredictor(4, backend="triton")
try:
    pred(torch.randn(3, 4))
    raise SystemExit("backend='triton' ran on CPU tensors without the interpreter")
except ValueError as e:
    assert "TRITON_INTERPRET=1" in str(e) and "\\n" not in str(e), e
assert int(pred.num_folds) == 0
auto = DirectPredictor(4)  # "auto" is torch on the CPU
auto(torch.randn(3, 4))
print("refused", int(auto.num_folds))
"""


def test_triton_on_cpu_needs_the_interpreter():
    # The explicit policy: CPU tensors run the kernels only if TRITON_INTERPRET=1 was set before triton was
    # imported (nothing in fastpred sets it); otherwise one ValueError line, and nothing is folded.
    assert run_without_interpreter(REFUSED_WITHOUT_INTERPRETER).split() == ["refused", "1"]


@needs_cuda
@pytest.mark.parametrize("dim, groups", [(64, 1), (256, 1), (256, 4)])
def test_cuda_training_step_never_synchronises(dim, groups):
    pred = DirectPredictor(dim, groups=groups).cuda()  # "auto" is triton on CUDA
    head = torch.nn.Linear(dim, dim).cuda()
    opt = torch.optim.SGD(head.parameters(), lr=0.01)
    x = torch.randn(512, dim, device="cuda")
    pred(head(x))  # first call: compilation and allocations outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss = pred(head(x)).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(pred.num_folds) == 4 and int(pred.skipped_updates) == 0


@needs_cuda
def test_cuda_graph_capture_and_replay_match_eager():
    torch.manual_seed(0)
    batches = [z.cuda() for z in decaying_features(256, 64, steps=8, seed=25)]
    eager = DirectPredictor(64, rho=0.99).cuda()
    graphed = DirectPredictor(64, rho=0.99).cuda()
    static_z = batches[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, allocate) off the capture stream, then rewind
        graphed(static_z)
    torch.cuda.current_stream().wait_stream(side)
    graphed.load_state_dict(DirectPredictor(64, rho=0.99).cuda().state_dict())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = graphed(static_z)
    graphed.load_state_dict(DirectPredictor(64, rho=0.99).cuda().state_dict())  # capture ran no kernels
    for z in batches:
        static_z.copy_(z)
        graph.replay()
        torch.testing.assert_close(static_out, eager(z))
        torch.testing.assert_close(graphed.W, eager.W)
    assert int(graphed.num_folds) == len(batches)


@needs_cuda
def test_cuda_bf16_stream_matches_contract():
    batches = [z.bfloat16() for z in decaying_features(256, 64, steps=50, seed=26)]
    pred = DirectPredictor(64, rho=0.3).cuda()
    got = run_module(pred, batches, "cuda")
    widened = [z.float() for z in batches]
    exact = evaluate_stream(widened, rho=0.3, eps=0.1, alpha=0.5, freq=1, dtype=torch.float64)
    for t, ((_, F, W), ref) in enumerate(zip(got, exact, strict=True)):
        assert rel_err(F, ref.F) <= 1e-5 and rel_err(W, ref.W) <= TRITON_FLOOR, f"step {t}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: a counter on a GPU that is not current")
def test_alert_on_a_non_current_gpu_waits_for_its_copy():
    # The copy of the counter is queued on the counter's GPU; the event that says it is done must be recorded
    # there too, or it completes at once (on an idle current GPU) and the host reads a stale count.
    alert = CounterAlert("{count} skipped")
    counter = torch.zeros((), dtype=torch.int64, device="cuda:1")
    with torch.cuda.device(1):
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU 1 before the counter is set
        counter.fill_(3)
    with torch.cuda.device(0):
        alert.poll(counter)  # queues the copy behind the sleep
        assert not alert._event.query()  # recorded on GPU 1: not complete while GPU 1 is busy
        torch.cuda.synchronize(1)
        with pytest.warns(RuntimeWarning, match="3 skipped"):
            alert.poll(counter)
