"""The scripts in benchmarks/ on a machine without a GPU: ``--help``, a one-line refusal of the GPU modes, CPU modes.

The scripts run as a user runs them, with TRITON_INTERPRET removed from their environment (this test session
sets it): a CPU mode has to set it itself. The processes of a group run in parallel.
"""

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# scripts, not the CPU benchmark suite (test_bench_cpu.py and its conftest.py, run by their own command)
SCRIPTS = sorted(
    p.name for p in BENCH.glob("*.py") if not p.name.startswith("test_") and p.name != "conftest.py"
) + sorted(p.name for p in BENCH.glob("*.sh"))

# one GPU mode of each script: (arguments, what the refusal must also say). common.py has no GPU mode.
GPU_MODES = {
    "attention.py": (["--sections", "check"], "no mode of it runs on the CPU"),
    "eviction.py": (["train"], "'eviction.py resources' runs on the CPU"),
    "fa4_mask_check.py": ([], "no mode of it runs on the CPU"),
    "gdn.py": (["--bench"], "'gdn.py --smoke' runs on the CPU"),
    "check_backends.py": ([], "'check_backends.py --device cpu --small --backends sdpa' runs on the CPU"),
    "check_head_dims.py": ([], "'check_head_dims.py --device cpu' runs on the CPU"),
    "gdn_mixer_check.py": (["--device", "cuda"], "'gdn_mixer_check.py --device cpu' runs on the CPU"),
    "gdn_prep.py": ([], "no mode of it runs on the CPU"),
    "decode.py": ([], "no mode of it runs on the CPU"),
    "nsa.py": (["--check"], "no mode of it runs on the CPU"),
    "flash_attn_backend.py": ([], "no mode of it runs on the CPU"),
    "gpu_all.sh": (["backends"], "no part runs on the CPU"),
    "gpu_tests.sh": (["{tmp}", "kernels/"], "on the CPU run python -m pytest"),
    "train_e2e.py": ([], "'train_e2e.py --smoke' runs on the CPU"),
    "fsdp2.py": ([], "'fsdp2.py --smoke' runs on the CPU"),
    "paper_presets.py": ([], "'paper_presets.py --smoke' runs on the CPU"),
    "sweep.py": (["--points", "base"], "'sweep.py --smoke' runs on the CPU"),
    "swa_tune.py": ([], "'swa_tune.py --list or --smoke' runs on the CPU"),
    "swa_five_matmul.py": ([], "'swa_five_matmul.py --check' runs on the CPU"),
    "swa_warp_specialized.py": ([], "'swa_warp_specialized.py --check' runs on the CPU"),
    "swa_gluon.py": ([], "'swa_gluon.py --check' runs on the CPU"),
    "swa_stash.py": ([], "'swa_stash.py --check' runs on the CPU"),
    "swa_split_head.py": ([], "'swa_split_head.py --check' runs on the CPU"),
    "launch_overhead.py": ([], "no mode of it runs on the CPU"),
    "profile_kernels.py": ([], "'profile_kernels.py --summarize CSV' runs on the CPU"),
}
CPU_ONLY = {"common.py", "install_wheels.sh", "results_card.py", "sass_report.py"}

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _command(script: str, args: list[str]) -> list[str]:
    runner = ["bash"] if script.endswith(".sh") else [sys.executable]
    return [*runner, str(BENCH / script), *args]


def _run_all(commands: dict, env: dict, timeout: float = 300, parallel: bool = True) -> dict:
    """{key: command} -> {key: CompletedProcess}, all at once or (``parallel=False``) one after the other. A command
    that outlives ``timeout`` fails the test with what it had printed, so that a stall shows where it was."""

    def run(cmd):
        try:
            return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
            pytest.fail(f"{' '.join(cmd[1:])} ran past {timeout:.0f} s\n--- stdout:\n{out[-4000:]}\n--- stderr:\n"
                        f"{err[-4000:]}")  # fmt: skip

    if not parallel:
        return {key: run(cmd) for key, cmd in commands.items()}
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return dict(zip(commands, pool.map(run, commands.values()), strict=True))


# Runs Python scripts one after the other in one process, as `python SCRIPT ARGS...` would (run as __main__,
# sys.argv set), and prints a list of {returncode, stdout, stderr}, one per run, as JSON; an exception that escapes
# a script lands in its stderr as the interpreter would print it. One process imports torch once instead of once
# per script, which is most of the time a refusal takes.
_DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
results = []
for path, args in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [path, *args]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else (print(e.code, file=sys.stderr) or 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append(dict(returncode=code or 0, stdout=out.getvalue(), stderr=err.getvalue()))
print(json.dumps(results))
"""


def _run_scripts(runs: dict, env: dict) -> dict:
    """{key: (script, arguments)} -> {key: CompletedProcess}: the Python scripts one after the other in one process
    (_DRIVER), each shell script in a bash of its own, in parallel with it."""
    python = {key: (str(BENCH / s), args) for key, (s, args) in runs.items() if s.endswith(".py")}
    commands = {key: _command(s, args) for key, (s, args) in runs.items() if s.endswith(".sh")}
    commands["(driver)"] = [sys.executable, "-c", _DRIVER, json.dumps(list(python.values()))]
    done = _run_all(commands, env)
    driver = done.pop("(driver)")
    assert driver.returncode == 0, driver.stderr
    for (key, (path, _)), r in zip(python.items(), json.loads(driver.stdout), strict=True):
        done[key] = subprocess.CompletedProcess(path, r["returncode"], r["stdout"], r["stderr"])
    return done


@pytest.fixture(scope="module")
def help_runs():
    # one Python process for every script's --help: 0.2 s instead of 1.3 s for a process each on two cores
    return _run_scripts({s: (s, ["--help"]) for s in SCRIPTS}, _env())


@pytest.fixture(scope="module")
def gpu_mode_runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("gpu_modes"))
    runs = {s: (s, [a.format(tmp=tmp) for a in args]) for s, (args, _) in GPU_MODES.items()}
    return _run_scripts(runs, _env(OUT=tmp))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(help_runs, script):
    p = help_runs[script]
    assert p.returncode == 0, p.stderr
    assert re.search(r"^usage", p.stdout, re.IGNORECASE | re.MULTILINE), p.stdout
    assert p.stderr == ""


def test_scripts_import_no_torch_triton_or_mixerzoo():
    """What keeps --help and a refusal fast, and lets a CPU mode set TRITON_INTERPRET before Triton loads."""
    modules = [Path(s).stem for s in SCRIPTS if s.endswith(".py")]
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r})\n"
        f"for m in {modules!r}: __import__(m)\n"
        "print(sorted(m for m in ('torch', 'triton', 'mixerzoo') if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_every_script_has_a_gpu_mode_case():
    assert set(GPU_MODES) | CPU_ONLY == set(SCRIPTS)


@no_gpu
@pytest.mark.slow  # the full run only (a subprocess per GPU mode); the fast run keeps every script's --help
@pytest.mark.parametrize("script", sorted(GPU_MODES))
def test_gpu_mode_refused_in_one_line(gpu_mode_runs, script):
    p = gpu_mode_runs[script]
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "needs a CUDA GPU (torch.cuda.is_available() is False" in lines[0]
    assert GPU_MODES[script][1] in lines[0]
    assert p.stdout == ""


@no_gpu
@pytest.mark.slow  # shares the GPU-mode subprocess runs above
@pytest.mark.skipif(importlib.util.find_spec("fla") is not None, reason="flash-linear-attention is installed")
def test_missing_package_named_with_install_hint(gpu_mode_runs):
    hint = "flash-linear-attention (not installed: pip install flash-linear-attention)"
    assert hint in gpu_mode_runs["gdn.py"].stderr


def test_usage_errors_name_the_value():
    cases = {
        "eviction.py": (["trian"], "unknown part(s) trian; the parts are check, train"),
        "attention.py": (["--sections", "swa,ful"], "unknown section(s) ful; the sections are check"),
        "gdn.py": (["--smoke", "--sweep"], "--smoke runs the tiny checks alone, got also --sweep"),
        "train_e2e.py": (["--retained", "band,2"], "--retained takes init, band or a fraction in (0, 1], got '2'"),
        "gdn.py --hkv": (
            ["--hkv", "32x64x64"],
            "--hkv chooses the head shapes of --shapes or --sweep; pass one of them too",
        ),
        "gpu_all.sh": (
            ["gdm"],
            "unknown part 'gdm'; the parts are tests backends attention gdn eviction nsa sweep tune profile split",
        ),
        "sweep.py": (["--points", "base,D64-X2"], "--points: unknown point 'D64-X2'; a point is 'base' or axis"),
        "sweep.py --ops": (["--ops", "swa,eviction"], "--ops: unknown op(s) eviction; the ops are swa, swa_sink"),
    }
    runs = _run_scripts({s: (s.split()[0], args) for s, (args, _) in cases.items()}, _env())
    for script, (_, message) in cases.items():
        p = runs[script]
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, (script, p.stderr)


def test_resources_refuses_the_interpreter():
    p = subprocess.run(
        _command("eviction.py", ["resources"]),
        cwd=ROOT,
        env=_env(TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (
        "eviction.py resources: compiles the kernels for sm_90, which Triton's interpreter cannot; "
        "unset TRITON_INTERPRET"
    )


@no_gpu
@pytest.mark.slow
def test_cpu_modes(tmp_path):
    """check_backends' CPU dry run to the end, and gdn.py --smoke until its first Triton kernel has run in the
    interpreter and matched the reference (the whole smoke run takes about 35 s of CPU time)."""
    env = _env(OUT=str(tmp_path))
    smoke = subprocess.Popen(
        _command("gdn.py", ["--smoke"]), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        backends = subprocess.run(
            _command("check_backends.py", ["--device", "cpu", "--small", "--backends", "sdpa"]),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = []
        for line in smoke.stdout:  # up to the first comparison with the reference (or the end of a crash)
            lines.append(line.rstrip("\n"))
            if re.match(r"\s+(ok|FAIL)\s", line):
                break
    finally:
        smoke.kill()
        smoke.wait()
    assert backends.returncode == 0, backends.stdout + backends.stderr
    assert backends.stdout.startswith("check_backends.py: no CUDA device; Triton kernels run in Triton's interpreter")
    rows = json.loads((tmp_path / "backends.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["ok"] and r["backend"] == "sdpa" for r in rows)

    assert lines[0] == "gdn.py: no CUDA device; Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1)"
    assert re.match(r"\s+ok\s+o\s+rel_rmse=", lines[-1]), "\n".join(lines)


def test_pytest_collects_nothing_from_benchmarks(pytestconfig):
    """The default run collects tests/ only; the one test file in benchmarks/ is the CPU benchmark suite, which
    the README names and CI runs as a command of its own."""
    assert pytestconfig.getini("testpaths") == ["tests"]
    found = [p.name for p in BENCH.rglob("*.py") if p.name.startswith("test_") or p.name.endswith("_test.py")]
    assert found == ["test_bench_cpu.py"]


@no_gpu
@pytest.mark.slow
def test_training_scripts_smoke():
    """The CPU modes of the training benchmarks: train_e2e.py trains both models a few steps through the Trainer;
    fsdp2.py runs the train command in one process and as two gloo ranks, whose losses agree; paper_presets.py
    runs generate() and the evaluations on each of the paper's default presets, at hidden 64."""
    scripts = ("train_e2e.py", "fsdp2.py", "paper_presets.py")
    args = {"train_e2e.py": ["--smoke", "--profile-sites", "8"]}  # the profile by call site too
    # one after the other: each trains with the machine's every core (in CI two, where three training processes at
    # once, one of them two gloo ranks, once left train_e2e.py without a line of output after 300 s; alone it takes
    # about 30 s), and the time-out only guards against a hang
    runs = _run_all({s: _command(s, args.get(s, ["--smoke"])) for s in scripts}, _env(), timeout=900, parallel=False)
    e2e, fsdp, paper = (runs[s] for s in scripts)
    assert paper.returncode == 0, paper.stderr
    for spec in ("lte-0.4b", "lte-0.4b:final_buffer", "lansa-0.4b", "swa-0.4b"):
        assert f"'impl': '{spec}'" in paper.stdout, paper.stdout
    assert e2e.returncode == 0, e2e.stderr
    for state in ("init", "band"):  # the eviction stack as built, and with its routers at their band
        assert re.search(
            rf"\(gdn eviction_swa\)\*6 \(routers {state}, [\d.]+% retained\): [\d.]+x the tokens/s of \(gdn swa\)\*6",
            e2e.stdout,
        ), e2e.stdout
    # every model timed in each of the smoke run's two rounds, the weights held, the band's fraction as set
    rows = [ast.literal_eval(line) for line in e2e.stdout.splitlines() if line.startswith("{'op': 'train_e2e'")]
    assert [r.get("routers") for r in rows] == ["init", "band", None], e2e.stdout
    assert all(len(r["rounds_ms"]) == 2 and "learning rate 1e-12" in r["note"] for r in rows), rows
    assert 0.0 < rows[1]["retained_start"] <= 1.0 and "retained_start" not in rows[0], rows
    # the call-site profile: each eviction model's time against (gdn swa)*6's, by operator @ mixerzoo line or
    # autograd node
    head = r"--- \(gdn eviction_swa\)\*6 \(routers: (init|band)\) against \(gdn swa\)\*6: .* by operator @ call site"
    assert re.findall(head, e2e.stdout) == ["init", "band"], e2e.stdout
    assert re.search(r"^ +[+-][\d.]+ +[\d.]+ +\d+ +[\d.]+ +\d+  aten::\S+ @ ", e2e.stdout, re.M), e2e.stdout
    assert fsdp.returncode == 0, fsdp.stderr
    diff = re.search(r"loss: largest relative difference (\S+) at step", fsdp.stdout)
    assert diff and float(diff.group(1)) < 1e-4, fsdp.stdout


def _bench_module(script: str, monkeypatch=None):
    """benchmarks/<script> imported as a module (the folder is not a package); with ``monkeypatch`` also put in
    sys.modules for the test, where a dataclass of the script looks its module up."""
    spec = importlib.util.spec_from_file_location(f"bench_{script.removesuffix('.py')}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_cpu_call_sites_match_the_profilers_event_tree():
    """train_e2e.py's one-pass nesting of the profiler's raw CPU events gives the operators, call sites and self
    times of the profiler's own event tree (prof.events(), ~10x slower); only the call counts may differ, where an
    operator nested in one of its own name counts once in ours."""
    e2e = _bench_module("train_e2e.py")
    from torch.profiler import ProfilerActivity, profile

    from mixerzoo import registry

    mixer = registry.build("eviction_swa", hidden_size=32, num_heads=2, window_size=8)
    x = torch.randn(1, 20, 32, requires_grad=True)
    # one step before the profiled one: a module imported lazily inside a profiled region can leave an event whose name
    # is not UTF-8 (torch 2.13's profiler; its own prof.events() then fails on it too), as the first step here did at
    # times (3 runs in 8 on this 2-core CPU)
    mixer(x)[0].sum().backward()
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        mixer(x)[0].sum().backward()
    ours = e2e._cpu_sites(torch, prof)
    tree: dict[str, float] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU or "::" not in e.name or e.self_cpu_time_total <= 0:
            continue
        site, p = "(no mixerzoo frame)", e.cpu_parent
        while p is not None and not e2e._is_site(p.name):
            p = p.cpu_parent
        key = f"{e.name} @ {e2e._site_name(p.name) if p is not None else site}"
        tree[key] = tree.get(key, 0.0) + e.self_cpu_time_total / 1e3
    assert set(ours) == set(tree)
    assert any("mixers/eviction_swa.py" in k for k in ours) and any("Backward" in k for k in ours), sorted(ours)
    for key, ms in tree.items():
        assert ours[key][0] == pytest.approx(ms, rel=1e-6, abs=1e-6), key


def test_merge_replaces_only_the_rows_a_partial_run_names(tmp_path, monkeypatch):
    """A results file that names ``replace_by`` keys (a run of part of a sweep) replaces only the earlier rows of
    its op that agree with one of its rows on them; without them every row of its ops is replaced."""
    common = _bench_module("common.py")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    row = lambda op, H, ms: {"op": op, "impl": "mixerzoo", "H": H, "fwd_ms": ms}  # noqa: E731
    old = {"gpu": "Test GPU", "rows": [row("sweep", 16, 1.0), row("sweep", 32, 2.0), row("other", 16, 3.0)]}
    (tmp_path / "test-gpu.json").write_text(json.dumps(old))
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"gpu": "Test GPU", "replace_by": ["impl", "H"], "rows": [row("sweep", 32, 0.5)]}))
    common.merge_file(str(part))
    doc = json.loads((tmp_path / "test-gpu.json").read_text())
    assert "replace_by" not in doc
    assert sorted((r["op"], r["H"], r["fwd_ms"]) for r in doc["rows"]) == [
        ("other", 16, 3.0), ("sweep", 16, 1.0), ("sweep", 32, 0.5)
    ]  # fmt: skip
    part.write_text(json.dumps({"gpu": "Test GPU", "rows": [row("sweep", 8, 0.1)]}))
    common.merge_file(str(part))
    doc = json.loads((tmp_path / "test-gpu.json").read_text())
    assert sorted((r["op"], r["H"]) for r in doc["rows"]) == [("other", 16), ("sweep", 8)]


def test_partial_runs_add_up_in_out(tmp_path, monkeypatch):
    """Runs of part of a sweep in one command (swa_tune.py once per cell) leave all their rows in $OUT's part
    file, a cell measured again replacing its rows; a whole run of the ops leaves its own rows alone."""
    common = _bench_module("common.py")
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "gpu_slug", lambda: "test-gpu")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    row = lambda W, ms: {"op": "tune", "impl": "default", "W": W, "fwd_ms": ms}  # noqa: E731
    part = tmp_path / "out" / "results-tune.json"
    common.write_results({"tune"}, [row(512, 1.0)], replace_by=["W"])
    common.write_results({"tune"}, [row(4096, 2.0)], replace_by=["W"])
    assert [(r["W"], r["fwd_ms"]) for r in json.loads(part.read_text())["rows"]] == [(512, 1.0), (4096, 2.0)]
    common.write_results({"tune"}, [row(512, 0.5)], replace_by=["W"])
    doc = json.loads(part.read_text())
    assert doc["replace_by"] == ["W"] and [(r["W"], r["fwd_ms"]) for r in doc["rows"]] == [(4096, 2.0), (512, 0.5)]
    common.write_results({"tune"}, [row(256, 3.0)])  # a whole run: its rows only, as in results/<gpu>.json
    assert [r["W"] for r in json.loads(part.read_text())["rows"]] == [256]
    assert [r["W"] for r in json.loads((tmp_path / "results" / "test-gpu.json").read_text())["rows"]] == [256]


def test_sweep_list(monkeypatch):
    """sweep.py --list prints the grid and every named point, without a GPU (nor torch)."""
    sweep = _bench_module("sweep.py", monkeypatch)
    p = _run_scripts({"list": ("sweep.py", ["--list"])}, _env())["list"]
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout.startswith("grid: D in {64, 128, 256}; G in {1, 2, 8}; W in {256, 512, 4096}; T in {2048,")
    listed = [line.split()[0] for line in p.stdout.splitlines()[4:]]
    names = [pt.name for pt in sweep.named_points()]
    assert listed == names and len(names) == len(set(names))
    assert {"base", "D64", "D256", "G8", "W4096", "T65536", "frac0.02", "D64-G8-W4096-T65536"} <= set(names)
    base = next(line for line in p.stdout.splitlines() if line.startswith("base "))
    assert base.split()[1:] == ["128", "1", "16", "512", "8192", "8", "0.10", "all"]  # D G HKV W T B frac ops


@no_gpu
@pytest.mark.slow  # about 17 s: the kernels in Triton's interpreter
def test_sweep_smoke(tmp_path):
    """sweep.py --smoke on the CPU: every (point, op) guarded and timed, rows with the shape keys for each impl,
    the worst-ratio table; rows of a point measured again are replaced, others kept. With --max-seconds it stops
    after the first point and says how to resume."""
    out = tmp_path / "sweep.json"
    keys = ("op", "impl", "point", "B", "T", "HQ", "HKV", "D", "W", "S", "fwd_ms", "note")
    shape = dict(B=2, T=64, HQ=2, HKV=2, D=32, W=16, S=0)  # smoke-a of swa: replaced by the run
    old = [dict(op="swa_sweep", impl="old", point="smoke-a", **shape, fwd_ms=9.0), dict(op="swa_sweep", impl="old",
           point="elsewhere", **{**shape, "T": 32}, fwd_ms=9.0)]  # fmt: skip
    out.write_text(json.dumps({"rows": old}))
    budget = tmp_path / "budget.json"
    runs = _run_all(
        {
            "smoke": _command("sweep.py", ["--smoke", "--json", str(out)]),
            "budget": _command("sweep.py", ["--smoke", "--ops", "swa", "--max-seconds", "0.01", "--json", str(budget)]),
        },
        _env(),
    )
    p = runs["smoke"]
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("sweep.py: no CUDA device; Triton kernels run in Triton's interpreter")
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [r["point"] for r in rows if r["impl"] == "old"] == ["elsewhere"]
    rows = [r for r in rows if r["impl"] != "old"]
    ops = ("swa_sweep", "swa_sink_sweep", "eviction_train_sweep")
    assert sorted((r["op"], r["point"], r["impl"]) for r in rows) == sorted(
        (op, pt, impl) for op in ops for pt in ("smoke-a", "smoke-b") for impl in ("mixerzoo", "flex")
    )
    for r in rows:
        assert all(k in r for k in keys), r
        assert ("frac" in r) == (r["op"] == "eviction_train_sweep"), r
        assert r["S"] == (0 if r["op"] == "swa_sweep" else 4) and r["HQ"] % r["HKV"] == 0
        if r["impl"] == "mixerzoo":  # the guard's error is in the note; the launchers ran fwd and fwd+bwd
            err = float(re.search(r"guard: rel RMSE vs flex ([\d.e+-]+)", r["note"]).group(1))
            assert err <= 1e-2 and r["fwdbwd_ms"] > 0
        else:
            assert "fwdbwd_ms" not in r and "eager, forward only" in r["note"]  # no flex backward on the CPU
    assert any("no flash_attn rows: flash-attn 4 needs a CUDA GPU" in n for n in doc["sweep_notes"])
    table = p.stdout[p.stdout.index("anchor time / mixerzoo's") :].splitlines()
    assert table[1].split() == ["op", "anchor", "points", "worst", "fwd+bwd", "best", "fwd+bwd", "worst", "fwd", "best",
                                "fwd"]  # fmt: skip
    for line, op in zip(table[2:5], ("swa", "swa_sink", "eviction_train"), strict=True):
        assert re.match(rf"{op}\s+flex\s+2\s+-\s+-\s+[\d.]+x \(smoke-[ab]\)\s+[\d.]+x \(smoke-[ab]\)$", line), line

    p = runs["budget"]
    assert p.returncode == 0, p.stdout + p.stderr
    assert "budget: stopped after" in p.stdout and "resume with: --points smoke-b --ops swa" in p.stdout
    assert {r["point"] for r in json.loads(budget.read_text())["rows"]} == {"smoke-a"}


def test_results_card_sums_up_sweep_rows():
    """The README's card gives sweep.py's rows as the worst and best anchor / mixerzoo fwd+bwd ratio per (op,
    anchor) with the point, not a line per row, and nothing at all where there are no sweep rows."""
    card = _bench_module("results_card.py")
    base = dict(B=8, T=8192, HQ=16, HKV=16, D=128, W=512, S=4, frac=0.1)

    def row(impl, point, ms, **shape):
        return dict(op="eviction_train_sweep", impl=impl, point=point, **{**base, **shape}, fwd_ms=ms, fwdbwd_ms=ms)

    rows = [row("mixerzoo", "base", 2.0), row("flex", "base", 3.0), row("mixerzoo", "frac0.30", 4.0, frac=0.3)]
    rows += [row("flex", "frac0.30", 3.0, frac=0.3), row("mixerzoo", "D64", 1.0, D=64)]  # D64: no anchor
    other = [
        dict(op="swa", impl="mixerzoo", B=1, T=2, fwdbwd_ms=1.0),
        dict(op="swa", impl="flex", B=1, T=2, fwdbwd_ms=2.0),
    ]
    assert card.sweep_lines(other) == []
    plain, summed = (card.op_level_card({"rows": rs}, "x.json") for rs in (other, other + rows))
    assert summed == plain[:-1] + "\n" + "\n".join(card.sweep_lines(rows)) + "\n"  # only the summary is added
    assert card.sweep_lines(rows)[-1] == "| `eviction_train_sweep` | flex | 2 | 0.75x (`frac0.30`) | 1.50x (`base`) |"


def test_profile_kernels_summarize(tmp_path):
    """profile_kernels.py --summarize reads an ncu raw CSV export (header row, units row, a row per launch): times
    and bytes in the units the export names, a metric it lacks as "-", the largest stall reasons first."""
    stalled = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    tensor = "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"  # another name: still found
    head = ["ID", "Kernel Name", "gpu__time_duration.sum", "lts__t_bytes.sum", stalled.format("long_scoreboard"),
            stalled.format("math_pipe_throttle"), stalled.format("barrier"), tensor,
            "sm__ops_path_tensor_src_bf16_dst_fp32.sum"]  # fmt: skip
    rows = [head, ["", "", "msecond", "Gbyte", "", "", "", "%", ""],
            ["0", "_swa_bwd_dkdv_kernel", "6.5", "25.8", "0.50", "2.25", "0.75", "61.5", "2,600,000,000,000"],
            ["1", "triton_tem_fused_0", "1,234.5", "", "0", "0", "0", "", ""]]  # fmt: skip
    export = tmp_path / "raw.csv"
    export.write_text("\n".join(",".join(f'"{x}"' for x in r) for r in rows) + "\n")
    p = _run_scripts({"sum": ("profile_kernels.py", ["--summarize", str(export)])}, _env())["sum"]
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("kernel | ms | L2 GB | L2 % |") and lines[0].endswith("| bf16 Tops/s | top stalls")
    dkdv = lines[1].split(" | ")
    assert dkdv[:4] == ["_swa_bwd_dkdv_kernel", "6.5", "25.8", "-"] and dkdv[6] == "61.5"
    assert dkdv[-2:] == ["400", "math_pipe_throttle 2.25, barrier 0.75, long_scoreboard 0.50"]
    flex = lines[2].split(" | ")
    assert flex[:3] == ["triton_tem_fused_0", "1.23e+03", "-"] and flex[-1] == "-"
    export.write_text("not,an,export\n")
    p = _run_scripts({"bad": ("profile_kernels.py", ["--summarize", str(export)])}, _env())["bad"]
    assert p.returncode == 1 and "holds no kernel rows of an ncu raw CSV export" in p.stderr


def test_swa_tune_list():
    """swa_tune.py --list: the cells (worst cases first) and the candidates, without a GPU."""
    p = _run_scripts({"list": ("swa_tune.py", ["--list", "--D", "256"])}, _env())["list"]
    assert p.returncode == 0, p.stderr
    cells = [line for line in p.stdout.splitlines() if line.startswith("cell ")]
    assert cells[0] == "cell D=256 G=1 W=4096: stands for G in (1, 1), W in (1537, 1073741824)"
    assert len(cells) == 6 and all("D=256" in c for c in cells)
    p = _run_scripts({"bad": ("swa_tune.py", ["--D", "96"])}, _env())["bad"]
    assert p.returncode == 2 and "no cell has D in [96]" in p.stderr


def test_swa_tune_kernels_filter(monkeypatch):
    """--kernels: only those kernels are tuned, and a cell's rules of the other kernels stay in the table."""
    monkeypatch.syspath_prepend(str(BENCH))
    tune = _bench_module("swa_tune.py")
    cell = dict(D=128, G=[1, 1], W=[385, 1536])
    old = [dict(kernel=kn, **cell, config=dict(BT=64, BS=64, num_warps=4, num_stages=2)) for kn in ("dkdv", "fwd")]
    new = dict(BT=64, BS=32, num_warps=4, num_stages=2)
    table = {"sm90": old}
    got = tune.merge_rules(table, "sm90", 128, 1, 512, {"fwd": new}, ["fwd", "dq"])["sm90"]
    assert got == [old[0], dict(kernel="fwd", **cell, config=new)]
    assert tune.merge_rules(table, "sm90", 128, 1, 512, {}, None)["sm90"] == []  # the whole cell re-tuned
    p = _run_scripts({"bad": ("swa_tune.py", ["--op", "eviction", "--kernels", "fwd", "dkv"])}, _env())["bad"]
    assert p.returncode == 2 and "--kernels: the eviction kernels are fwd, dq, dkdv, listed, got fwd dkv" in p.stderr


def test_swa_tune_cap_candidate(monkeypatch):
    """A timed config whose compiled kernel is held to fewer programs per SM by its registers than by its shared memory
    brings its form capped at the registers that add one; none where shared memory binds, a cap is set already, the
    SM's limits or the compile are unknown, or no kernel with the config's warps was compiled."""
    from mixerzoo.kernels._sm90 import HOPPER_SM

    monkeypatch.syspath_prepend(str(BENCH))
    tune = _bench_module("swa_tune.py")
    cfg = dict(BT=64, BS=64, BC=64, SPLIT=4, num_warps=4, num_stages=3)
    kib = 1024
    # the D = 64 eviction forward (216 registers, 56 KiB: two programs by registers, four by shared memory)
    assert tune.cap_candidate(cfg, [(216, 56 * kib, 4)], HOPPER_SM) == {**cfg, "maxnreg": 168}
    assert tune.cap_candidate(cfg, [(144, 56 * kib, 4)], HOPPER_SM) == {**cfg, "maxnreg": 128}
    # two kernels of the config's warps (the eviction dK/dV passes): the one with more registers counts
    assert tune.cap_candidate(cfg, [(120, 48 * kib, 4), (202, 48 * kib, 4)], HOPPER_SM) == {**cfg, "maxnreg": 168}
    assert tune.cap_candidate(cfg, [(233, 112 * kib, 4)], HOPPER_SM) is None  # two by either: shared memory binds
    assert tune.cap_candidate({**cfg, "maxnreg": 168}, [(168, 56 * kib, 4)], HOPPER_SM) is None
    assert tune.cap_candidate(cfg, [(216, 56 * kib, 4)], None) is None
    assert tune.cap_candidate(cfg, [], HOPPER_SM) is None
    assert tune.cap_candidate(cfg, [(216, 56 * kib, 8)], HOPPER_SM) is None
    # another GPU's limits: half the shared memory leaves room for no third program
    small = {**HOPPER_SM, "shared": 114 * kib}
    assert tune.cap_candidate(cfg, [(216, 56 * kib, 4)], small) is None


@no_gpu
@pytest.mark.slow  # about 25 s: the kernels in Triton's interpreter
def test_swa_tune_smoke(tmp_path):
    """swa_tune.py --smoke, swa and eviction: a tiny cell checked and timed per kernel, its rules merged into the
    given table (a rule of another cell kept), a file the launchers' table loader accepts."""
    table = tmp_path / "table.json"
    other = dict(kernel="fwd", D=64, G=[1, 1], W=[1, 384], config=dict(BM=64, BN=64, num_warps=4, num_stages=3))
    table.write_text(json.dumps({"sm90": [other]}))
    ev_table = tmp_path / "ev.json"
    runs = _run_scripts(
        {
            "swa": ("swa_tune.py", ["--smoke", "--table", str(table)]),
            "eviction": ("swa_tune.py", ["--smoke", "--op", "eviction", "--table", str(ev_table)]),
        },
        _env(),
    )
    for op, kernels in (("swa", ["dkdv", "dq", "fwd"]), ("eviction", ["dkdv", "dq", "fwd", "listed"])):
        p = runs[op]
        assert p.returncode == 0, p.stdout + p.stderr
        assert re.search(r"^  fwd    default .* ms", p.stdout, re.MULTILINE), p.stdout
        rules = json.loads((table if op == "swa" else ev_table).read_text())["sm90"]
        mine = [r for r in rules if r["D"] == (32 if op == "swa" else 16)]
        assert sorted(r["kernel"] for r in mine) == kernels
        assert all(r["G"] == [2, 64] and r["W"] == [1, 384] for r in mine)
    assert other in json.loads(table.read_text())["sm90"]


@pytest.mark.slow  # about 10 s: the kernels in Triton's interpreter
def test_swa_five_matmul_check():
    """The five-matmul backward experiment (benchmarks/NOTES-swa.md) still matches the reference, so that its
    committed timings stay reproducible."""
    p = subprocess.run(
        _command("swa_five_matmul.py", ["--check"]), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("dq, dk, dv rel. error") == 2, p.stdout


@pytest.mark.slow  # about 10 s: the kernels in Triton's interpreter
def test_swa_warp_specialized_check():
    """The warp-specialised forward and dK/dV experiment (benchmarks/NOTES-swa.md) still matches the reference, so
    that its committed timings stay reproducible."""
    p = subprocess.run(
        _command("swa_warp_specialized.py", ["--check"]), cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("o, lse, dk, dv rel. error") == 3, p.stdout


def test_swa_stash_check():
    """The stash backward experiment (benchmarks/NOTES-swa.md) runs the package's stash path against the reference at
    three small shapes (sinks, GQA, padding), so that its committed timings stay reproducible (about 6 s)."""
    p = subprocess.run(
        _command("swa_stash.py", ["--check"]), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(": rel RMSE dq ") == 3 and "worst" in p.stdout and "ok" in p.stdout, p.stdout


def test_swa_split_head_check():
    """The split-head experiment (benchmarks/NOTES-swa.md) runs both routes, split and on one wide tile, against the
    reference: swa at three small head dims (96, 80, 160), the eviction kernels at two (80, 40), so that its timings
    stay reproducible (about 4 s)."""
    p = subprocess.run(
        _command("swa_split_head.py", ["--check"]), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count(" split: rel RMSE o ") == 5 and p.stdout.count(" wide: rel RMSE o ") == 5, p.stdout
    assert p.stdout.count("eviction D=") == 4, p.stdout
    assert "worst" in p.stdout and ": ok" in p.stdout, p.stdout


@pytest.mark.slow  # about 20 s: four compiles for sm_90
def test_swa_gluon_check():
    """The Gluon forward experiment (benchmarks/NOTES-swa.md) still compiles for sm_90 with the installed Triton (its
    API changes between releases), each checked tile fitting a Hopper block without spills, so that its committed
    timings stay reproducible. Run with TRITON_INTERPRET set, as in this test session: the script clears it."""
    p = subprocess.run(
        _command("swa_gluon.py", ["--check"]), cwd=ROOT, env=_env(TRITON_INTERPRET="1"), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    fits = re.findall(r"^(overlap|pingpong) D=\d+ .*: \d+ B shared, \d+ registers, 0 spilled$", p.stdout, re.M)
    assert len(fits) == 4, p.stdout


@pytest.mark.slow  # a compile for sm_90 (about 10 s)
def test_sass_report_one_config():
    """sass_report.py compiles one eviction forward tile for sm_90 on this machine (TRITON_INTERPRET set, as in this
    test session: the script drops it) and prints its row: shared memory, registers, spills, the serialisation flag,
    the tile copies, programs per SM by registers / by shared memory and the register cap that adds one; and refuses a
    config without its kernel."""
    from mixerzoo.kernels._sm90 import programs_per_sm

    config = '{"BT": 64, "BS": 64, "BC": 64, "SPLIT": 2, "num_warps": 4, "num_stages": 2}'
    args = ["--op", "eviction", "--kernel", "fwd", "--D", "64", "--config", config]
    p = subprocess.run(_command("sass_report.py", args), cwd=ROOT, env=_env(TRITON_INTERPRET="1"), capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    pattern = r"^eviction +fwd +64 +1-1 +- +(\d+) +(\d+) +(\d+) +(yes|-) +(\d+) +(\d+)/(\d+) +(\d+|-)  \{"
    row = re.search(pattern, p.stdout, re.M)
    assert row, p.stdout
    kib, regs, spills, _, copies, by_regs, by_shared, cap = row.groups()
    assert 0 < int(kib) <= 227 and 0 < int(regs) <= 255 and int(copies) == 0, p.stdout
    # programs per SM by registers (4 warps) / by shared memory, and a cap only where registers bind
    assert int(by_regs) == programs_per_sm(int(regs), 0, 4)[0], p.stdout
    shared = int(kib) * 1024  # floored to KiB in the row
    assert int(by_shared) in (programs_per_sm(32, shared, 4)[1], programs_per_sm(32, shared + 1023, 4)[1]), p.stdout
    assert (cap == "-") == (int(by_regs) >= int(by_shared)), p.stdout
    if cap != "-":
        assert programs_per_sm(int(cap), 0, 4)[0] >= int(by_regs) + 1, p.stdout
    bad = subprocess.run(_command("sass_report.py", ["--op", "eviction", "--config", config]), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "--kernel and --config go together" in bad.stderr, bad.stderr


# kernel test files that check CPU-side logic only, left to CI: compiles for sm_90 without a GPU, run_op's choice of
# path with stand-ins for CUDA tensors, the kernels' names, the imports without Triton
KERNEL_TESTS_CPU_ONLY = {
    "test_sm90_fit.py", "test_sm90_occupancy.py", "test_run_op.py", "test_kernel_names.py", "test_without_triton.py",
}  # fmt: skip


def test_gpu_tests_run_every_kernel_test_file():
    """benchmarks/gpu_tests.sh names each kernel test file in a group (six files had been left out, among them the
    fast-launch tests that run on a GPU only), unless the file is CPU-only by design."""
    groups = (BENCH / "gpu_tests.sh").read_text()
    files = {p.name for p in (ROOT / "tests" / "kernels").glob("test_*.py")}
    assert KERNEL_TESTS_CPU_ONLY <= files
    missing = sorted(f for f in files - KERNEL_TESTS_CPU_ONLY if f"tests/kernels/{f}" not in groups)
    assert not missing, f"benchmarks/gpu_tests.sh runs no group with {missing}"
