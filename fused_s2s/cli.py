"""The ``fused-s2s`` command (also ``python -m fused_s2s``): train, translate, bench, demo.

    fused-s2s train      --task dates --steps 2000 --out runs/dates      # see --help for every flag
    fused-s2s translate  -c runs/dates/checkpoint.pt "25 novembre 2026" --plot-attention att.png
    fused-s2s bench      [--quick]
    fused-s2s demo       # what `make demo` runs: short dates training, translate, quick bench

Distributed: ``torchrun --nproc_per_node=N -m fused_s2s train ...`` wraps the model in
DistributedDataParallel (nccl on CUDA, gloo on CPU). Seeds: the model is initialised from
``--seed`` on every rank (DDP then broadcasts rank 0's weights); batches of rank r at step i come
from a generator seeded with (seed, r, i); the model's own draws (coins, Gumbel noise) follow
``torch.manual_seed(seed + r)``. Only rank 0 evaluates, logs and writes files.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time

import torch

from fused_s2s import checkpoint as ckpt_lib
from fused_s2s import data as data_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLING = ("argmax", "sample", "gumbel", "gumbel_hard", "softmax")
COINS = ("token", "step", "sequence")
TF_SCHEDULES = ("constant", "linear", "exponential", "inverse_sigmoid")
AMP = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
BENCHES = ("attention", "gumbel", "train")
# translate options that only one --strategy uses, with their defaults. The parser's defaults are None
# so that an option given for a strategy that ignores it is an error instead of being dropped silently.
STRATEGY_OPTIONS = {"beam": {"beam_size": 4, "n_best": 1, "early_stop": "count"},
                    "sample": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0}}


# ================================================================================= model factory
def model_config(vocab_size: int, hidden: int, cell: str, layers: int, input_feed: bool) -> dict:
    """The hyperparameters a checkpoint is validated against (the Seq2Seq constructor arguments)."""
    return {"src_vocab_size": int(vocab_size), "tgt_vocab_size": int(vocab_size), "hidden_size": int(hidden),
            "cell": cell, "num_layers": int(layers), "padding_idx": data_lib.PAD, "bos_idx": data_lib.BOS,
            "eos_idx": data_lib.EOS, "input_feed": bool(input_feed)}


def build_model(config: dict, backend: str = "auto"):
    """The one place a model is built: the fused ``fused_s2s.model.Seq2Seq`` when it exists, else the
    eager ``fused_s2s.reference.Seq2Seq`` (same constructor, same state_dict)."""
    try:
        from fused_s2s.model import Seq2Seq
    except ModuleNotFoundError as e:
        if e.name != "fused_s2s.model":
            raise  # the fused model exists but one of its imports is broken: say so, never hide it
        from fused_s2s.reference import Seq2Seq
    return Seq2Seq(**config, backend=backend)


# ================================================================================= argument parsing
def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {s}")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" unless the help already says it or there is no meaningful default."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default in (None, False, argparse.SUPPRESS) or not h:
            return h
        return h + " (default: %(default)s)"


def _train_flags(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Training flags. With ``suppress`` no defaults are set: parsing then yields only the flags the
    user gave explicitly (``--resume`` takes every other flag from the checkpoint)."""

    def add(*flags, default=None, **kw):
        p.add_argument(*flags, default=argparse.SUPPRESS if suppress else default, **kw)

    add("--task", choices=data_lib.TASKS, default="dates", help="built-in task")
    add("--train", metavar="FILE", help="your own data: source<TAB>target lines (overrides --task)")
    add("--valid", metavar="FILE", help="held-out data for --train (default: ~5%% of --train by hash)")
    add("--train-size", type=_positive_int, default=50_000, help="built-in tasks: training pool size")
    add("--valid-size", type=_positive_int, default=500, help="built-in tasks: held-out examples evaluated")
    add("--max-len", type=_positive_int, help="longest decoded output (default: longest target + 5)")
    add("--cell", choices=("lstm", "gru"), default="lstm", help="RNN cell of encoder and decoder")
    add("--layers", type=_positive_int, default=1, help="stacked RNN layers")
    add("--hidden", type=_positive_int, default=128, help="hidden size D (= embedding size)")
    add("--input-feed", action="store_true", default=False, help="feed h~_{t-1} into the decoder cell")
    add("--backend", choices=("auto", "triton", "eager"), default="auto",
        help="auto: Triton kernels on CUDA, eager on CPU (FUSED_S2S_BACKEND overrides)")
    add("--tf-schedule", choices=TF_SCHEDULES, default="constant",
        help="teacher-forcing ratio: constant=k, linear=max(eps, k-c*i), exponential=k**i, "
             "inverse_sigmoid=k/(k+exp(i/k))")
    add("--tf-k", type=float, help="schedule parameter k (defaults: constant 1, linear 1, exponential 0.9999, "
                                   "inverse_sigmoid 1000)")
    add("--tf-c", type=float, help="linear schedule slope c (default 1e-4)")
    add("--tf-eps", type=float, help="linear schedule floor eps (default 0)")
    add("--sampling", choices=SAMPLING, default="argmax", help="what the model feeds itself when the coin says so")
    add("--tau0", type=_positive_float, default=1.0, help="Gumbel/softmax temperature at step 0")
    add("--tau-min", type=_positive_float, default=0.5, help="temperature floor")
    add("--tau-rate", type=float, default=1e-4, help="tau = max(tau_min, tau0*exp(-rate*i))")
    add("--tau-every", type=_positive_int, default=100, help="update tau every N steps")
    add("--coin", choices=COINS, default="token", help="scheduled-sampling coin per token / step / sequence")
    add("--batch-size", type=_positive_int, default=64, help="sequences per step (per rank)")
    add("--steps", type=_positive_int, default=2000, help="total optimiser steps")
    add("--lr", type=_positive_float, default=3e-3, help="Adam learning rate")
    add("--lr-schedule", choices=("constant", "cosine"), default="constant",
        help="cosine: lr decays to lr/20 at --steps (a pure function of the step: resumable)")
    add("--clip", type=_positive_float, default=1.0, help="gradient-norm clipping")
    add("--amp", choices=tuple(AMP), default="none", help="autocast dtype (fp16: CUDA only, with loss scaling)")
    add("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
        help="replay the decoder pass and loss from CUDA graphs (fused_s2s.graphs, scheduled=True: the "
             "schedules' ratio and tau are written each step): one capture per batch shape, lengths padded "
             "to multiples of 8. CUDA, one process (--no-cuda-graph: a resumed run without)")
    add("--seed", type=int, default=0, help="data split, initial weights, batches, draws")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    add("--threads", type=_positive_int, help="CPU threads for torch (default: half the cores, at most 4)")
    add("--out", metavar="DIR", default="runs/train", help="checkpoint, metrics.jsonl, metrics.png go here")
    add("--eval-every", type=_nonneg_int, default=250, help="evaluate + checkpoint every N steps (0: at the end)")
    add("--log-every", type=_positive_int, default=10, help="metrics.jsonl line every N steps")
    add("--no-progress", action="store_true", default=False, help="no tqdm progress bar")
    add("--resume", nargs="?", const="", metavar="CKPT",
        help="continue from CKPT (default: OUT/checkpoint.pt); flags not given are taken from the checkpoint")


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fused-s2s", description="Attention seq2seq with fused Triton kernels.")
    sub = p.add_subparsers(dest="command", metavar="{train,translate,bench,demo}")
    sub.required = True

    t = sub.add_parser("train", help="train a Seq2Seq and save a checkpoint",
                       formatter_class=_DefaultsFormatter)
    _train_flags(t, suppress)

    tr = sub.add_parser("translate", help="decode inputs (arguments or stdin) with a checkpoint")
    tr.add_argument("inputs", nargs="*", help="source strings; none or '-' reads lines from stdin")
    tr.add_argument("-c", "--checkpoint", required=True)
    tr.add_argument("--strategy", choices=("greedy", "sample", "beam"), default="greedy")
    beam, smp = STRATEGY_OPTIONS["beam"], STRATEGY_OPTIONS["sample"]  # defaults filled in by translate()
    tr.add_argument("--beam-size", type=_positive_int, help=f"beam: hypotheses kept (default {beam['beam_size']})")
    tr.add_argument("--n-best", type=_positive_int,
                    help=f"beam: outputs per input, tab-separated, <= --beam-size (default {beam['n_best']})")
    tr.add_argument("--early-stop", choices=("count", "bound"),
                    help="beam: stop after beam-size finished hypotheses, or only when none can improve "
                         f"(default {beam['early_stop']})")
    tr.add_argument("--temperature", type=_positive_float,
                    help=f"sample: softmax temperature (default {smp['temperature']})")
    tr.add_argument("--top-k", type=_nonneg_int, help=f"sample: 0 = no top-k filter (default {smp['top_k']})")
    tr.add_argument("--top-p", type=float, help=f"sample: nucleus mass in (0, 1] (default {smp['top_p']})")
    tr.add_argument("--seed", type=int, help=f"sample: sampling seed (default {smp['seed']})")
    tr.add_argument("--max-len", type=_positive_int, help="default: from the checkpoint")
    tr.add_argument("--backend", choices=("auto", "triton", "eager"), default="auto")
    tr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    tr.add_argument("--batch-size", type=_positive_int, default=64)
    tr.add_argument("--with-source", action="store_true", help="print 'source<TAB>output'")
    tr.add_argument("--plot-attention", metavar="FILE.png", help="attention heatmaps (first 6 inputs)")

    b = sub.add_parser("bench", help="kernel and training-step benchmarks (table, CSV, PNG)")
    b.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    b.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    b.add_argument("--bench-dir", default=os.path.join(REPO_ROOT, "benchmarks"))
    b.add_argument("--results-dir", default=None, help="default: BENCH_DIR/results")

    d = sub.add_parser("demo", help="short dates training, a translate with attention plot, a quick bench")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=_positive_int, default=None, help="override the demo's training steps")
    d.add_argument("--no-bench", action="store_true")
    d.add_argument("--no-progress", action="store_true")
    return p


# ================================================================================= helpers
def _device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():  # an option error like the others (ValueError: exit 2)
            raise ValueError("--device cuda: no CUDA device is available (available: cpu)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _set_threads(n: int | None, device: torch.device) -> None:
    """Small per-step matmuls gain little from many threads, and oversubscribed cores make torch's
    OpenMP threads spin against each other (10x slower seen on a busy 2-core box): use few."""
    if device.type != "cpu":
        return
    if n is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return
        n = max(1, min(4, (os.cpu_count() or 2) // 2))
    torch.set_num_threads(n)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tf_schedule(args):
    from fused_s2s.schedules import make_ratio_schedule

    params = {}
    if args.tf_k is not None:
        params["value" if args.tf_schedule == "constant" else "k"] = args.tf_k
    if args.tf_c is not None:
        params["c"] = args.tf_c
    if args.tf_eps is not None:
        params["eps"] = args.tf_eps
    return make_ratio_schedule(args.tf_schedule, **params)


def tau_schedule(args):
    from fused_s2s.schedules import TemperatureSchedule

    return TemperatureSchedule(tau0=args.tau0, r=args.tau_rate, tau_min=args.tau_min, every=args.tau_every)


def evaluate(model, pairs, vocab, max_len: int, device, batch_size: int = 256) -> dict:
    """Free-running greedy decoding: exact match and token accuracy (target chars + EOS, by position)."""
    was_training = model.training
    model.eval()
    exact = tok_ok = tok_all = 0
    with torch.no_grad():
        for chunk, batch in data_lib.batches(pairs, vocab, batch_size, device):
            out = model.generate(batch.src, batch.src_lengths, max_len, strategy="greedy")
            pred = out.tokens[:, 0].tolist()  # (B, T') one host copy per batch
            for (src, tgt), p in zip(chunk, pred):
                gold = vocab.encode(tgt, eos=True)
                exact += vocab.decode(p) == tgt
                tok_ok += sum(1 for i, g in enumerate(gold) if i < len(p) and p[i] == g)
                tok_all += len(gold)
    model.train(was_training)
    return {"eval_exact": exact / max(1, len(pairs)), "eval_token_acc": tok_ok / max(1, tok_all), "n_eval": len(pairs)}


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: str) -> str:
    """Write a PNG atomically (temp file + os.replace) so a reader never sees half an image."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.png"
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def plot_metrics(records: list[dict], path: str) -> str:
    plt = _mpl()
    train = [r for r in records if "loss" in r]
    ev = [r for r in records if "eval_exact" in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        a1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
        a1.set_yscale("log")
    a1.set(title="training loss (cross-entropy)", xlabel="step", ylabel="loss")
    if ev:
        steps = [r["step"] for r in ev]
        a2.plot(steps, [100 * r["eval_exact"] for r in ev], "o-", label="exact match")
        a2.plot(steps, [100 * r["eval_token_acc"] for r in ev], "s-", label="token accuracy")
        a2.legend(loc="lower right")
    a2.set(title="held-out accuracy (greedy decoding)", xlabel="step", ylabel="%", ylim=(0, 100))
    fig.tight_layout()
    try:
        return _savefig(fig, path)
    finally:
        plt.close(fig)


# ================================================================================= train
def _explicit_train_flags(argv) -> set[str]:
    ns, _ = build_parser(suppress=True).parse_known_args(argv)
    return set(vars(ns)) - {"command"}


def _dist_setup():
    """(rank, world_size, local_rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), local


def lr_at(step: int, args) -> float:
    if args.lr_schedule == "cosine":
        frac = min(step, args.steps) / args.steps
        return args.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac)))
    return args.lr


def _batch_indices(n: int, batch_size: int, seed: int, rank: int, step: int) -> torch.Tensor:
    """Batch of rank ``rank`` at ``step``: a pure function of (seed, rank, step), so a resumed run
    draws exactly the batches the uninterrupted run would have drawn."""
    g = torch.Generator().manual_seed(((seed & 0xFFFFFF) << 40) ^ (rank << 32) ^ step)
    return torch.randint(n, (batch_size,), generator=g)


_GRAPH_PAD = 8  # --cuda-graph: source and target lengths rounded up to a multiple of this


def _graph_steps(args, device, world: int):
    """--cuda-graph: refuse what a replayed pass cannot do, else an empty {shape: step} cache."""
    if not getattr(args, "cuda_graph", False):
        return None
    if device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device, got {device}")
    if world > 1:
        raise ValueError("--cuda-graph runs one process: the replay bypasses DistributedDataParallel's forward")
    return {}


def _graph_step(graphed: dict, model, batch, ratio: float, tau: float, args):
    """The decoder pass and loss of ``batch`` replayed from the graph of its shape, captured at the
    first batch of that shape (scheduled: the ratio and tau are this step's)."""
    from fused_s2s import graphs

    key = (tuple(batch.src.shape), tuple(batch.tgt.shape))
    step = graphed.get(key)
    if step is None:
        step = graphed[key] = graphs.graph_decoder_loss(model, batch.src, batch.src_lengths, batch.tgt, ratio,
                                                        args.sampling, tau, coin=args.coin, scheduled=True)
    return step(batch.src, batch.src_lengths, batch.tgt, teacher_forcing_ratio=ratio, tau=tau, check_ids=False)


def train(args, explicit: set[str] | None = None) -> dict:
    explicit = set(vars(args)) if explicit is None else explicit
    rank, world, local = _dist_setup()
    main_proc = rank == 0
    say = _err if main_proc else (lambda *a, **k: None)

    resumed = None
    if args.resume is not None:
        path = args.resume or os.path.join(args.out, "checkpoint.pt")
        resumed = ckpt_lib.load(path)
        for k, v in resumed.get("train_args", {}).items():
            if k not in explicit and k not in ("resume", "command") and hasattr(args, k):
                setattr(args, k, v)
        say(f"resuming from {path} at step {resumed['step']}")

    device = _device(args.device, local)
    if args.amp == "fp16" and device.type != "cuda":  # fp16 autocast + loss scaling: CUDA only here
        raise ValueError("--amp fp16 needs a CUDA device (use --amp bf16 on CPU)")
    graphed = _graph_steps(args, device, world)  # {(src shape, tgt shape): step} or None
    _set_threads(args.threads, device)
    data = data_lib.load_task(args.task, seed=args.seed, n_train=args.train_size, n_valid=args.valid_size,
                              train_file=args.train, valid_file=args.valid)
    vocab = data.vocab
    max_len = args.max_len or (max(len(t) for _, t in data.train[:20_000] + data.valid) + 5)
    config = model_config(len(vocab), args.hidden, args.cell, args.layers, args.input_feed)
    if resumed is not None:  # same validation as a fresh load, now that the requested config is known
        diffs = ckpt_lib.config_diff(resumed["config"], config)
        if diffs:
            raise ckpt_lib.CheckpointMismatch(
                "the checkpoint has a different model configuration: " + "; ".join(diffs))
        if resumed["vocab"] != vocab.to_dict():
            raise ckpt_lib.CheckpointMismatch("the checkpoint's vocabulary differs from this data's "
                                              f"({len(resumed['vocab']['itos'])} vs {len(vocab)} entries)")

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_model(config, backend=args.backend).to(device)
    # on CUDA the fused Adam: one kernel for all parameters per step where the default (foreach)
    # launches several; the same update and state_dict format (a checkpoint resumes either way)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    sched = {"tf": tf_schedule(args), "tau": tau_schedule(args)}
    step = 0
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        if resumed.get("optimizer"):
            opt.load_state_dict(resumed["optimizer"])
            for group in opt.param_groups:
                group["lr"] = args.lr
        sched_flags = {"tf_schedule", "tf_k", "tf_c", "tf_eps", "tau0", "tau_min", "tau_rate", "tau_every"}
        for name, s in sched.items():
            if name in resumed["schedules"] and not (explicit & sched_flags):
                s.load_state_dict(resumed["schedules"][name])
        step = int(resumed["step"])
    torch.manual_seed(args.seed + rank)  # the model's own draws (coins, Gumbel noise) per rank
    if resumed is not None:
        if rank == 0:
            ckpt_lib.set_rng_state(resumed["rng"])
        else:
            torch.manual_seed(args.seed + rank + 1_000_003 * step)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[local] if device.type == "cuda" else None)

    amp_dtype = AMP[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=(args.amp == "fp16" and device.type == "cuda"))
    out_dir = args.out
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    plot_path = os.path.join(out_dir, "metrics.png")
    train_args = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    records: list[dict] = []
    if main_proc:
        os.makedirs(out_dir, exist_ok=True)
        # a resumed run continues the curve: keep the records up to the checkpoint's step
        records = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= step] if resumed else []
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        say(f"task {data.name}: {len(data.train)} training / {len(data.valid)} held-out examples, "
            f"vocab {len(vocab)}, model {type(model).__module__}.{type(model).__name__} {config['cell']} "
            f"D={config['hidden_size']} layers={config['num_layers']}, device {device}, world size {world}")

    def save():
        return ckpt_lib.save(ckpt_path, model=model, config=config, vocab=vocab, step=step, optimizer=opt,
                             schedules=sched, train_args=train_args,
                             extra={"task": data.name, "max_len": max_len})

    def log(rec):
        records.append(rec)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def run_eval():
        res = evaluate(model, data.valid, vocab, max_len, device)
        log({"step": step, **res})
        save()
        plot_metrics(records, plot_path)
        return res

    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=min(step, args.steps), disable=not main_proc or args.no_progress,
               dynamic_ncols=True, desc="train", file=sys.stderr)
    last = {}
    loss_sum = torch.zeros((), device=device)
    n_loss, tokens, t0 = 0, 0, time.perf_counter()
    net.train()
    try:
        while step < args.steps:
            idx = _batch_indices(len(data.train), args.batch_size, args.seed, rank, step).tolist()
            # longest source first: the encoder packs without a device copy of the sort order, and
            # with the ids built here (check_ids=False) and the lengths on the CPU a step makes no
            # host sync, so the host prepares the next batch while the GPU runs this one
            pairs = sorted((data.train[i] for i in idx), key=lambda p: -len(p[0]))
            batch = data_lib.collate(pairs, vocab, device, pad_multiple=_GRAPH_PAD if graphed is not None else 1)
            ratio = float(sched["tf"](step))
            tau = float(sched["tau"](step))
            # graphs: autocast without its weight cache, which a capture must not hold (fused_s2s.graphs)
            ctx = (torch.autocast(device.type, dtype=amp_dtype, cache_enabled=graphed is None) if amp_dtype
                   else contextlib.nullcontext())
            with ctx:
                if graphed is None:
                    out = net(batch.src, batch.src_lengths, batch.tgt, teacher_forcing_ratio=ratio,
                              sampling=args.sampling, tau=tau, coin=args.coin, check_ids=False)
                else:
                    out = _graph_step(graphed, model, batch, ratio, tau, args)
            opt.zero_grad(set_to_none=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
            scaler.scale(out.loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            scaler.step(opt)
            scaler.update()
            step += 1
            for s in sched.values():
                s.i = step
            loss_sum += out.loss.detach().float()
            n_loss += 1
            tokens += sum(len(t) + 1 for _, t in pairs)
            if step % args.log_every == 0 or step == args.steps:
                dt = max(time.perf_counter() - t0, 1e-9)
                loss = loss_sum.item() / n_loss  # the one host sync, every log_every steps
                last = {"step": step, "loss": loss, "tf_ratio": ratio, "tau": tau,
                        "tokens_per_s": tokens * world / dt, "lr": opt.param_groups[0]["lr"]}
                if main_proc:
                    log(last)
                bar.set_postfix(loss=f"{loss:.3f}", tf=f"{ratio:.2f}", tau=f"{tau:.2f}",
                                tok_s=f"{tokens * world / dt:.0f}", refresh=False)
                loss_sum.zero_()
                n_loss, tokens, t0 = 0, 0, time.perf_counter()
            bar.update(1)
            if main_proc and args.eval_every and step % args.eval_every == 0 and step < args.steps:
                res = run_eval()
                bar.write(f"step {step}: exact match {100 * res['eval_exact']:.1f}%, "
                          f"token accuracy {100 * res['eval_token_acc']:.1f}%")
                t0 = time.perf_counter()  # tokens/s counts training time only
    except KeyboardInterrupt:
        bar.close()
        if main_proc:
            save()
            say(f"interrupted at step {step}: checkpoint saved to {ckpt_path} (continue with --resume)")
        raise
    bar.close()
    result = dict(last)
    if main_proc:
        res = run_eval()
        result.update(res)
        say(f"step {step}: exact match {100 * res['eval_exact']:.1f}%, token accuracy "
            f"{100 * res['eval_token_acc']:.1f}% on {res['n_eval']} held-out examples")
        say(f"wrote {ckpt_path}, {metrics_path}, {plot_path}")
    if world > 1:
        import gc

        import torch.distributed as dist

        dist.barrier()  # the others wait for rank 0's final evaluation and checkpoint
        # DDP's reducer holds the group: free it while the group is alive (a reducer outlived by its
        # gloo group has ended a worker with SIGABRT at teardown, tests/test_ddp.py)
        net = out = None  # (out: unbound when a resumed run had no step left)
        gc.collect()
        dist.destroy_process_group()
    return result


# ================================================================================= translate
def load_model(path: str, backend: str = "auto", device=None):
    """(model in eval mode, vocab, checkpoint dict) from a training checkpoint."""
    ck = ckpt_lib.load(path)
    vocab = data_lib.Vocab.from_dict(ck["vocab"])
    model = build_model(ck["config"], backend=backend)
    model.load_state_dict(ck["model"])
    model.to(device or "cpu").eval()
    return model, vocab, ck


def _glyph_label(chars: list[str]) -> list[str]:
    """Tick labels: the character when a font we have can draw it, else its code point."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    if not hasattr(_glyph_label, "maps"):
        maps = []
        for path in [font_manager.findfont("DejaVu Sans")] + [f for _, f in _cjk_fonts()]:
            try:
                maps.append(FT2Font(path).get_charmap())
            except Exception:
                pass
        _glyph_label.maps = maps
    out = []
    for c in chars:
        if c == " ":
            out.append("␣")
        elif len(c) == 1 and not any(ord(c) in m for m in _glyph_label.maps):
            out.append(f"U+{ord(c):04X}")
        else:
            out.append(c)
    return out


def _cjk_fonts() -> list[tuple[str, str]]:
    """(family, file) of installed fonts that draw Hangul/Kanji (none on a bare machine)."""
    from matplotlib import font_manager

    keys = ("CJK", "Nanum", "WenQuanYi", "Droid Sans Fallback", "Source Han", "IPAGothic", "IPAexGothic")
    return sorted({(f.name, f.fname) for f in font_manager.fontManager.ttflist if any(k in f.name for k in keys)})


def plot_attention(items, path: str) -> str:
    """items: list of (source str, output chars list, alpha (T', L) array). One heatmap each.
    Characters no installed font can draw (Hangul, Kanji without a CJK font) are labelled U+XXXX."""
    plt = _mpl()
    cjk = list(dict.fromkeys(name for name, _ in _cjk_fonts()))
    if cjk:  # matplotlib >= 3.6 falls back glyph by glyph along the family list
        plt.rcParams["font.family"] = ["DejaVu Sans", *cjk]
    n = len(items)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (src, out_chars, alpha) in zip(axes.flat, items):
        ax.imshow(alpha, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(src)))
        ax.set_xticklabels(_glyph_label(list(src)), fontsize=8, rotation=90 if any(len(x) > 1 for x in
                                                                                  _glyph_label(list(src))) else 0)
        ax.set_yticks(range(len(out_chars)))
        ax.set_yticklabels(_glyph_label(out_chars), fontsize=8)
        ax.set_xlabel("source characters")
        ax.set_ylabel("output characters")
        ax.set_title(f"{''.join(c for c in out_chars if len(c) == 1)}", fontsize=9)
    fig.tight_layout()
    try:
        return _savefig(fig, path)
    finally:
        plt.close(fig)


def translate_texts(model, vocab, texts, *, max_len: int, strategy="greedy", batch_size=64, **kw):
    """-> list of (outputs: list[str] (n-best), scores: list[float], tokens (N, T'), alpha (N, T', L))."""
    device = next(model.parameters()).device
    results = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        src, lengths = data_lib.encode_sources(chunk, vocab, device)
        with torch.no_grad():
            out = model.generate(src, lengths, max_len, strategy=strategy, **kw)
        toks, scores, att = out.tokens.cpu(), out.scores.float().cpu(), out.attention.float().cpu()
        for b, text in enumerate(chunk):
            outs = [vocab.decode(toks[b, n]) for n in range(toks.shape[1])]
            results.append((outs, scores[b].tolist(), toks[b], att[b, :, :, : len(text)]))
    return results


def _output_chars(vocab, ids) -> list[str]:
    chars = []
    for i in ids.tolist():
        if i == data_lib.EOS:
            chars.append("</s>")
            break
        if i == data_lib.PAD:
            break
        chars.append(vocab.itos[i] if i >= len(data_lib.SPECIALS) else data_lib.UNK_CHAR)
    return chars


def _strategy_options(args) -> None:
    """Reject the options given explicitly that --strategy does not use, fill in the defaults of the
    others (the parser leaves them None), and check --n-best against --beam-size."""
    ignored = [f"--{k.replace('_', '-')} (only --strategy {s} does)" for s, opts in STRATEGY_OPTIONS.items()
               if s != args.strategy for k in opts if getattr(args, k) is not None]
    if ignored:
        raise ValueError(f"--strategy {args.strategy} does not use {', '.join(ignored)}")
    for opts in STRATEGY_OPTIONS.values():
        for k, v in opts.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    if args.n_best > args.beam_size:  # beam_search raises for this too: say it in terms of the flags
        raise ValueError(f"--n-best {args.n_best} is larger than --beam-size {args.beam_size} "
                         "(a beam search returns at most beam-size hypotheses)")


def translate(args) -> int:
    _strategy_options(args)
    device = _device(args.device)
    _set_threads(None, device)
    model, vocab, ck = load_model(args.checkpoint, args.backend, device)
    texts = list(args.inputs)
    if not texts or texts == ["-"]:
        texts = [line.rstrip("\r\n") for line in sys.stdin]
        texts = [t for t in texts if t]
    if not texts:
        _err("error: nothing to translate (give strings as arguments or lines on stdin)")
        return 2
    unknown = sorted({c for t in texts for c in t if c not in vocab.stoi})
    if unknown:
        _err(f"warning: characters not in the training vocabulary (read as <unk>): {''.join(unknown)!r}")
    max_len = args.max_len or int(ck.get("extra", {}).get("max_len", 64))
    kw = {}
    if args.strategy == "sample":
        gen = torch.Generator(device=device).manual_seed(args.seed)
        kw = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "generator": gen}
    elif args.strategy == "beam":
        kw = {"beam_size": args.beam_size, "n_best": args.n_best, "early_stop": args.early_stop}
    results = translate_texts(model, vocab, texts, max_len=max_len, strategy=args.strategy,
                              batch_size=args.batch_size, **kw)
    for text, (outs, _, _, _) in zip(texts, results):
        line = "\t".join(outs)
        print(f"{text}\t{line}" if args.with_source else line, flush=True)
    if args.plot_attention:
        items = []
        for text, (_, _, toks, att) in list(zip(texts, results))[:6]:
            chars = _output_chars(vocab, toks[0])
            items.append((text, chars, att[0, : len(chars)].numpy()))
        _err(f"attention plot: {plot_attention(items, args.plot_attention)}")
    return 0


# ================================================================================= bench
def _import_bench(path: str, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_fused_s2s_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read_csv(path: str) -> list[dict]:
    import csv

    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _bench_table(rows: list[dict]) -> str:
    cols = ["bench", "impl", "case", "dtype", "pass", "median_ms", "gbps", "peak_mem_mb", "note"]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def plot_bench(rows: list[dict], path: str, title: str) -> str:
    """Horizontal bars: median time per (case, dtype, pass), one bar per implementation."""
    plt = _mpl()

    def key(r):
        return f"{r.get('bench')} {r.get('case')} {r.get('dtype')} {r.get('pass')}"

    keys = list(dict.fromkeys(key(r) for r in rows))
    impls = list(dict.fromkeys(str(r.get("impl")) for r in rows))
    fig, ax = plt.subplots(figsize=(9, 0.45 * max(3, len(keys) * max(1, len(impls))) + 1))
    if not rows:
        ax.text(0.5, 0.5, "no results (see the command's output)", ha="center", va="center")
        ax.axis("off")
    else:
        h = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            ys, xs = [], []
            for i, k in enumerate(keys):
                for r in rows:
                    if str(r.get("impl")) == impl and key(r) == k:
                        ys.append(i + j * h)
                        xs.append(float(r["median_ms"]))
            ax.barh(ys, xs, height=h, label=impl)
        ax.set_yticks([i + 0.4 - h / 2 for i in range(len(keys))])
        ax.set_yticklabels(keys, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("median time (ms, log scale)")
        ax.legend()
    dev = rows[0].get("device", "") if rows else ("cuda" if torch.cuda.is_available() else "cpu")
    ax.set_title(f"{title} — {dev}")
    fig.tight_layout()
    try:
        return _savefig(fig, path)
    finally:
        plt.close(fig)


def bench(args) -> int:
    import csv

    results_dir = args.results_dir or os.path.join(args.bench_dir, "results")
    os.makedirs(results_dir, exist_ok=True)
    if not torch.cuda.is_available():
        print("No CUDA device: the fused (Triton) and torch.compile columns need CUDA and are skipped; "
              "timing the eager reference on the CPU.", flush=True)
    all_rows, failed, ran = [], [], 0
    for name in args.only:
        path = os.path.join(args.bench_dir, f"bench_{name}.py")
        if not os.path.exists(path):
            print(f"[bench] {name}: {path} not found (benchmarks/ ships with the repository, not the "
                  f"installed package: run from a checkout or pass --bench-dir): skipped", flush=True)
            continue
        print(f"[bench] {name}: running {path}{' --quick' if args.quick else ''}", flush=True)
        shared_csv = os.path.join(args.bench_dir, "results", "results.csv")
        n_before = len(_read_csv(shared_csv))
        try:
            mod = _import_bench(path, name)
            rows = mod.main(["--quick"] if args.quick else [])
            if rows is None:  # a main() that only appends to results.csv: take the rows it added
                rows = _read_csv(shared_csv)[n_before:]
        except Exception as e:  # one broken benchmark must not hide the others' results
            failed.append(name)
            print(f"[bench] {name}: FAILED ({type(e).__name__}: {e})", flush=True)
            continue
        ran += 1
        rows = [dict(r) for r in (rows or [])]
        all_rows += rows
        if rows:
            print(f"[bench] {name}: plot {plot_bench(rows, os.path.join(results_dir, f'bench_{name}.png'), name)}")
    if all_rows:
        print(_bench_table(all_rows))
    fields = list(dict.fromkeys(k for r in all_rows for k in r)) or ["bench", "impl", "case", "median_ms"]
    csv_path = os.path.join(results_dir, "latest.csv")
    tmp = csv_path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(all_rows)
    os.replace(tmp, csv_path)
    png = plot_bench(all_rows, os.path.join(results_dir, "latest.png"), "fused-s2s bench")
    print(f"[bench] {len(all_rows)} rows from {ran} benchmark(s) -> {csv_path}, {png}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


# ================================================================================= demo
# Tuned on a shared 2-core CPU: ~1 min of training, ~98% exact match on the held-out dates (the
# misses are short en_US/es_ES forms such as 1/21/05, some of them ambiguous without a locale).
DEMO_TRAIN = ["--task", "dates", "--hidden", "128", "--batch-size", "64", "--steps", "1000", "--lr", "3e-3",
              "--lr-schedule", "cosine", "--eval-every", "250", "--valid-size", "300", "--train-size", "50000"]
DEMO_DATE = datetime.date(1969, 7, 20)
DEMO_LOCALES = [("en_US", "short"), ("fr_FR", "long"), ("de_DE", "full"), ("ko_KR", "long"),
                ("ja_JP", "full"), ("es_ES", "full")]


def demo(args) -> int:
    t0 = time.perf_counter()
    argv = ["train", *DEMO_TRAIN, "--out", args.out]
    if args.steps:
        argv += ["--steps", str(args.steps)]
    if args.no_progress:
        argv.append("--no-progress")
    print(f"[demo] 1/3 fused-s2s {' '.join(argv)}", flush=True)
    res = main(argv)
    if res != 0:
        return res
    fmt = data_lib.DateFormatter([l for l, _ in DEMO_LOCALES])
    texts = [fmt(DEMO_DATE, l, f) for l, f in DEMO_LOCALES]
    ck = os.path.join(args.out, "checkpoint.pt")
    att = os.path.join(args.out, "attention.png")
    print(f"\n[demo] 2/3 fused-s2s translate -c {ck} --with-source --plot-attention {att} "
          + " ".join(repr(t) for t in texts), flush=True)
    main(["translate", "-c", ck, "--with-source", "--plot-attention", att, *texts])
    print(f"(expected {DEMO_DATE.isoformat()} for every line)", flush=True)
    if not args.no_bench:
        print("\n[demo] 3/3 fused-s2s bench --quick", flush=True)
        main(["bench", "--quick"])
    print(f"\n[demo] done in {time.perf_counter() - t0:.0f} s; outputs in {args.out}/", flush=True)
    return res


# ================================================================================= entry point
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            train(args, _explicit_train_flags(argv))
            return 0
        if args.command == "translate":
            return translate(args)
        if args.command == "bench":
            return bench(args)
        if args.command == "demo":
            return demo(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except (ValueError, FileNotFoundError) as e:  # bad data / checkpoint / option: one clear line
        if os.environ.get("FUSED_S2S_DEBUG"):
            raise
        _err(f"error: {e}")
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
