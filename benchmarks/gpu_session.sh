#!/usr/bin/env bash
# One-command GPU runbook (docs/gpu.md): the test suite and the benchmarks on a CUDA machine whose
# python3 already has torch + triton, within one 10-minute command each, output kept short (the
# device tool returns only the last 12,000 characters; the details go to log files under $OUT).
#
#   benchmarks/gpu_session.sh setup   install the package (editable, --no-deps), babel from .whl/ if
#                                     missing, print torch / triton / GPU; idempotent, run by the others
#   benchmarks/gpu_session.sh test    pytest -m gpu first (never run before), then -m "not gpu" on
#                                     pytest-xdist; a pass/fail/skip summary as the last lines
#   benchmarks/gpu_session.sh bench   bench_attention, bench_gumbel, bench_train: fused + eager first,
#                                     then torch.compile, each under its own time budget; rows go to
#                                     $OUT/results.csv as they are measured; a compact table last
#   benchmarks/gpu_session.sh all     setup + test + bench (for a machine with more time)
#   benchmarks/gpu_session.sh recheck a second, shorter call after fixes (~500 s): -m gpu and kernel tests,
#                                     benchmarks/sweep_{attention,gumbel}.py (kernel configs, sweep.txt),
#                                     22 s attention and 15 s Gumbel fuzz on CUDA, host_overhead.py --cuda,
#                                     fused-s2s train with and without --cuda-graph (tokens/s, sweep.txt),
#                                     attention long/tf/large, train large teacher forcing, graphed bf16 notes
#   benchmarks/gpu_session.sh profile benchmarks/profile_step.py: kernels per training step, GPU-busy vs
#                                     wall time (fused, fused_graphed; teacher forcing, ss_gumbel_hard)
#   benchmarks/gpu_session.sh cli     fused-s2s train with and without --cuda-graph (GPU_CLI_TIMEOUT=120 s
#                                     for both): tokens/s per 50 steps, into $OUT/cli.txt
#   benchmarks/gpu_session.sh stages  the sweeps' --stages-only rows alone (GPU_STAGES_TIMEOUT=120 s for both):
#                                     the loops' software-pipelining depth side by side, into $OUT/stages.txt
#   benchmarks/gpu_session.sh unaligned sweep_attention.py at large_odd,long_odd (D 1000 / 500, L not a
#                                     multiple of 16; GPU_UNALIGNED_TIMEOUT=150 s): the launcher's unaligned
#                                     tiles (_UNALIGNED_CONFIGS, session 16) against the measured ones, into
#                                     $OUT/unaligned.txt
#   benchmarks/gpu_session.sh tiles   sweep_attention.py at tf128,tf256 (teacher forcing at D 128 / 256, 16-bit;
#                                     GPU_TILES_TIMEOUT=150 s): the tiled kernels' session-18 tiles against
#                                     the ones before (TILED_TILES), into $OUT/tiles.txt
#   benchmarks/gpu_session.sh compile the training step's torch.compile(reference) column alone, beside
#                                     fused, fused_graphed and the reference in the same run (notes' size,
#                                     fp32, teacher forcing and gumbel_hard; GPU_COMPILE_TIMEOUT=300 s),
#                                     rows into $OUT/results.csv: issue 6's missing column, when budget's
#                                     100 s did not fit the compiles (a cold compile took 27 s on this
#                                     project's CPU, 4 s with inductor's cache warm); last, torch.compile
#                                     of the fused model (fused_compile: the fused ops as custom ops in its graphs)
#   benchmarks/gpu_session.sh budget  everything that matters in ONE command of at most GPU_BUDGET=570 s,
#                                     counted from the script's start (setup included; a 15-minute
#                                     device session: one start + one 10-minute call, timeout_s=600):
#                                     -m gpu tests, the benchmarks at every size with few repetitions
#                                     (fused + eager, then torch.compile, largest sizes first), the
#                                     loops' num_stages side by side (sweeps --stages-only, profile.txt),
#                                     then the kernel tests on CUDA with whatever time is left
#
# Files under $OUT (default /tmp/fused_s2s_out), at most 8 (what the device tool returns):
# setup.log, pytest_gpu.{log,xml},
# pytest_rest.{log,xml}, bench.log, results.csv, profile.txt.
# Environment (all optional):
#   PYTHON=python3            interpreter (locally: PYTHON=.venv/bin/python)
#   GPU_SKIP_INSTALL=1        skip the pip install of the package (already installed)
#   GPU_SITE=/tmp/site        where .whl/*.whl are installed (prepended to PYTHONPATH)
#   GPU_TEST_TIMEOUT=520      wall limit (s) of the whole test phase; GPU_TEST_GPU_TIMEOUT=150 of the -m gpu pass
#   GPU_PYTEST_ARGS=          test selection / extra pytest args (word-split), e.g. "tests/test_gumbel.py -x"
#   GPU_XDIST=8               pytest-xdist workers for the -m "not gpu" pass (0: no xdist);
#   GPU_XDIST_DIST=loadfile   its --dist mode ("load" balances better when one file dominates)
#   GPU_PYTEST_PER_TEST=300   pytest-timeout per test (when pytest-timeout is importable)
#   GPU_BENCH_ONLY=attention,gumbel,train      which benchmarks
#   GPU_BENCH_NO_COMPILE=1    skip the torch.compile passes
#   GPU_BENCH_QUICK=1         --quick (fewer repetitions; bench_train: the notes' size only)
#   GPU_BENCH_ARGS=           extra args for bench_attention / bench_gumbel (e.g. "--dtypes bfloat16")
#   GPU_BENCH_T_{ATTENTION,GUMBEL,TRAIN}=100,70,100, GPU_BENCH_T_TRAIN_GRAPHED=40 and
#   GPU_BENCH_T_{ATTENTION,GUMBEL,TRAIN}_COMPILE=80,60,80: seconds per benchmark pass (sum 530)
#   GPU_BUDGET=570            budget: wall limit (s) from the script's start, setup included; its passes
#                             take gpu tests 90, attention 55, gumbel 40, train 70 + graphed 35, profile 40,
#                             host overhead 30 (benchmarks/host_overhead.py --cuda, into profile.txt),
#                             the loops' num_stages 40 (sweeps --stages-only, into profile.txt),
#                             compile 40 + 30 + 100 (train: fp32 teacher forcing and gumbel_hard, notes' size;
#                             one such compile took 9-18 s on this project's CPU),
#                             and the kernel tests the rest less 35 s (their pass's 30 s kill grace and the
#                             summary) (GPU_BUDGET_T_* override each, e.g. GPU_BUDGET_T_TRAIN)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/fused_s2s_out}
SITE=${GPU_SITE:-/tmp/site}
mkdir -p "$OUT"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

say() { echo "[gpu_session] $*"; }
have_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

# ------------------------------------------------------------------------------------------ setup
installed_here() {  # fused_s2s (and its kernels) import from this checkout
    "$PY" - "$REPO" >/dev/null 2>&1 <<'EOF'
import os, sys
import fused_s2s, fused_s2s.kernels
repo = os.path.realpath(sys.argv[1])
assert os.path.realpath(fused_s2s.__file__).startswith(os.path.join(repo, "fused_s2s"))
assert os.path.realpath(fused_s2s.kernels.__file__).startswith(os.path.join(repo, "kernels"))
EOF
}

path_fallback() {  # no pip -e (read-only env, no setuptools): a sitecustomize that maps the package
    mkdir -p "$SITE"
    cat > "$SITE/sitecustomize.py" <<EOF
# written by benchmarks/gpu_session.sh: import fused_s2s from $REPO without installing it
import importlib.util, sys
sys.path.insert(0, "$REPO")
class _KernelsFinder:
    def find_spec(self, name, path=None, target=None):
        if name == "fused_s2s.kernels":
            return importlib.util.spec_from_file_location(
                name, "$REPO/kernels/__init__.py", submodule_search_locations=["$REPO/kernels"])
        return None
sys.meta_path.insert(0, _KernelsFinder())
EOF
}

setup() {
    local log="$OUT/setup.log"
    if [ "${GPU_SKIP_INSTALL:-0}" = 1 ]; then
        say "setup: install skipped (GPU_SKIP_INSTALL=1)"
    elif installed_here; then
        say "setup: fused_s2s already imports from $REPO"
    else
        say "setup: pip install -e . (log: $log)"
        if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$log" 2>&1 || ! installed_here; then
            say "setup: pip install -e . failed (tail of $log below); using a sitecustomize path mapping"
            tail -n 5 "$log"
            path_fallback
            installed_here || say "setup: WARNING: fused_s2s still does not import from $REPO"
        fi
    fi
    if ! have_module babel; then
        if ls .whl/*.whl >/dev/null 2>&1; then
            say "setup: babel missing: installing .whl/*.whl into $SITE"
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" .whl/*.whl >>"$log" 2>&1 || { say "setup: wheel install failed:"; tail -n 5 "$log"; }
        else
            say "setup: WARNING: no babel and no .whl/ (make gpu-wheels; carry .whl): dates tests will fail"
        fi
    fi
    "$PY" - <<'EOF'
import sys
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "none"
try:
    import babel
    bv = babel.__version__
except ImportError:
    bv = "MISSING"
cuda = torch.cuda.is_available()
print(f"[gpu_session] python {sys.version.split()[0]} | torch {torch.__version__} (cuda {torch.version.cuda}) | "
      f"triton {tv} | babel {bv} | device {torch.cuda.get_device_name() if cuda else 'cpu (no CUDA)'}")
EOF
    if command -v nvidia-smi >/dev/null 2>&1; then
        say "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 2 | tr '\n' ' ')"
    fi
}

# ------------------------------------------------------------------------------------------- test
test_summary() {  # counts and failing ids from the junit XML files (or the logs when pytest was killed)
    "$PY" - "$OUT" "$@" <<'EOF'
import os, re, sys
import xml.etree.ElementTree as ET

out, passes = sys.argv[1], [p.split("=") for p in sys.argv[2:]]  # name=pytest exit status
total = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
lines, bad, incomplete = [], [], False
for name, rc in passes:
    xml, log = os.path.join(out, f"pytest_{name}.xml"), os.path.join(out, f"pytest_{name}.log")
    c = dict.fromkeys(total, 0)
    if os.path.exists(xml) and os.path.getsize(xml) > 0:
        for tc in ET.parse(xml).getroot().iter("testcase"):
            f = tc.get("file") or tc.get("classname", "").replace(".", "/") + ".py"
            tid = f"{f}::{tc.get('name')}"
            kids = {k.tag: k for k in tc}
            for tag, key in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
                if tag in kids:
                    c[key] += 1
                    if tag != "skipped":
                        msg = (kids[tag].get("message") or "").strip().splitlines()
                        bad.append(f"{key.upper():6} {tid}  {(msg[0] if msg else '')[:160]}")
                    break
            else:
                c["passed"] += 1
        src = "xml"
    else:  # killed before the XML was written: what the log says
        text = open(log, errors="replace").read() if os.path.exists(log) else ""
        for m in re.finditer(r"(\d+) (passed|failed|errors?|skipped)", text.splitlines()[-1] if text else ""):
            c["error" if m.group(2).startswith("error") else m.group(2)] += int(m.group(1))
        bad += [ln.strip()[:200] for ln in text.splitlines() if re.match(r"(FAILED|ERROR) ", ln)]
        src = "log (no XML: killed?)"
    for k in total:
        total[k] += c[k]
    cut = " INCOMPLETE: hit its time limit" if rc in ("124", "137") else ""
    crash = f" pytest exit {rc}" if rc not in ("0", "1", "5", "124", "137") else ""
    lines.append(f"[test] {name:<5} {c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
                 f"{c['skipped']} skipped (from {src}){cut}{crash}")
    incomplete = incomplete or bool(cut or crash)
for b in bad[:40]:
    print("[test]   " + b)
if len(bad) > 40:
    print(f"[test]   ... {len(bad) - 40} more (see {out}/pytest_*.log)")
print("\n".join(lines))
print(f"[test] TOTAL {total['passed']} passed, {total['failed']} failed, {total['error']} errors, "
      f"{total['skipped']} skipped" + (" (INCOMPLETE)" if incomplete else ""))
sys.exit(1 if total["failed"] or total["error"] or incomplete or not total["passed"] else 0)
EOF
}

run_pytest() {  # name wall_limit args...: one pytest pass, output to $OUT/pytest_<name>.log
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    rm -f "$OUT/pytest_$name.xml"
    timeout -s INT -k 30 "$limit" "$PY" -m pytest "$@" -o junit_family=xunit1 \
        --junitxml="$OUT/pytest_$name.xml" >"$OUT/pytest_$name.log" 2>&1
    rc=$?
    PASS_STATUS+=("$name=$rc")
    case $rc in
        124|137) say "test: $name pass hit its ${limit}s limit (rc $rc): tail of $OUT/pytest_$name.log"
                 tail -n 5 "$OUT/pytest_$name.log" ;;
        *) say "test: $name pass rc $rc in $((SECONDS - t0)) s: $(tail -n 1 "$OUT/pytest_$name.log" | cut -c1-150)" ;;
    esac
}

pytest_opts() {  # per_test_default dist_default: sets sel, common, xdist (the caller declares them local)
    sel=() common=(-q -rfEs -p no:cacheprovider --durations=15) xdist=()
    read -r -a sel <<<"${GPU_PYTEST_ARGS:-}"
    if have_module pytest_timeout; then common+=(--timeout="${GPU_PYTEST_PER_TEST:-$1}"); fi
    if [ "${GPU_XDIST:-8}" != 0 ] && have_module xdist; then xdist=(-n "${GPU_XDIST:-8}" --dist "${GPU_XDIST_DIST:-$2}"); fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # 8 workers on 16 cores: no thread oversubscription
}

test_phase() {
    local t0=$SECONDS total=${GPU_TEST_TIMEOUT:-520} gpu_limit=${GPU_TEST_GPU_TIMEOUT:-150}
    local -a sel common xdist
    pytest_opts 300 loadfile
    [ "$gpu_limit" -gt "$total" ] && gpu_limit=$total
    say "test: -m gpu first (limit ${gpu_limit}s), then -m 'not gpu' ${xdist[*]} (whole phase ${total}s)"
    PASS_STATUS=()
    run_pytest gpu "$gpu_limit" "${sel[@]}" -m gpu "${common[@]}"
    local left=$((total - (SECONDS - t0)))
    if [ "$left" -ge 20 ]; then
        run_pytest rest "$left" "${sel[@]}" -m "not gpu" "${common[@]}" "${xdist[@]}"
    else
        say "test: no time left for the -m 'not gpu' pass"
        PASS_STATUS+=("rest=124")
    fi
    test_summary "${PASS_STATUS[@]}"
}

# ------------------------------------------------------------------------------------------ bench
csv_rows() { [ -f "$1" ] && echo $(($(wc -l <"$1") - 1)) || echo 0; }

bench_pass() {  # name impls budget args...: one benchmark script, restricted to impls, under a limit
    local name=$1 impls=$2 budget=$3 csv="$OUT/results.csv" before t0=$SECONDS rc
    shift 3
    before=$(csv_rows "$csv")
    echo "===== bench_$name.py $* | impls $impls | budget ${budget}s | $(date -u +%H:%M:%S)" >>"$OUT/bench.log"
    FUSED_S2S_BENCH_IMPLS=$impls timeout -s INT -k 15 "$budget" \
        "$PY" "benchmarks/bench_$name.py" "$@" >>"$OUT/bench.log" 2>&1
    rc=$?
    local note="rc $rc"
    case $rc in 124|137) note="hit its ${budget}s budget (rows so far kept)" ;; esac
    say "bench: $name [$impls] $(($(csv_rows "$csv") - before)) rows in $((SECONDS - t0)) s, $note"
}

bench_phase() {
    export FUSED_S2S_RESULTS_CSV="$OUT/results.csv"
    local only=",${GPU_BENCH_ONLY:-attention,gumbel,train}," b
    local -a quick=() extra=()
    [ "${GPU_BENCH_QUICK:-0}" = 1 ] && quick=(--quick)
    read -r -a extra <<<"${GPU_BENCH_ARGS:-}"
    say "bench: rows -> $FUSED_S2S_RESULTS_CSV, log $OUT/bench.log"
    # fused + eager first (a timeout still leaves those rows), torch.compile afterwards
    for b in attention gumbel train; do
        [[ $only == *",$b,"* ]] || continue
        local var="GPU_BENCH_T_${b^^}" impls="fused,eager" args=("${quick[@]}" "${extra[@]}")
        [ "$b" = attention ] && impls="fused,fused_rows,eager"  # fused_rows: per-row kernels at T > 1
        [ "$b" = train ] && { impls="fused,reference"; args=("${quick[@]}"); }  # bench_train: --quick only
        local def; case $b in attention) def=100 ;; gumbel) def=70 ;; train) def=100 ;; esac
        bench_pass "$b" "$impls" "${!var:-$def}" "${args[@]}"
    done
    if [[ $only == *",train,"* ]]; then  # CUDA-graph capture in a process of its own (see budget_phase)
        bench_pass train fused_graphed "${GPU_BENCH_T_TRAIN_GRAPHED:-40}" "${quick[@]}"
    fi
    if [ "${GPU_BENCH_NO_COMPILE:-0}" != 1 ]; then
        for b in attention gumbel train; do
            [[ $only == *",$b,"* ]] || continue
            local var="GPU_BENCH_T_${b^^}_COMPILE" args=("${quick[@]}" "${extra[@]}")
            [ "$b" = train ] && args=("${quick[@]}")
            local def; case $b in attention) def=80 ;; gumbel) def=60 ;; train) def=80 ;; esac
            bench_pass "$b" compile "${!var:-$def}" "${args[@]}"
        done
    fi
    "$PY" benchmarks/summarize.py "$OUT/results.csv"  # rc 1 when no row was measured
}

# ---------------------------------------------------------------------------------------- profile
profile_pass() {  # limit: benchmarks/profile_step.py (kernels per step, GPU busy vs wall) -> $OUT/profile.txt
    local limit=$1 t0=$SECONDS rc
    timeout -s INT -k 10 "$limit" "$PY" benchmarks/profile_step.py ${GPU_PROFILE_ARGS:-} >"$OUT/profile.txt" 2>&1
    rc=$?
    grep '^\[profile\]' "$OUT/profile.txt"
    say "profile: rc $rc in $((SECONDS - t0)) s (limit ${limit}s; $OUT/profile.txt)"
}

# ----------------------------------------------------------------------------------------- budget
budget_t() { local var="GPU_BUDGET_T_$1"; echo "${!var:-$2}"; }

host_pass() {  # host_pass FILE SECONDS: benchmarks/host_overhead.py --cuda, appended to FILE
    timeout -s INT -k 5 "$2" "$PY" benchmarks/host_overhead.py --cuda --n 200 >>"$1" 2>&1
    local rc=$?
    say "host overhead (--cuda): rc=$rc, $(grep -c ' us$' "$1") lines in $(basename "$1")"
}

stages_pass() {  # stages_pass FILE SECONDS: the sweeps' --stages-only rows (Gumbel first), appended to FILE
    local f=$1 half=$(( $2 / 2 ))
    timeout -s INT -k 5 "$half" "$PY" benchmarks/sweep_gumbel.py --stages-only --sizes large,mid \
        --seconds $(( half - 8 )) >>"$f" 2>&1
    timeout -s INT -k 5 "$half" "$PY" benchmarks/sweep_attention.py --stages-only --sizes large,long,tf \
        --seconds $(( half - 8 )) >>"$f" 2>&1
    say "stages: $(grep -c 'stages=' "$f") sweep lines in $(basename "$f")"
}

cli_graph_pass() {  # cli_graph_pass FILE SECONDS: fused-s2s train with and without --cuda-graph (tokens/s)
    local f=$1 each=$(( $2 / 2 )) mode rc
    for mode in eager graph; do
        local -a flag=()
        [ "$mode" = graph ] && flag=(--cuda-graph)
        rm -rf "/tmp/fused_s2s_cli_$mode"
        timeout -s INT -k 5 "$each" "$PY" -m fused_s2s train --task dates --steps 200 --sampling gumbel_hard \
            --tf-schedule linear --tf-c 0.0025 --tau-every 20 --eval-every 0 --log-every 50 --valid-size 100 \
            --no-progress --out "/tmp/fused_s2s_cli_$mode" "${flag[@]}" >>"$f" 2>&1
        rc=$?
        echo "[cli] train $mode rc=$rc tokens/s per 50 steps: $("$PY" -c "import json,os,sys; p=sys.argv[1]; print([round(json.loads(l)['tokens_per_s']) for l in open(p) if 'tokens_per_s' in l] if os.path.exists(p) else 'no metrics')" "/tmp/fused_s2s_cli_$mode/metrics.jsonl" 2>&1)" >>"$f"
    done
    say "cli --cuda-graph: $(grep '^\[cli\]' "$f" | tr '\n' ' ')"
}

budget_phase() {  # one command for a 15-minute device session (docs/gpu.md): what closes the issues first
    local total=${GPU_BUDGET:-570} rc_b=0  # against $SECONDS: the script's start, setup included
    local -a sel common xdist
    pytest_opts 120 load
    export FUSED_S2S_RESULTS_CSV="$OUT/results.csv"
    say "budget: ${total}s: -m gpu tests, benchmarks (few repetitions), torch.compile column, kernel tests"
    PASS_STATUS=()
    # 1. the tests that have never run (no host sync, CUDA-graph capture, tiled kernels at D 64/512),
    # a few files per process: a capture that fails and leaves the CUDA context unusable only takes
    # its own worker's files with it
    local -a gx=()
    [ ${#xdist[@]} -gt 0 ] && gx=(-n 4 --dist loadfile)
    run_pytest gpu "$(budget_t GPU_TESTS 90)" "${sel[@]}" -m gpu "${common[@]}" "${gx[@]}"
    # 2. fused + eager at every size (bench_attention / bench_gumbel check the fused result there too)
    bench_pass attention "fused,fused_rows,eager" "$(budget_t ATTENTION 55)" --quick
    bench_pass gumbel "fused,eager" "$(budget_t GUMBEL 40)" --quick
    bench_pass train "fused,reference" "$(budget_t TRAIN 70)" --quick --sizes notes,large
    # CUDA-graph capture in a process of its own: a failed capture cannot take the rows above with it
    bench_pass train fused_graphed "$(budget_t TRAIN_GRAPHED 35)" --quick --sizes notes,large
    # where the training step's time goes: host-bound or kernel-bound, per impl and mode
    profile_pass "$(budget_t PROFILE 40)"
    # host time per call with the real kernels, and its parts (Triton's launch, our launchers)
    host_pass "$OUT/profile.txt" "$(budget_t HOST 30)"
    # the loops' software pipelining, side by side (session 10): Gumbel's default 2 stages against 1
    # (the kernels before) and 3-4, attention's default 1 against 2-3; kernel time only (the budget's
    # 8 files are taken: into profile.txt, after the host lines)
    stages_pass "$OUT/profile.txt" "$(budget_t STAGES 40)"
    # 3. torch.compile, largest sizes first (each case compiles afresh: tens of seconds each)
    if [ "${GPU_BENCH_NO_COMPILE:-0}" != 1 ]; then
        bench_pass attention compile "$(budget_t ATTENTION_COMPILE 40)" --quick --sizes large,long,tf,notes
        bench_pass gumbel compile "$(budget_t GUMBEL_COMPILE 30)" --quick --sizes large,mid,notes
        # each case compiles the whole model afresh: the two whose ratio closes issue 6 first
        bench_pass train compile "$(budget_t TRAIN_COMPILE 100)" --quick --sizes notes \
            --modes teacher_forcing,ss_gumbel_hard --dtypes float32
    fi
    "$PY" benchmarks/summarize.py "$OUT/results.csv" || rc_b=1
    # 4. the kernel tests on CUDA with the time left (the AOT test is CPU work: CI runs it)
    local left=$((total - SECONDS - 35))  # the pass's 30 s kill grace and the summary after it
    if [ "$left" -ge 30 ]; then
        run_pytest rest "$left" "${sel[@]}" -m "kernels and not gpu" --ignore=tests/test_aot.py \
            "${common[@]}" "${xdist[@]}"
    else
        say "budget: no time left for the kernel tests"
        PASS_STATUS+=("rest=124")
    fi
    say "budget: done at $SECONDS s since the script's start"
    test_summary "${PASS_STATUS[@]}" || return 1
    return $rc_b
}

# ---------------------------------------------------------------------------------------- recheck
recheck_phase() {  # a second, shorter call after fixes (about 500 s): tests, kernel sweeps, the changed rows
    local -a sel common xdist
    pytest_opts 120 load
    export FUSED_S2S_RESULTS_CSV="$OUT/results.csv"
    local -a gx=()
    [ ${#xdist[@]} -gt 0 ] && gx=(-n 4 --dist loadfile)
    PASS_STATUS=()
    run_pytest gpu "$(budget_t GPU_TESTS 45)" "${sel[@]}" -m gpu "${common[@]}" "${gx[@]}"
    run_pytest rest "$(budget_t REST 80)" "${sel[@]}" -m "kernels and not gpu" --ignore=tests/test_aot.py \
        "${common[@]}" "${xdist[@]}"
    timeout -s INT -k 10 "$(budget_t SWEEP 70)" "$PY" benchmarks/sweep_attention.py --seconds 55 \
        >"$OUT/sweep.txt" 2>&1
    timeout -s INT -k 10 "$(budget_t SWEEP_GUMBEL 55)" "$PY" benchmarks/sweep_gumbel.py --seconds 42 --sizes large \
        >>"$OUT/sweep.txt" 2>&1
    # random attention cases against the float64 oracle on the GPU's own exp / dot rounding
    timeout -s INT -k 5 "$(budget_t FUZZ 30)" "$PY" -m tests.fuzz_attention --seconds 22 --device cuda \
        >>"$OUT/sweep.txt" 2>&1
    # and Gumbel-softmax: shapes, blocks, tau (float / tensor), scales, noise source, on the GPU's own log
    timeout -s INT -k 5 "$(budget_t FUZZ_GUMBEL 20)" "$PY" -m tests.fuzz_gumbel --seconds 15 --device cuda \
        >>"$OUT/sweep.txt" 2>&1
    say "sweep + fuzz: $(grep -c '^\[sweep\]' "$OUT/sweep.txt") sweep lines; fuzz (attention, gumbel): $(grep -E 'cases, [0-9]+ failed' "$OUT/sweep.txt" | tr '\n' ' ')"
    host_pass "$OUT/sweep.txt" "$(budget_t HOST 30)"
    # the training command with the decoder pass replayed from graphs (scheduled ratio and tau)
    cli_graph_pass "$OUT/sweep.txt" "$(budget_t CLI_GRAPH 60)"
    bench_pass attention "fused,fused_rows,eager" "$(budget_t ATTENTION 45)" --quick --sizes long,tf,large
    bench_pass train fused "$(budget_t TRAIN 35)" --quick --sizes large --modes teacher_forcing
    bench_pass train fused_graphed "$(budget_t TRAIN_GRAPHED 35)" --quick --sizes notes \
        --modes teacher_forcing,ss_gumbel_hard --dtypes bfloat16
    "$PY" benchmarks/summarize.py "$OUT/results.csv"
    say "recheck: done at $SECONDS s since the script's start"
    test_summary "${PASS_STATUS[@]}"
}

# ------------------------------------------------------------------------------------------- main
phase=${1:-}
case $phase in  # exit status: 1 when a test failed (test), no row was measured (bench), either (all)
    setup) setup ;;
    test) setup; test_phase ;;
    bench) setup; bench_phase ;;
    all) setup; test_phase; t=$?; bench_phase; b=$?; exit $((t || b)) ;;
    budget) setup; budget_phase ;;
    recheck) setup; recheck_phase ;;
    profile) setup; profile_pass "${GPU_PROFILE_TIMEOUT:-300}" ;;
    cli) setup; cli_graph_pass "$OUT/cli.txt" "${GPU_CLI_TIMEOUT:-120}"; cat "$OUT/cli.txt" | tail -n 20 ;;
    compile) setup; export FUSED_S2S_RESULTS_CSV="$OUT/results.csv"
        bench_pass train "fused,fused_graphed,reference,compile,fused_compile" "${GPU_COMPILE_TIMEOUT:-300}" --quick --sizes notes \
            --modes teacher_forcing,ss_gumbel_hard --dtypes float32
        "$PY" benchmarks/summarize.py "$OUT/results.csv" ;;
    stages) setup; stages_pass "$OUT/stages.txt" "${GPU_STAGES_TIMEOUT:-120}"; grep '^\[sweep\]' "$OUT/stages.txt" | tail -n 60 ;;
    unaligned) setup; t=${GPU_UNALIGNED_TIMEOUT:-150}
        timeout -s INT -k 5 "$t" "$PY" benchmarks/sweep_attention.py --sizes large_odd,long_odd --seconds $(( t - 15 )) \
            >"$OUT/unaligned.txt" 2>&1
        grep '^\[sweep\]' "$OUT/unaligned.txt" | tail -n 60 ;;
    tiles) setup; t=${GPU_TILES_TIMEOUT:-150}
        timeout -s INT -k 5 "$t" "$PY" benchmarks/sweep_attention.py --sizes tf128,tf256 --dtypes bfloat16,float16 \
            --seconds $(( t - 15 )) >"$OUT/tiles.txt" 2>&1
        grep '^\[sweep\]' "$OUT/tiles.txt" | tail -n 60 ;;
    *) echo "usage: $0 setup|test|bench|all|budget|recheck|profile|cli|stages|unaligned|tiles|compile   (see the header of this file for the environment knobs)" >&2
       exit 2 ;;
esac
