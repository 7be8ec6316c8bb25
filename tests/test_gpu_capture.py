"""On a GPU: the fused decoder's per-step path makes no host synchronisation, so a whole
scheduled-sampling decoder pass can be captured in a CUDA graph (DEVELOPERS standards)."""
import pytest
import torch

import fused_s2s
from tests.helpers import no_host_sync

pytestmark = [pytest.mark.gpu, pytest.mark.kernels]

B, L, T, V, D = 4, 9, 6, 37, 32


def _setup():
    torch.manual_seed(0)
    model = fused_s2s.Seq2Seq(V, V, D, backend="triton").cuda()
    src = torch.randint(3, V, (B, L), device="cuda")
    lengths = torch.tensor([9, 5, 1, 7], device="cuda")
    tgt = torch.randint(3, V, (B, T + 1), device="cuda")
    memory, mask, state = model.encode(src, lengths)  # the encoder packs by length: outside the graph
    return model.decoder, tgt[:, :-1], memory.detach(), mask, state


@pytest.mark.parametrize("sampling", ["argmax", "sample", "gumbel", "gumbel_hard", "softmax"])
def test_decoder_loop_makes_no_host_sync(sampling):
    """Everything after the per-call id check (the step loop, forward and backward) runs without a
    host sync; the id check itself is one sync per call, documented, and skipped under capture."""
    dec, tgt_in, memory, mask, state = _setup()
    dec(tgt_in, memory, mask, state, 0.5, sampling, 0.7)  # compile the kernels first
    torch.cuda.synchronize()
    with no_host_sync():  # check_ids=False: the documented opt-out of the one per-call id read (it syncs by design)
        out = dec(tgt_in, memory, mask, state, 0.5, sampling, 0.7, check_ids=False)
        out.logits.sum().backward()
    assert torch.isfinite(out.logits).all()


def test_teacher_forced_and_sampled_passes_capture_in_cuda_graph():
    dec, tgt_in, memory, mask, state = _setup()
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up (kernel compilation, allocator) off the capture
            for _ in range(2):
                dec(tgt_in, memory, mask, state, 1.0)
                dec(tgt_in, memory, mask, state, 0.5, "gumbel_hard", 0.7)
        torch.cuda.current_stream().wait_stream(s)
        eager_tf = dec(tgt_in, memory, mask, state, 1.0).logits.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            tf = dec(tgt_in, memory, mask, state, 1.0)
            ss = dec(tgt_in, memory, mask, state, 0.5, "gumbel_hard", 0.7)
        g.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(tf.logits, eager_tf)  # teacher forcing is deterministic
    assert torch.isfinite(ss.logits).all() and torch.isfinite(ss.attention).all()


@pytest.mark.parametrize("sampling", ["gumbel", "gumbel_hard"])
def test_tensor_ratio_and_tau_make_no_host_sync_and_replay_new_values(sampling):
    """The capturable form: ratio and tau as 0-d CUDA tensors make no host sync outside a capture
    (their value check is a device assert), and one captured pass replays whatever they hold: at
    ratio 1.0 every input is gold (the teacher-forced logits), at ratio 0.0 none is."""
    dec, tgt_in, memory, mask, state = _setup()
    ratio = torch.tensor(0.5, dtype=torch.float64, device="cuda")
    tau = torch.tensor(0.7, dtype=torch.float64, device="cuda")
    dec(tgt_in, memory, mask, state, ratio, sampling, tau)  # compile the kernels first
    torch.cuda.synchronize()
    with no_host_sync():
        out = dec(tgt_in, memory, mask, state, ratio, sampling, tau, check_ids=False)
        out.logits.sum().backward()
    assert torch.isfinite(out.logits).all()
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up the no-grad path (compilation, allocator) off the capture
            for _ in range(2):
                dec(tgt_in, memory, mask, state, ratio, sampling, tau)
        torch.cuda.current_stream().wait_stream(s)
        eager_tf = dec(tgt_in, memory, mask, state, 1.0).logits.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ss = dec(tgt_in, memory, mask, state, ratio, sampling, tau, check_ids=False)
        ratio.fill_(1.0)
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(ss.logits, eager_tf, rtol=1e-5, atol=1e-5)  # all gold: teacher forcing
        ratio.fill_(0.0)
        tau.fill_(2.0)
        g.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(ss.logits).all()
        assert not torch.allclose(ss.logits[:, 1:], eager_tf[:, 1:])  # model-fed inputs from step 2 on


@pytest.mark.parametrize("sampling", ["argmax", "gumbel_hard"])
def test_training_step_with_cpu_sorted_lengths_makes_no_host_sync(sampling):
    """A whole training step (encoder, decoder, loss, backward, fused Adam) makes no host sync when
    the caller vouches for the ids (check_ids=False) and passes the lengths on the CPU, longest
    first, as fused-s2s train does: its host can then prepare the next batch while the GPU runs."""
    torch.manual_seed(0)
    model = fused_s2s.Seq2Seq(V, V, D, backend="triton").cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    src = torch.randint(3, V, (B, L), device="cuda")
    lengths = torch.tensor([9, 7, 5, 1])  # CPU, sorted
    tgt = torch.randint(3, V, (B, T + 1), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(src, lengths, tgt, 0.5, sampling, 0.7, check_ids=False)
        out.loss.backward()
        opt.step()
        return out.loss

    step()  # compile and allocate first
    torch.cuda.synchronize()
    with no_host_sync():
        loss = step()
    assert torch.isfinite(loss)
