"""The fused-s2s command: checkpoints (round trip, atomic write, mismatch errors), tiny train / resume /
translate / bench runs on the CPU, and bad flag values."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import fused_s2s
from fused_s2s import checkpoint as C
from fused_s2s import cli
from fused_s2s import data as D
from fused_s2s.schedules import Linear, TemperatureSchedule

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--task", "reverse", "--hidden", "16", "--batch-size", "8", "--train-size", "200", "--valid-size", "8",
        "--no-progress", "--seed", "3"]


def _tiny_model(hidden=8, vocab=None):
    vocab = vocab or D.Vocab("0123456789")
    config = cli.model_config(len(vocab), hidden, "gru", 1, False)
    torch.manual_seed(0)
    return cli.build_model(config, backend="eager"), config, vocab


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


# ------------------------------------------------------------------------------------------ checkpoint
def test_checkpoint_round_trip(tmp_path):
    model, config, vocab = _tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    b = D.collate([("123", "321"), ("45", "54")], vocab)
    model(b.src, b.src_lengths, b.tgt).loss.backward()
    opt.step()
    tf, tau = Linear(k=1.0, c=0.01, eps=0.1), TemperatureSchedule(tau0=2.0, r=0.1, tau_min=0.3, every=5)
    tf.i = tau.i = 17
    path = C.save(str(tmp_path / "ck.pt"), model=model, config=config, vocab=vocab, step=17, optimizer=opt,
                  schedules={"tf": tf, "tau": tau}, train_args={"lr": 1e-2})
    ck = C.load(path, expected_config=config, expected_vocab=vocab)
    assert ck["step"] == 17 and ck["version"] == fused_s2s.__version__ and ck["config"] == config
    assert D.Vocab.from_dict(ck["vocab"]) == vocab
    model2, _, _ = _tiny_model()
    model2.load_state_dict(ck["model"])
    for (k, a), (_, b2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b2), k
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(ck["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    tf2, tau2 = Linear(), TemperatureSchedule()
    tf2.load_state_dict(ck["schedules"]["tf"])
    tau2.load_state_dict(ck["schedules"]["tau"])
    assert (tf2.i, tf2.value, tau2.value) == (17, tf.value, tau.value)
    # RNG states: restoring them replays the same draws
    torch.manual_seed(123)
    saved = C.rng_state()
    x = torch.rand(4)
    C.set_rng_state(saved)
    assert torch.equal(torch.rand(4), x)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    model, config, vocab = _tiny_model()
    path = str(tmp_path / "ck.pt")
    C.save(path, model=model, config=config, vocab=vocab, step=1)
    before = open(path, "rb").read()
    with pytest.raises(Exception):  # a lambda cannot be pickled: serialization fails midway
        C.save(path, model=model, config=config, vocab=vocab, step=2, extra={"bad": lambda: 0})
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temp file left behind
    assert open(path, "rb").read() == before  # the previous checkpoint is intact
    assert C.load(path)["step"] == 1
    with pytest.raises(Exception):
        C.save(str(tmp_path / "new.pt"), model=model, config=config, vocab=vocab, step=2, extra={"bad": lambda: 0})
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_config_and_version_mismatch_say_what_differs(tmp_path, monkeypatch):
    model, config, vocab = _tiny_model()
    path = C.save(str(tmp_path / "ck.pt"), model=model, config=config, vocab=vocab, step=0)
    other = dict(config, hidden_size=32, cell="lstm")
    with pytest.raises(C.CheckpointMismatch) as e:
        C.load(path, expected_config=other)
    msg = str(e.value)
    assert "hidden_size: checkpoint=8, requested=32" in msg and "cell: checkpoint='gru', requested='lstm'" in msg
    assert "num_layers" not in msg  # only the fields that differ
    with pytest.raises(C.CheckpointMismatch, match="vocabulary"):
        C.load(path, expected_vocab=D.Vocab("0123456789ab"))
    monkeypatch.setattr(fused_s2s, "__version__", "0.9.0")
    with pytest.raises(C.CheckpointMismatch, match=r"0\.1\.0.*0\.9\.0"):
        C.load(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        C.load(str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError):
        C.load(str(tmp_path / "missing.pt"))


def test_build_model_falls_back_to_reference(monkeypatch):
    from fused_s2s import reference

    monkeypatch.setitem(sys.modules, "fused_s2s.model", None)  # as if model.py did not exist
    m = cli.build_model(cli.model_config(20, 8, "lstm", 1, True), backend="eager")
    assert type(m) is reference.Seq2Seq


# ------------------------------------------------------------------------------------------ train / resume
def _run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_train_tiny_run_writes_checkpoint_metrics_plot(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = _run(["train", *TINY, "--steps", "6", "--eval-every", "3", "--log-every", "2",
                       "--tf-schedule", "linear", "--tf-c", "0.1", "--sampling", "gumbel_hard", "--out", str(out)],
                      capsys)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.jsonl", "metrics.png"]
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_exact" in r]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    assert [r["tf_ratio"] for r in train] == pytest.approx([0.9, 0.7, 0.5])  # ratio of steps 1, 3, 5
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in train)
    assert all(0 <= r["eval_exact"] <= r["eval_token_acc"] <= 1 and r["n_eval"] == 8 for r in evals)
    assert _is_png(out / "metrics.png")
    ck = C.load(str(out / "checkpoint.pt"))
    assert ck["step"] == 6 and ck["config"]["hidden_size"] == 16 and ck["schedules"]["tf"]["i"] == 6
    assert ck["train_args"]["sampling"] == "gumbel_hard"
    assert "exact match" in err


def test_resume_continues_step_schedule_and_matches_uninterrupted_run(tmp_path, capsys):
    common = [*TINY, "--tf-schedule", "linear", "--tf-c", "0.1", "--log-every", "2", "--eval-every", "0"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli.main(["train", *common, "--steps", "8", "--out", str(full)]) == 0
    assert cli.main(["train", *common, "--steps", "4", "--out", str(part)]) == 0
    # resume with only --steps: every other flag comes from the checkpoint
    rc, _, err = _run(["train", "--resume", str(part / "checkpoint.pt"), "--steps", "8", "--no-progress"], capsys)
    assert rc == 0, err
    assert "resuming" in err and "at step 4" in err
    a, b = C.load(str(full / "checkpoint.pt")), C.load(str(part / "checkpoint.pt"))
    assert b["step"] == 8 and b["schedules"]["tf"]["i"] == 8
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], msg=k)  # same batches, draws, Adam state
    ra = [json.loads(l) for l in open(full / "metrics.jsonl") if "loss" in l]
    rb = [json.loads(l) for l in open(part / "metrics.jsonl") if "loss" in l]
    assert [r["step"] for r in rb] == [2, 4, 6, 8]
    assert [r["tf_ratio"] for r in rb] == pytest.approx([r["tf_ratio"] for r in ra]) == [0.9, 0.7, 0.5, 0.3]
    assert [r["loss"] for r in rb] == pytest.approx([r["loss"] for r in ra], rel=1e-4)


def test_resume_with_other_config_says_what_differs(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--steps", "2", "--eval-every", "0", "--out", str(out)]) == 0
    rc, _, err = _run(["train", "--resume", "--out", str(out), "--hidden", "24", "--steps", "4"], capsys)
    assert rc == 2
    assert "hidden_size: checkpoint=16, requested=24" in err
    rc, _, err = _run(["train", "--resume", str(tmp_path / "nothing.pt")], capsys)
    assert rc == 2 and "nothing.pt" in err


# ------------------------------------------------------------------------------------------ translate
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert cli.main(["train", *TINY, "--steps", "3", "--eval-every", "0", "--out", str(out)]) == 0
    return str(out / "checkpoint.pt")


def test_translate_prints_outputs_and_plots_attention(trained, tmp_path, capsys):
    png = tmp_path / "att.png"
    rc, out, err = _run(["translate", "-c", trained, "--with-source", "--plot-attention", str(png), "123", "98765"],
                        capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert [l.split("\t")[0] for l in lines] == ["123", "98765"]
    assert all(len(l.split("\t")) == 2 and set(l.split("\t")[1]) <= set("0123456789" + D.UNK_CHAR) for l in lines)
    assert _is_png(png)
    # the CLI decodes exactly what the model's greedy decoding gives
    model, vocab, _ = cli.load_model(trained)
    src, lengths = D.encode_sources(["123", "98765"], vocab)
    ref = model.generate(src, lengths, 15, strategy="greedy")
    assert [l.split("\t")[1] for l in lines] == [vocab.decode(ref.tokens[i, 0]) for i in range(2)]


def test_translate_stdin_beam_and_sample(trained, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("123\n\n4567\n"))
    rc, out, _ = _run(["translate", "-c", trained, "--strategy", "beam", "--beam-size", "3", "--n-best", "2"],
                      capsys)
    assert rc == 0 and len(out.splitlines()) == 2  # the empty line is skipped
    assert all(len(l.split("\t")) == 2 for l in out.splitlines())
    runs = [_run(["translate", "-c", trained, "--strategy", "sample", "--top-k", "3", "--seed", "5", "123", "456"],
                 capsys)[1] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0].splitlines()) == 2  # seeded sampling is reproducible
    rc, _, err = _run(["translate", "-c", trained, "12x"], capsys)
    assert rc == 0 and "not in the training vocabulary" in err and "'x'" in err


# ------------------------------------------------------------------------------------------ bench
FAKE_BENCH = '''
def main(argv=None):
    quick = "--quick" in (argv or [])
    return [{"bench": "attention", "impl": impl, "case": "B2_L3", "dtype": "float32", "pass": "fwd",
             "median_ms": ms, "device": "cpu", "note": "quick" if quick else ""}
            for impl, ms in (("reference", 2.0), ("fused", 1.0))]
'''


def test_bench_writes_csv_and_png(tmp_path, capsys):
    bdir = tmp_path / "benchmarks"
    bdir.mkdir()
    (bdir / "bench_attention.py").write_text(FAKE_BENCH)
    (bdir / "bench_gumbel.py").write_text("def main(argv=None):\n    raise RuntimeError('boom')\n")
    rc, out, _ = _run(["bench", "--quick", "--bench-dir", str(bdir)], capsys)
    assert rc == 1  # one benchmark failed: reported, the others still written
    assert "gumbel: FAILED (RuntimeError: boom)" in out
    assert "bench_train.py not found" in out
    import csv

    rows = list(csv.DictReader(open(bdir / "results" / "latest.csv")))
    assert [(r["impl"], float(r["median_ms"]), r["note"]) for r in rows] == [("reference", 2.0, "quick"),
                                                                            ("fused", 1.0, "quick")]
    assert _is_png(bdir / "results" / "latest.png") and _is_png(bdir / "results" / "bench_attention.png")
    assert "reference" in out and "B2_L3" in out  # the table
    if not torch.cuda.is_available():
        assert "No CUDA device" in out


def test_bench_main_returning_none_takes_rows_from_results_csv(tmp_path, capsys):
    bdir = tmp_path / "benchmarks"
    (bdir / "results").mkdir(parents=True)
    (bdir / "results" / "results.csv").write_text("bench,impl,case,median_ms\nold,eager,x,9.0\n")
    (bdir / "bench_gumbel.py").write_text(
        "import os\n"
        "def main(argv=None):\n"
        "    p = os.path.join(os.path.dirname(__file__), 'results', 'results.csv')\n"
        "    open(p, 'a').write('gumbel,eager,B4_V7,1.5\\n')\n")
    rc, out, _ = _run(["bench", "--bench-dir", str(bdir), "--only", "gumbel"], capsys)
    assert rc == 0
    import csv

    rows = list(csv.DictReader(open(bdir / "results" / "latest.csv")))
    assert [(r["bench"], r["case"], r["median_ms"]) for r in rows] == [("gumbel", "B4_V7", "1.5")]


def test_bench_without_benchmarks_still_writes_files(tmp_path, capsys):
    rc, out, _ = _run(["bench", "--bench-dir", str(tmp_path / "none"), "--only", "attention"], capsys)
    assert rc == 0 and "not found" in out
    assert (tmp_path / "none" / "results" / "latest.csv").exists()


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv,valid", [
    (["train", "--cell", "rnn"], ["lstm", "gru"]),
    (["train", "--sampling", "nope"], ["argmax", "sample", "gumbel", "gumbel_hard", "softmax"]),
    (["train", "--tf-schedule", "cosine"], ["constant", "linear", "exponential", "inverse_sigmoid"]),
    (["train", "--coin", "batch"], ["token", "step", "sequence"]),
    (["train", "--amp", "fp8"], ["none", "fp16", "bf16"]),
    (["train", "--task", "dates2"], ["dates", "reverse", "sort", "copy"]),
    (["translate", "-c", "x.pt", "--strategy", "topk"], ["greedy", "sample", "beam"]),
])
def test_unknown_flag_value_lists_valid_ones(argv, valid, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and all(repr(v) in err for v in valid)


@pytest.mark.parametrize("argv,msg", [
    (["train", "--steps", "0"], "must be an integer >= 1"),
    (["train", "--lr", "-1"], "must be a finite number > 0"),
])
def test_bad_numbers(argv, msg, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert msg in capsys.readouterr().err


def test_train_bad_data_file_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"12\t21\n345\n")
    rc, _, err = _run(["train", "--train", str(bad), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 2 and f"{bad}:2:" in err and "columns" in err
    rc, _, err = _run(["train", *TINY, "--tf-schedule", "exponential", "--tf-c", "0.1",
                       "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "exponential schedule accepts parameters ['k']" in err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "fused_s2s", "train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--tf-schedule" in r.stdout and "--plot-attention" not in r.stdout


def test_torchrun_two_cpu_processes(tmp_path):
    """DistributedDataParallel over gloo: two ranks train together, rank 0 writes the files."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not installed next to this python")
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", "-m", "fused_s2s", "train", *TINY,
                          "--steps", "4", "--eval-every", "0", "--device", "cpu", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _, err = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and the workers it started: nothing left running
        p.communicate()
        pytest.fail("torchrun did not finish in 180 s")
    assert p.returncode == 0, err[-2000:]
    assert "world size 2" in err
    ck = C.load(str(out / "checkpoint.pt"))
    assert ck["step"] == 4 and sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.jsonl", "metrics.png"]


def test_lr_schedule_cosine():
    import argparse

    a = argparse.Namespace(lr=0.01, steps=100, lr_schedule="cosine")
    lrs = [cli.lr_at(i, a) for i in range(101)]
    assert lrs[0] == pytest.approx(0.01) and lrs[100] == pytest.approx(0.0005) and lrs[50] == pytest.approx(0.00525)
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))
    assert cli.lr_at(7, argparse.Namespace(lr=0.01, steps=100, lr_schedule="constant")) == 0.01


def test_demo_short_run(tmp_path, capsys):
    out = tmp_path / "demo"
    rc, stdout, err = _run(["demo", "--out", str(out), "--steps", "2", "--no-bench", "--no-progress"], capsys)
    assert rc == 0, err
    lines = [l for l in stdout.splitlines() if "\t" in l]
    assert [l.split("\t")[0] for l in lines] == ["7/20/69", "20 juillet 1969", "Sonntag, 20. Juli 1969",
                                                 "1969년 7월 20일", "1969年7月20日日曜日", "domingo, 20 de julio de 1969"]
    assert _is_png(out / "attention.png") and _is_png(out / "metrics.png")
    assert C.load(str(out / "checkpoint.pt"))["step"] == 2


def test_translate_beam_early_stop_flag(trained, capsys):
    model, vocab, _ = cli.load_model(trained)
    src, lengths = D.encode_sources(["123", "98765"], vocab)
    for rule in ("count", "bound"):
        rc, out, err = _run(["translate", "-c", trained, "--strategy", "beam", "--beam-size", "3",
                             "--early-stop", rule, "123", "98765"], capsys)
        assert rc == 0, err
        ref = model.generate(src, lengths, 15, strategy="beam", beam_size=3, early_stop=rule)
        assert out.splitlines() == [vocab.decode(ref.tokens[i, 0]) for i in range(2)]
    with pytest.raises(SystemExit) as e:
        cli.main(["translate", "-c", trained, "--strategy", "beam", "--early-stop", "never", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "'count'" in err and "'bound'" in err  # the valid choices are listed


# ------------------------------------------------------------------------------------------ option errors
def test_amp_fp16_needs_cuda_and_bf16_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "fp16"
    rc, _, err = _run(["train", *TINY, "--steps", "2", "--amp", "fp16", "--device", "cpu", "--out", str(out)],
                      capsys)
    assert rc == 2 and err.strip() == "error: --amp fp16 needs a CUDA device (use --amp bf16 on CPU)"
    assert not out.exists()  # rejected before any data, model or file is made
    rc, _, err = _run(["train", *TINY, "--steps", "2", "--eval-every", "0", "--amp", "bf16", "--device", "cpu",
                       "--out", str(tmp_path / "bf16")], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("argv", [["train", *TINY, "--steps", "1"], ["translate", "-c", "CKPT", "123"]])
def test_unavailable_device_is_an_option_error(argv, trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    argv = [trained if a == "CKPT" else a for a in argv] + ["--device", "cuda"]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "o")]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and err.strip() == "error: --device cuda: no CUDA device is available (available: cpu)"


@pytest.mark.parametrize("argv,msg", [
    (["--strategy", "beam", "--beam-size", "2", "--n-best", "3"], "--n-best 3 is larger than --beam-size 2"),
    (["--strategy", "beam", "--n-best", "5"], "--n-best 5 is larger than --beam-size 4"),  # the default size
])
def test_n_best_larger_than_beam_size_is_an_option_error(argv, msg, trained, capsys):
    rc, out, err = _run(["translate", "-c", trained, *argv, "123"], capsys)
    assert rc == 2 and out == "" and err.startswith(f"error: {msg}") and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv,named", [
    (["--n-best", "3"], ["--n-best (only --strategy beam does)"]),
    (["--top-k", "5", "--early-stop", "bound"], ["--early-stop (only --strategy beam does)",
                                                 "--top-k (only --strategy sample does)"]),
    (["--seed", "0"], ["--seed (only --strategy sample does)"]),  # given explicitly, even at its default
    (["--strategy", "sample", "--beam-size", "3"], ["--beam-size (only --strategy beam does)"]),
    (["--strategy", "beam", "--temperature", "0.5", "--top-p", "0.9", "--seed", "1"],
     ["--temperature (only --strategy sample does)", "--top-p (only --strategy sample does)",
      "--seed (only --strategy sample does)"]),
])
def test_option_the_strategy_ignores_is_an_option_error(argv, named, trained, capsys):
    rc, out, err = _run(["translate", "-c", trained, *argv, "123"], capsys)
    strategy = argv[argv.index("--strategy") + 1] if "--strategy" in argv else "greedy"
    assert rc == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: --strategy {strategy} does not use ") and all(n in err for n in named)


def test_cuda_graph_needs_cuda(tmp_path, capsys, monkeypatch):
    out = tmp_path / "g"
    rc, _, err = _run(["train", *TINY, "--steps", "2", "--cuda-graph", "--device", "cpu", "--out", str(out)], capsys)
    assert rc == 2 and err.strip() == "error: --cuda-graph needs a CUDA device, got cpu"
    assert not out.exists()
    # a run trained with it (its flags in the checkpoint) resumes without it: --no-cuda-graph
    monkeypatch.setattr(cli, "_graph_steps", lambda args, device, world: None)  # as on a GPU: accepted
    assert cli.main(["train", *TINY, "--steps", "1", "--eval-every", "0", "--cuda-graph", "--out", str(out)]) == 0
    assert C.load(str(out / "checkpoint.pt"))["train_args"]["cuda_graph"] is True
    monkeypatch.undo()
    rc, _, err = _run(["train", "--resume", "--out", str(out), "--steps", "2"], capsys)
    assert rc == 2 and "--cuda-graph needs a CUDA device" in err
    rc, _, err = _run(["train", "--resume", "--out", str(out), "--steps", "2", "--no-cuda-graph"], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_cuda_graph_training_loop_on_cpu(tmp_path, capsys, monkeypatch, amp):
    """--cuda-graph's wiring, with the 'capture' an identity (the pass runs eagerly, as in
    tests/test_graphs.py): batches padded to multiples of 8, one scheduled capture per shape, each
    step's schedule values passed to the replay, the loss trained on; under --amp, the capture and
    the calls under autocast without its weight cache (which graph_decoder_loss requires)."""
    from fused_s2s import graphs

    monkeypatch.setattr(cli, "_graph_steps", lambda args, device, world: {} if args.cuda_graph else None)
    monkeypatch.setattr(graphs.GraphedDecoderLoss, "make_graphed", staticmethod(lambda module, args: module))
    captures, calls = [], []

    def capture(model, src, src_lengths, tgt, ratio, sampling, tau, *, coin, scheduled):
        captures.append((tuple(src.shape), tuple(tgt.shape), scheduled))
        assert torch.is_autocast_enabled("cpu") == (amp == "bf16")
        assert not (torch.is_autocast_enabled("cpu") and torch.is_autocast_cache_enabled())
        mode = model._check_args(src, src_lengths, tgt, ratio, sampling, tau, coin)
        step = graphs.GraphedDecoderLoss(model, src, src_lengths, tgt, mode, scheduled)

        def call(*batch, teacher_forcing_ratio, tau, check_ids):
            calls.append((teacher_forcing_ratio, tau))
            assert not check_ids  # the command's own ids: not read back (a host sync)
            src, src_lengths, _ = batch
            assert src_lengths.device.type == "cpu" and bool((src_lengths[:-1] >= src_lengths[1:]).all())
            return step(*batch, teacher_forcing_ratio=teacher_forcing_ratio, tau=tau, check_ids=check_ids)
        return call

    monkeypatch.setattr(graphs, "graph_decoder_loss", capture)
    out = tmp_path / "g"
    rc, _, err = _run(["train", *TINY, "--steps", "6", "--eval-every", "0", "--log-every", "2", "--cuda-graph",
                       "--tf-schedule", "linear", "--tf-c", "0.1", "--sampling", "gumbel_hard", "--tau0", "2",
                       "--tau-rate", "0.5", "--tau-every", "1", "--amp", amp, "--out", str(out)], capsys)
    assert rc == 0, err
    assert all(s[1] % 8 == 0 and t[1] % 8 == 0 and sched for s, t, sched in captures)
    assert 1 <= len(captures) == len(set(captures)) <= 6  # one capture per shape
    assert [r for r, _ in calls] == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    taus = [t for _, t in calls]
    assert taus == sorted(taus, reverse=True) and taus[0] == 2.0 and taus[-1] < taus[0]
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs if "loss" in r] == [2, 4, 6]
    assert all(r["loss"] > 0 for r in recs if "loss" in r)
