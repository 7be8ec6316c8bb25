"""torch.compile and torch.export of code that calls the fused ops.

Inside a trace the Triton paths call their torch.library custom ops (fused_s2s::attention_fwd /
_bwd, gumbel_softmax_fwd / _bwd, gumbel_sample): single nodes of the graph, so fullgraph=True and
torch.export take them. With FUSED_S2S_COMPILE_OPS=0 (fused_s2s.backend.COMPILE_OPS) they run as
they are between the compiled graphs instead (fused_s2s.backend.not_traced: torch.compiler.disable
made at the first call). Either way a compiled caller gets the same kernels, so with the
"aot_eager" backend (the same ATen ops around them) bitwise the results of the uncompiled call.
Without either, Dynamo traced the launchers and, under TRITON_INTERPRET, the interpreter's NumPy
code, and raised (InterpreterError).
"""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch

import fused_s2s
from fused_s2s import backend as _backend
from fused_s2s import reference
from fused_s2s.model import Seq2Seq
from tests.conftest import DEVICE

pytestmark = pytest.mark.kernels

# a model's gradients run to run: bitwise on the CPU; on CUDA the W_emb / W_out gradients
# accumulate with atomics (index_add_, embedding backward), so two uncompiled runs differ by ulps
_SAME_GRADS = dict(rtol=0, atol=0) if DEVICE.type == "cpu" else dict(rtol=1e-5, atol=1e-7)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # no compiled code or recompile budget carried between tests
    _backend._NOT_TRACED.clear()  # the disabled forms are made again, the first one inside a trace
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["custom_ops", "graph_breaks"])
def compile_ops(request, monkeypatch):
    """Both ways a trace meets the Triton paths: the custom ops in the graph (the default), or
    FUSED_S2S_COMPILE_OPS=0's graph breaks around them."""
    monkeypatch.setattr(_backend, "COMPILE_OPS", request.param == "custom_ops")
    return request.param == "custom_ops"


def test_importing_the_package_does_not_import_dynamo():
    """not_traced applies torch.compiler.disable at the first call: importing torch._dynamo costs ~1 s."""
    def dynamo_after(imports: str) -> bool:
        code = f"import sys, {imports}; print('torch._dynamo' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip() == "True"

    if dynamo_after("torch"):
        pytest.skip("this torch imports torch._dynamo itself")
    assert not dynamo_after("fused_s2s, fused_s2s.attention, fused_s2s.gumbel, fused_s2s.model")


def _ops(q, H, lengths, x):
    """A caller of both fused ops, with torch ops around them (what Dynamo compiles)."""
    ctx, w = fused_s2s.attention_step(q * 2.0, H, None, lengths, backend="triton")  # (B, D), (B, L)
    y, idx = fused_s2s.gumbel_softmax(x.tanh(), 0.5, hard=True, return_index=True, backend="triton")  # (B, V), (B,)
    soft = fused_s2s.gumbel_softmax(x, 2.0, backend="triton")  # (B, V)
    return ctx.square().sum() + (w * w).sum() + (y * x).sum() + (soft * soft).sum(), idx


def _inputs(B=3, L=5, D=12, V=37):
    torch.manual_seed(0)
    q = torch.randn(B, D, device=DEVICE, requires_grad=True)
    H = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    x = torch.randn(B, V, device=DEVICE, requires_grad=True)
    lengths = torch.tensor([L, 2, 1][:B], device=DEVICE)
    return q, H, lengths, x


def _run(fn, q, H, lengths, x):
    """Loss, sampled index and the three input gradients of one call, after torch.manual_seed(7)."""
    torch.manual_seed(7)  # the Gumbel seeds come from torch's RNG
    loss, idx = fn(q, H, lengths, x)
    grads = torch.autograd.grad(loss, (q, H, x))
    return (loss.detach(), idx, *grads)


def test_compiled_caller_gets_bitwise_the_uncompiled_results_with_aot_eager(compile_ops):
    q, H, lengths, x = _inputs()
    got = _run(torch.compile(_ops, backend="aot_eager"), q, H, lengths, x)  # first: disabled forms made in the trace
    want = _run(_ops, q, H, lengths, x)
    for name, a, b in zip(("loss", "index", "dq", "dH", "dx"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs under torch.compile")


def test_compiled_caller_with_inductor_and_without_grad(compile_ops):
    q, H, lengths, x = _inputs(B=2, L=3, D=8, V=20)
    want = _run(_ops, q, H, lengths, x)
    got = _run(torch.compile(_ops), q, H, lengths, x)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # the same samples: the same seeds drawn
    for name, a, b in zip(("loss", "dq", "dH", "dx"), got[:1] + got[2:], want[:1] + want[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs under torch.compile")

    def sample(q, H, x):  # the no-grad paths: the forward launchers without the autograd Functions
        ctx, w = fused_s2s.attention_step(q, H, backend="triton")
        return fused_s2s.gumbel_sample(x + 1.0, backend="triton"), ctx, w

    with torch.no_grad():
        torch.manual_seed(3)
        want = sample(q, H, x)
        torch.manual_seed(3)
        got = torch.compile(sample)(q, H, x)
    for name, a, b in zip(("index", "ctx", "weights"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs under torch.compile (no_grad)")


@pytest.mark.parametrize("ratio,sampling", [(1.0, "argmax"), (0.5, "gumbel_hard"), (0.5, "gumbel")])
def test_compiled_training_step_of_the_fused_model(ratio, sampling, compile_ops):
    """forward, loss and backward inside the compiled function (the autograd engine runs our
    backward there too), teacher-forcing fast path and scheduled-sampling loop: the loss and every
    parameter's gradient are bitwise those of the uncompiled step, and within the reference's."""
    torch.manual_seed(0)
    B, L, V, D, T = 3, 5, 23, 8, 4
    src, lengths = torch.randint(3, 20, (B, L), device=DEVICE), torch.tensor([L, 4, 2], device=DEVICE)
    tgt = torch.randint(3, V, (B, T + 1), device=DEVICE)
    model = Seq2Seq(20, V, D, backend="triton").to(DEVICE)
    ref = reference.Seq2Seq(20, V, D).to(DEVICE)
    ref.load_state_dict(model.state_dict())

    def step(m):
        out = m(src, lengths, tgt, ratio, sampling)
        out.loss.backward()
        return out.loss.detach()

    def run(fn, m):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(11)  # coins and Gumbel seeds
        loss = fn(m)
        return loss, {k: p.grad.clone() for k, p in m.named_parameters()}

    want_loss, want = run(step, model)
    got_loss, got = run(torch.compile(step, backend="aot_eager"), model)
    ref_loss, ref_grads = run(step, ref)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **_SAME_GRADS, msg=f"grad of {k} under torch.compile")
        torch.testing.assert_close(got[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=f"grad of {k} vs reference")


def test_eager_backend_takes_fullgraph_export_and_func_transforms():
    """The eager backend's plain torch ops take torch.compile(fullgraph=True), torch.export and
    torch.func.grad, with the eager results (the Triton path under torch.func: tests/test_func.py)."""
    torch.manual_seed(0)
    x, q, H = torch.randn(2, 5), torch.randn(2, 4), torch.randn(2, 3, 4)
    noise = -torch.empty(2, 5).exponential_().log()

    def f(x, q):
        y = fused_s2s.gumbel_softmax(x, 0.5, noise=noise, backend="eager")
        ctx, w = fused_s2s.attention_step(q, H, backend="eager")
        return y.square().sum() + ctx.sum() + w.square().sum()

    want = f(x, q)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x, q), want)

    class M(torch.nn.Module):
        def forward(self, x, q):
            return f(x, q)

    torch.testing.assert_close(torch.export.export(M(), (x, q)).module()(x, q), want)
    gx, gq = torch.func.grad(f, argnums=(0, 1))(x, q)
    x_, q_ = x.clone().requires_grad_(), q.clone().requires_grad_()
    torch.testing.assert_close((gx, gq), torch.autograd.grad(f(x_, q_), (x_, q_)))


def _recording_backend():
    """(a torch.compile backend: aot_eager, recording; the names of the fused_s2s ops in the graphs it got)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if "fused_s2s" in str(n.target))
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    return backend, seen


def test_fullgraph_holds_the_fused_ops_as_custom_op_nodes(monkeypatch):
    q, H, lengths, x = _inputs()
    want = _run(_ops, q, H, lengths, x)
    backend, seen = _recording_backend()
    got = _run(torch.compile(_ops, backend=backend, fullgraph=True), q, H, lengths, x)
    assert sorted(set(seen)) == ["fused_s2s.attention_fwd", "fused_s2s.gumbel_softmax_fwd"]
    for name, a, b in zip(("loss", "index", "dq", "dH", "dx"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs under fullgraph=True")

    monkeypatch.setattr(_backend, "COMPILE_OPS", False)  # FUSED_S2S_COMPILE_OPS=0: graph breaks instead
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(_ops, backend="aot_eager", fullgraph=True)(q, H, lengths, x)


def test_dynamic_shapes_compile_once_for_every_size():
    """dynamic=True: the fake implementations give symbolic shapes; every size gets the uncompiled result."""
    def f(q, H, x):
        ctx, w = fused_s2s.attention_step(q, H, backend="triton")  # (B, T, D), (B, T, L)
        y = fused_s2s.gumbel_softmax(x, 0.7, hard=True, backend="triton")  # (B, V)
        return ctx.sum() + (w * w).sum() + (y * x).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for B, T, L, D, V in [(2, 3, 5, 8, 11), (3, 1, 7, 6, 20), (1, 4, 2, 5, 9)]:
        torch.manual_seed(B)
        args = [torch.randn(*s, device=DEVICE, requires_grad=True) for s in ((B, T, D), (B, L, D), (B, V))]
        torch.manual_seed(1)
        want = f(*args)
        want_g = torch.autograd.grad(want, args)
        torch.manual_seed(1)
        got = compiled(*args)
        got_g = torch.autograd.grad(got, args)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got_g, want_g, rtol=0, atol=0)


def test_export_holds_the_fused_ops():
    """torch.export of a module calling the Triton paths: the program holds the custom ops, and
    running it gives the uncompiled results (the Gumbel seed is drawn in the program, from torch's RNG)."""
    q, H, lengths, x = (t.detach() for t in _inputs())

    class M(torch.nn.Module):
        def forward(self, q, H, lengths, x):
            ctx, w = fused_s2s.attention_step(q, H, None, lengths, backend="triton")
            y, idx = fused_s2s.gumbel_softmax(x, 0.5, hard=True, return_index=True, backend="triton")
            return ctx, w, y, idx, fused_s2s.gumbel_sample(x, backend="triton")

    ep = torch.export.export(M(), (q, H, lengths, x))
    ops = {str(n.target) for n in ep.graph.nodes if "fused_s2s" in str(n.target)}
    assert ops == {"fused_s2s.attention_fwd.default", "fused_s2s.gumbel_softmax_fwd.default",
                   "fused_s2s.gumbel_sample.default"}
    buf = io.BytesIO()
    torch.export.save(ep, buf)  # a saved program names the ops; loading needs them registered (imported)
    buf.seek(0)
    loaded = torch.export.load(buf)
    torch.manual_seed(5)
    want = M()(q, H, lengths, x)
    for program in (ep, loaded):
        torch.manual_seed(5)
        got = program.module()(q, H, lengths, x)
        for name, a, b in zip(("ctx", "weights", "y", "index", "sample"), got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs in the exported program")


def test_learned_tau_under_compile_keeps_its_gradient():
    """A tau that requires grad stays with the autograd Function (its eager tau gradient; a graph
    break), also while the custom ops are on: the compiled gradients are the uncompiled ones."""
    x = torch.randn(3, 13, device=DEVICE, requires_grad=True)
    tau = torch.tensor(0.8, device=DEVICE, requires_grad=True)

    def f(x, tau):
        return (fused_s2s.gumbel_softmax(x, tau, backend="triton") * x).sum()

    def run(fn):
        torch.manual_seed(2)
        return torch.autograd.grad(fn(x, tau), (x, tau))

    want = run(f)
    assert want[1].abs() > 0
    torch.testing.assert_close(run(torch.compile(f, backend="aot_eager")), want, rtol=0, atol=0)


def _attention_op_cases():
    def t(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)

    lengths, bool_mask = torch.tensor([5, 2, 0], device=DEVICE), torch.rand(2, 5, device=DEVICE) > 0.3
    cases = {}
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        n = str(dt).split(".")[1]
        cases[f"{n}-step-lengths"] = (t(3, 8, dtype=dt), t(3, 5, 8, dtype=dt), None, lengths, None, None, None)
        cases[f"{n}-T3-values-bool-split"] = (t(2, 3, 8, dtype=dt), t(2, 5, 8, dtype=dt), t(2, 5, 6, dtype=dt),
                                              bool_mask, 2, None, None)
    cases["bf16-tiled"] = (t(2, 17, 16, dtype=torch.bfloat16), t(2, 5, 16, dtype=torch.bfloat16), None, None, None,
                           None, True)
    cases["fp32-strided"] = (t(3, 16)[:, ::2], t(3, 5, 12)[..., 2:10], t(2, 3, 5, 7)[1], lengths, None, None, None)
    cases["fp16-no-rows"] = (t(0, 8, dtype=torch.float16), t(0, 5, 8, dtype=torch.float16), None, None, None, None,
                             None)
    return cases


@pytest.mark.parametrize("case", list(_attention_op_cases()))
def test_attention_custom_op_passes_opcheck(case):
    """torch.library.opcheck: schema, fake implementation against the real outputs (shapes, dtypes,
    strides), autograd registration, and AOT dispatch with dynamic shapes (the backward op too)."""
    args = _attention_op_cases()[case]
    torch.library.opcheck(torch.ops.fused_s2s.attention_fwd.default, args)
    query, keys, values, mask, splits, block_l, tiled = args
    with torch.no_grad():
        _, weights, lse, ctx_acc, scores = torch.ops.fused_s2s.attention_fwd(*args)
    acc16 = query.dtype in (torch.float16, torch.bfloat16)
    d = [torch.randn_like(o) for o in torch.ops.fused_s2s.attention_fwd(*args)[:2]]
    torch.library.opcheck(torch.ops.fused_s2s.attention_bwd.default,
                          (query.detach(), keys.detach(), None if values is None else values.detach(), mask,
                           ctx_acc if acc16 else None, scores if acc16 else weights, lse, *d, splits, block_l, tiled))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form", ["seed", "tau_tensor_hard", "noise_hard"])
def test_gumbel_custom_ops_pass_opcheck(dtype, form):
    from fused_s2s import philox

    x = torch.randn(4, 37, dtype=dtype, device=DEVICE, requires_grad=True)
    seed, noise, tau, inv_tau, hard = philox.draw_seed(DEVICE), None, None, 2.0, False
    if form == "tau_tensor_hard":
        tau, inv_tau, hard = torch.tensor(0.5, dtype=torch.float64, device=DEVICE), 1.0, True
    elif form == "noise_hard":
        seed, hard = None, True
        noise = -torch.empty(4, 37, device=DEVICE).exponential_().log().to(dtype)
    args = (x, noise, seed, inv_tau, tau, hard)
    torch.library.opcheck(torch.ops.fused_s2s.gumbel_softmax_fwd.default, args)
    with torch.no_grad():
        y, idx, m, s = torch.ops.fused_s2s.gumbel_softmax_fwd(*args)
    torch.library.opcheck(torch.ops.fused_s2s.gumbel_softmax_bwd.default,
                          (torch.randn_like(y), x.detach(), m, s, inv_tau, noise, seed, idx, tau))
    torch.library.opcheck(torch.ops.fused_s2s.gumbel_sample.default, (x.detach(), noise, seed))


def test_second_derivative_through_a_compiled_graph_is_an_error_not_a_silent_zero():
    """AOTAutograd takes no double backward: with the custom ops in the graph a gradient penalty
    raises torch's error, where dropping the terms through the gradients would pass silently."""
    q, H, _, x = _inputs()
    for f, wrt in ((lambda: fused_s2s.attention_step(q, H, backend="triton")[0].square().sum(), (q, H)),
                   (lambda: fused_s2s.gumbel_softmax(x, 0.5, backend="triton").square().sum(), (x,))):
        torch._dynamo.reset()
        grads = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(), wrt, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(sum(g.square().sum() for g in grads), wrt[0])


@pytest.mark.parametrize("used", ["context", "weights"])
def test_one_attention_output_used_gets_bitwise_the_uncompiled_gradients(used, compile_ops):
    """The unused output's gradient stays None in the compiled backward too (set_materialize_grads
    (False) in the custom op's setup_context): zeros there select another delta evaluation in the
    fp32 / fp64 backward, ~1e-7 off the uncompiled gradients."""
    torch.manual_seed(0)
    q0, H0 = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 5, 8, device=DEVICE)

    def f(q, H):
        ctx, w = fused_s2s.attention_step(q, H, mask=torch.tensor([5, 2], device=DEVICE), backend="triton")
        return (ctx * ctx).sum() if used == "context" else (w * w).sum()

    def grads(fn):
        q, H = q0.clone().requires_grad_(), H0.clone().requires_grad_()
        return torch.autograd.grad(fn(q, H), (q, H))

    want = grads(f)
    torch.testing.assert_close(grads(torch.compile(f, backend="aot_eager")), want, rtol=0, atol=0)


def test_fullgraph_takes_a_tau_tensor_and_still_checks_its_value():
    """A 0-d tau tensor: its range check is a traced assert inside the graph (on the CPU the eager
    check reads the value, which would break the graph), so fullgraph=True takes it; the samples
    are the uncompiled ones, and a tau out of range still raises, naming tau."""
    x = torch.randn(3, 11, device=DEVICE)

    def f(x, tau):
        return fused_s2s.gumbel_softmax(x, tau, hard=True, backend="triton")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    tau = torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    torch.manual_seed(0)
    want = f(x, tau)
    torch.manual_seed(0)
    torch.testing.assert_close(compiled(x, tau), want, rtol=0, atol=0)
    if DEVICE.type == "cpu":  # on CUDA a device-side assert would end the process's CUDA context
        with pytest.raises(RuntimeError, match="tau must be"):
            compiled(x, torch.tensor(-1.0, dtype=torch.float64))


# not -m gpu: that pass runs first on a lent GPU, under a tight budget, and Inductor's compile here
# would take its time from the capture / graph tests; this file's other tests run on CUDA later
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA (Inductor's CUDA graphs)")
def test_reduce_overhead_replays_the_custom_ops_from_cuda_graphs():
    """mode="reduce-overhead": Inductor's CUDA graphs hold our launches (the custom ops are in its
    graph). Warm-up, recording and replays give the uncompiled results (explicit noise: Inductor's
    RNG is its own), forward and backward, with new inputs copied in at each call."""
    torch.manual_seed(0)
    B, L, D, V = 4, 7, 16, 50

    def f(q, H, x, noise):
        ctx, w = fused_s2s.attention_step(q, H, backend="triton")  # (B, D), (B, L)
        y = fused_s2s.gumbel_softmax(x, 0.5, hard=True, noise=noise, backend="triton")  # (B, V)
        return ctx.square().sum() + w.square().sum() + (y * x).sum()

    compiled = torch.compile(f, mode="reduce-overhead")
    for call in range(4):
        args = [torch.randn(*s, device="cuda", requires_grad=True) for s in ((B, D), (B, L, D), (B, V))]
        noise = -torch.empty(B, V, device="cuda").exponential_().log()
        want = f(*args, noise)
        want_g = torch.autograd.grad(want, args)
        got = compiled(*args, noise)
        got_g = torch.autograd.grad(got, args)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"loss at call {call}")
        for a, b in zip(got_g, want_g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"gradient at call {call}")


def test_id_check_is_a_traced_assert_inside_a_trace():
    """check_ids reads the ids' range on the host, which breaks a graph: inside a trace it is a
    traced assert, so fullgraph=True takes it and ids out of range still raise, naming them."""
    from fused_s2s._checks import check_ids

    def f(ids):
        return check_ids("tgt", ids, 10).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    ids = torch.tensor([[0, 9, 3]])
    assert compiled(ids) == f(ids)
    with pytest.raises(ValueError, match="tgt has ids"):
        f(torch.tensor([[0, 10]]))
    with pytest.raises(RuntimeError, match="tgt has ids outside"):
        compiled(torch.tensor([[0, 10]]))
