"""torch.compile of code that calls the fused ops: they run as they are, between the compiled graphs.

Dynamo does not trace the Triton paths (fused_s2s.backend.not_traced, torch.compiler.disable made at
the first call, on fused_s2s.attention._attention_fused, fused_s2s.gumbel._gumbel_fused /
_gumbel_index_fused and the two autograd Functions' backward): a compiled caller gets the same
kernels, so with the "aot_eager" backend (the same ATen ops around them) bitwise the results of
the uncompiled call. Without that, Dynamo traced the launchers and, under TRITON_INTERPRET, the
interpreter's NumPy code, and raised (InterpreterError).
"""
from __future__ import annotations

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


def test_compiled_caller_gets_bitwise_the_uncompiled_results_with_aot_eager():
    q, H, lengths, x = _inputs()
    got = _run(torch.compile(_ops, backend="aot_eager"), q, H, lengths, x)  # first: disabled forms made in the trace
    want = _run(_ops, q, H, lengths, x)
    for name, a, b in zip(("loss", "index", "dq", "dH", "dx"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs under torch.compile")


def test_compiled_caller_with_inductor_and_without_grad():
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
def test_compiled_training_step_of_the_fused_model(ratio, sampling):
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
    """What the Triton path does not take (README), the eager backend's plain torch ops do:
    torch.compile(fullgraph=True), torch.export and torch.func.grad, with the eager results."""
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
