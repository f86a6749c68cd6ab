"""benchmarks/gpu_check.py, the one prepared GPU check, and the CUDA tests it runs beside the others.

On the CPU: the script's ``--dry-run`` end to end (toy sizes, one step timed out on purpose), its orchestration
with injected failing and hanging steps, the target verdicts and the ``cuda`` marker.  On a CUDA device
(``pytest -m cuda``, step 2 of the check): every attention backend against the float64 reference, forward and
backward, in float32 and bf16; gradient checkpointing; ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import forward_backward, make_tiny_transformer

from sdt_diffusion.attention import spatial_decay as eq
from sdt_diffusion.attention.backends import ATTENTION_BACKENDS, DecayInputs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check as gc  # noqa: E402

CUDA_TESTS_TODAY = 22  # test_fused_attention.py (21) and test_diffusers_conformance.py (1) before this file


# ---------------------------------------------------------------------------------------------- the dry run
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, dict]:
    """One ``--dry-run`` with the attention step given 0.5 s, so that it times out and later steps must run."""
    out = tmp_path_factory.mktemp("gpu_check") / "results"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--output-dir", str(out),
                           "--timeout", "attention=0.5"], cwd=REPO, capture_output=True, text=True, timeout=900)
    results = json.loads((out / gc.RESULTS_JSON).read_text())
    return proc, out, results


def _numbers(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [obj]
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in _numbers(v)]
    if isinstance(obj, list):
        return [n for v in obj for n in _numbers(v)]
    return []


@pytest.mark.slow
def test_dry_run_writes_json_markdown_and_log_with_the_steps_in_order(dry_run):
    proc, out, results = dry_run
    assert sorted(p.name for p in out.iterdir()) == sorted([gc.RESULTS_JSON, gc.SUMMARY_MD, gc.LOG])  # no leftovers
    assert results["mode"] == "dry-run" and results["finished_utc"]
    assert [s["name"] for s in results["steps"]] == list(gc.STEP_NAMES)
    started = [s["started_utc"] for s in results["steps"] if "started_utc" in s]
    assert started == sorted(started) and len(started) == sum(s["status"] != "skipped" for s in results["steps"])
    summary = (out / gc.SUMMARY_MD).read_text()
    positions = [summary.index(f"| {s.name} |") for s in gc.STEPS]
    assert positions == sorted(positions)
    assert summary.index("## Environment") < summary.index("## Steps") < summary.index("## Targets")
    assert "Dry run" in summary
    # the environment is printed first, the summary last
    assert proc.stdout.index("[0] env: ok") < proc.stdout.index("torch") < proc.stdout.index("[1] setup")
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])


@pytest.mark.slow
def test_dry_run_reports_the_timed_out_step_and_runs_the_later_ones(dry_run):
    proc, out, results = dry_run
    status = {s["name"]: s["status"] for s in results["steps"]}
    assert status["attention"] == "timeout"
    assert status["models_compiled"] == "skipped"
    assert all(status[n] == "ok" for n in ("env", "setup", "cuda_tests", "models_eager", "train_smoke", "sdt_h"))
    assert status["profile"] in ("ok", "skipped")  # skipped only when no model row missed its target
    assert proc.returncode == 1, proc.stdout[-3000:]  # a step timed out
    attention = next(s for s in results["steps"] if s["name"] == "attention")
    assert "killed after" in attention["reason"] and attention["returncode"] is None
    log = (out / gc.LOG).read_text()
    assert all(f"] {n}: " in log for n in ("env", "attention", "train_smoke", "sdt_h"))


@pytest.mark.slow
def test_dry_run_has_no_number_for_a_step_that_did_not_run(dry_run):
    _, out, results = dry_run
    for step in results["steps"]:
        if step["status"] in ("skipped", "timeout"):
            assert not _numbers(step.get("results", {})), step["name"]
    summary = (out / gc.SUMMARY_MD).read_text()
    assert "## attention" not in summary and "## models_compiled" not in summary
    targets = {t["name"]: t for t in results["targets"]}
    for name in ("train_time_ratio_compiled", "mfu_compiled"):  # models_compiled did not run
        assert targets[name]["value"] is None and "models_compiled did not run" in targets[name]["reason"]


@pytest.mark.slow
def test_dry_run_targets_all_have_a_status(dry_run):
    _, _, results = dry_run
    assert [t["name"] for t in results["targets"]] == [t.name for t in gc.TARGETS]
    for t in results["targets"]:
        assert t["status"] in ("pass", "miss", "not-run"), t
        if t["status"] == "not-run":
            assert t["value"] is None and t["reason"], t
        else:
            ok = t["value"] <= t["threshold"] if t["at_most"] else t["value"] >= t["threshold"]
            assert ok == (t["status"] == "pass"), t
    targets = {t["name"]: t for t in results["targets"]}
    assert targets["setup_seconds"]["status"] == "not-run"  # the dry run installs nothing
    assert targets["cuda_tests_green"]["status"] == "not-run"
    assert targets["train_time_ratio"]["status"] in ("pass", "miss")  # measured at the toy size
    assert targets["resume_exact"]["status"] == "pass"  # float32 on the CPU: the resume is bit-exact


@pytest.mark.slow
def test_dry_run_measured_every_step_that_ran(dry_run):
    _, _, results = dry_run
    res = {s["name"]: s.get("results", {}) for s in results["steps"]}
    assert res["env"]["torch"] == torch.__version__ and res["env"]["cuda_available"] is False
    counts = res["cuda_tests"]["counts"]
    assert counts["collected"] >= CUDA_TESTS_TODAY and counts["skipped"] == counts["collected"]
    assert res["cuda_tests"]["device_type"] == "cpu"
    (train,), (sample,) = res["models_eager"]["train"], res["models_eager"]["sample"]
    assert train["size"] == sample["size"] == "toy" and train["sdt"]["time"]["median_s"] > 0
    assert sample["sdt"]["images_per_s"] > 0 and sample["dit"]["images_per_s"] > 0
    smoke = res["train_smoke"]
    assert smoke["straight"]["steps"] == smoke["resumed"]["steps"] == 4 and smoke["straight"]["losses_finite"]
    assert smoke["resume"] == {"from_step": 2, "losses_equal": True, "weights_identical": True,
                               "max_abs_weight_diff": 0.0, "exact": True}
    assert smoke["sampling"]["images"] == 4 and smoke["sampling"]["shape"] == [4, 16, 16, 3]
    assert list(res["sdt_h"]["rows"]) == gc.mode_settings("dry-run")["sdt_h"]["models"]
    assert gc.mode_settings("full")["sdt_h"]["models"] == ["sdt_h_tiny", "convnext_tiny", "swin_tiny_patch4_window7_224"]
    assert res["setup"]["packages"]["sdt-diffusion"] is not None


# ---------------------------------------------------------------------------------------------- orchestration
def _fake(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_failing_and_hanging_steps_are_reported_and_later_steps_still_run(tmp_path):
    out = tmp_path / "out"
    write = "import json, sys; open(sys.argv[1], 'w').write(json.dumps({}))"
    snapshot = tmp_path / "while_running.json"
    commands = {name: _fake("pass") for name in gc.STEP_NAMES}
    commands["env"] = [*_fake(write.replace("{}", "{'torch': 'fake', 'device': 'fake'}")),
                       str(gc.partial_path(out.resolve(), "env"))]
    commands["setup"] = _fake("raise SystemExit(3)")
    commands["cuda_tests"] = _fake("import subprocess, sys; subprocess.run([sys.executable, '-c', "
                                   "'import time; time.sleep(60)'])")  # a hang in a grandchild
    # models_eager writes one number, then hangs: what it measured is kept; while it runs, the report says so
    commands["models_eager"] = _fake(
        "import json, shutil, sys, time; shutil.copy(sys.argv[2], sys.argv[3]); "
        "open(sys.argv[1], 'w').write(json.dumps({'train': [], 'sample': [], 'probe': 1.5})); time.sleep(60)") + [
        str(gc.partial_path(out.resolve(), "models_eager")), str(out / gc.RESULTS_JSON), str(snapshot)]
    args = gc.parse_args(["--output-dir", str(out), "--assume-installed", "--timeout", "cuda_tests=1",
                          "--timeout", "models_eager=2"])
    start = time.perf_counter()
    results = gc.run_check(args, commands=commands)
    assert time.perf_counter() - start < 30  # the hanging steps were killed, grandchild included

    steps = {s["name"]: s for s in results["steps"]}
    assert steps["env"]["status"] == "ok" and steps["env"]["results"]["torch"] == "fake"
    assert steps["setup"]["status"] == "failed" and "exit code 3" in steps["setup"]["reason"]
    assert steps["cuda_tests"]["status"] == "timeout" and not steps["cuda_tests"].get("results")
    assert steps["models_eager"]["status"] == "timeout" and steps["models_eager"]["results"]["probe"] == 1.5
    assert "results up to then kept" in steps["models_eager"]["reason"]
    for name in ("models_compiled", "attention", "train_smoke", "sdt_h"):
        assert steps[name]["status"] == "ok", name
    assert steps["profile"]["status"] == "skipped" and "no target" in steps["profile"]["reason"]
    assert all(t["status"] == "not-run" for t in results["targets"])
    assert not list(out.glob(".step-*"))

    seen = {s["name"]: s for s in json.loads(snapshot.read_text())["steps"]}  # the report while step 3 ran
    assert [seen[n]["status"] for n in ("env", "setup", "cuda_tests", "models_eager")] == [
        "ok", "failed", "timeout", "running"]
    assert all(seen[n]["status"] == "pending" and "results" not in seen[n] for n in gc.STEP_NAMES[5:])
    summary = (out / gc.SUMMARY_MD).read_text()
    assert "| setup | failed |" in summary and "| cuda_tests | timeout |" in summary


def test_a_stopped_check_stops_its_running_step(tmp_path):
    """SIGTERM to the check (a session's time limit, say) ends the step it is running, grandchildren included."""
    pid_file = tmp_path / "pid"
    parent = f"""
import signal, sys, time
sys.path.insert(0, {str(REPO / "benchmarks")!r})
import gpu_check as gc
step = [sys.executable, "-c", "import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); p.wait()"]
signal.signal(signal.SIGTERM, gc._exit_on_sigterm)
args = gc.parse_args(["--output-dir", {str(tmp_path / "out")!r}, "--assume-installed", "--steps", "setup"])
gc.run_check(args, commands={{"env": [sys.executable, "-c", "pass"], "setup": step}})
"""
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=REPO)
    deadline = time.time() + 120
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    grandchild = int(pid_file.read_text())
    proc.terminate()
    assert proc.wait(timeout=60) == 128 + 15

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False

    for _ in range(50):
        if not alive(grandchild):
            break
        time.sleep(0.1)
    assert not alive(grandchild)
    report = json.loads((tmp_path / "out" / gc.RESULTS_JSON).read_text())
    assert next(s for s in report["steps"] if s["name"] == "setup")["status"] == "running"  # cut short, and says so


def test_budget_and_step_selection_skip_with_a_reason(tmp_path):
    commands = {name: _fake("import time; time.sleep(0.3)") for name in gc.STEP_NAMES}
    args = gc.parse_args(["--quick", "--output-dir", str(tmp_path), "--assume-installed", "--budget", "5.5",
                          "--steps", "setup", "cuda_tests"])
    results = gc.run_check(args, commands=commands)
    reasons = {s["name"]: (s["status"], s.get("reason", "")) for s in results["steps"]}
    assert reasons["env"][0] == "ok" and reasons["setup"][0] == "ok"  # env always runs
    assert reasons["models_eager"] == ("skipped", "not selected (--steps)")
    assert reasons["train_smoke"] == ("skipped", "not part of --quick")
    assert reasons["cuda_tests"] == ("skipped", "the run's time budget is spent")  # 5.5 s - 2 x 0.3 s < 5 s left


def test_missing_packages_are_named(tmp_path):
    have = gc.installed_distributions(sys.executable, ("pytest", "no-such-distribution-xyz"))
    assert have["pytest"] == pytest.__version__ and have["no-such-distribution-xyz"] is None


@pytest.mark.parametrize("argv, words", [
    (["--timeout", "nosuch=3"], ["nosuch", "env"]),
    (["--timeout", "setup=soon"], ["'soon'", "not a number"]),
    (["--timeout", "setup=0"], ["positive"]),
    (["--budget", "-1"], ["--budget", "-1"]),
    (["--quick", "--dry-run"], ["not allowed"]),
    (["--wheel-dir", "/no/such/folder"], ["/no/such/folder"]),
])
def test_bad_arguments_name_the_bad_input(argv, words, capsys):
    with pytest.raises(SystemExit):
        gc.parse_args(argv)
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


# ---------------------------------------------------------------------------------------------- verdicts
def _results_with(train_rows=(), sample_rows=(), mode="full") -> dict:
    steps = [{"name": s.name, "item": s.item, "status": "pending", "reason": "not reached"} for s in gc.STEPS]
    eager = next(s for s in steps if s["name"] == "models_eager")
    eager.update(status="ok", results={"train": list(train_rows), "sample": list(sample_rows)})
    return {"mode": mode, "steps": steps}


def _train_row(size, sdt_s, dit_s, sdt_mib, dit_mib):
    return {"size": size, "patch_size": 2, "batch": 32, "compiled": False,
            "sdt": {"time": {"median_s": sdt_s}, "peak_mem_mib": sdt_mib, "mfu": 0.4},
            "dit": {"time": {"median_s": dit_s}, "peak_mem_mib": dit_mib, "mfu": 0.45}}


def _sample_row(size, sdt, dit):
    return {"size": size, "patch_size": 2, "batch": 64, "sdt": {"images_per_s": sdt}, "dit": {"images_per_s": dit}}


def test_targets_are_held_at_xl2_and_the_worst_miss_is_profiled():
    results = _results_with([_train_row("S", 9.0, 1.0, 1.0, 1.0), _train_row("XL", 1.10, 1.0, 1000, 1000)],
                            [_sample_row("S", 0.5, 1.0), _sample_row("XL", 0.97, 1.0)])
    targets = {t["name"]: t for t in gc.evaluate_targets(results)}
    assert targets["train_time_ratio"]["status"] == "miss"
    assert targets["train_time_ratio"]["value"] == pytest.approx(1.10)  # XL/2, not the slower S/2
    assert targets["train_memory_ratio"]["status"] == "pass" and targets["train_memory_ratio"]["value"] == 1.0
    assert targets["sampling_throughput_ratio"]["value"] == 0.5  # the worst size
    assert targets["sampling_throughput_ratio"]["row"]["size"] == "S"
    for name in ("setup_seconds", "cuda_tests_green", "train_time_ratio_compiled", "mfu_compiled", "resume_exact"):
        assert targets[name]["status"] == "not-run" and targets[name]["value"] is None
    worst = gc.worst_missed_row(list(targets.values()))  # 0.95 / 0.5 = 1.9 beats 1.10 / 1.05
    assert (worst["target"], worst["mode"], worst["size"], worst["compiled"]) == (
        "sampling_throughput_ratio", "sample", "S", False)


def test_no_xl_row_means_not_run_not_a_number_from_another_size():
    targets = {t["name"]: t for t in gc.evaluate_targets(_results_with([_train_row("S", 2.0, 1.0, 1.0, 1.0)]))}
    assert targets["train_time_ratio"]["status"] == "not-run" and "training row XL" in targets["train_time_ratio"][
        "reason"]
    assert gc.worst_missed_row(list(targets.values())) is None


def test_cuda_test_verdicts():
    results = _results_with()
    tests = next(s for s in results["steps"] if s["name"] == "cuda_tests")
    tests.update(status="ok", results={"device_type": "cuda", "counts": {
        "collected": 30, "passed": 29, "failed": 1, "errors": 0, "skipped": 0}})
    green = next(t for t in gc.evaluate_targets(results) if t["name"] == "cuda_tests_green")
    assert green["status"] == "miss" and "1 failed" in green["reason"]
    tests["results"]["counts"].update(passed=30, failed=0)
    assert next(t for t in gc.evaluate_targets(results) if t["name"] == "cuda_tests_green")["status"] == "pass"
    tests["results"]["device_type"] = "cpu"
    assert next(t for t in gc.evaluate_targets(results) if t["name"] == "cuda_tests_green")["status"] == "not-run"


def test_parse_junit_counts_outcomes(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                   '<testcase classname="a" name="bad"><failure message="x"/></testcase>'
                   '<testcase classname="b" name="err"><error message="y"/></testcase>'
                   '<testcase classname="b" name="skip"><skipped message="no CUDA"/></testcase>'
                   '</testsuite></testsuites>')
    counts, failing, ids = gc.parse_junit(xml)
    assert counts == {"collected": 4, "passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert failing == ["a::bad", "b::err"] and ids == ["a::ok", "a::bad", "b::err", "b::skip"]


@pytest.mark.parametrize("name, value", [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200 NVL", 835.0), ("NVIDIA GeForce RTX 4090", None),
])
def test_mfu_peak_is_the_datasheet_figure_with_its_source(name, value):
    peak = gc.peak_tflops(name, None)
    assert (peak or {}).get("value") == value
    if peak:
        assert "datasheet" in peak["source"]
    assert gc.peak_tflops(name, 500.0) == {"value": 500.0, "source": "--peak-tflops"}


# ---------------------------------------------------------------------------------------------- the cuda marker
@pytest.mark.slow
def test_cuda_marker_selects_the_cuda_only_tests(dry_run):
    """Step 2 of the dry run ran ``pytest -m cuda tests``: the CUDA-only tests, all skipped on the CPU."""
    _, _, results = dry_run
    res = next(s for s in results["steps"] if s["name"] == "cuda_tests")["results"]
    ids = res["tests"]
    mine = [i for i in ids if i.startswith("tests.test_gpu_check::")]
    assert len(mine) == 10 and len(ids) >= CUDA_TESTS_TODAY + len(mine)
    assert res["counts"]["skipped"] == res["counts"]["collected"] == len(ids)
    assert any(i.startswith("tests.test_fused_attention::test_cuda_") for i in ids)
    assert any(i.startswith("tests.test_diffusers_conformance::") for i in ids)
    assert not any("test_auto_resolution_per_device" in i for i in ids)  # 'cuda' in a name is not enough


# ---------------------------------------------------------------------------------------------- on CUDA
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SIDE, HEADS, HEAD_DIM = 16, 4, 64
# ||err|| / ||ref||: float32 arithmetic lands far under 1e-3 (TF32 near 3e-4), bf16 operands between 1e-3 and
# 1e-2 (on the CPU, checked 2026-12-04: 3e-3 to 8e-3 for augmented, dense and math, outputs and gradients)
REL_ERR = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 (NaN stays NaN and fails every comparison)."""
    return ((a.double() - ref).norm() / ref.norm()).item()


def _assert_grads_close(grads: dict, ref: dict, tol: float) -> None:
    """Every gradient within ``tol`` of the reference in relative norm (absent ones absent in both)."""
    for name, r in ref.items():
        g = grads[name]
        assert (g is None) == (r is None), name
        if r is not None:
            assert (g.double() - r.double()).norm() <= tol * r.double().norm() + 1e-12, (name, _rel_err(g, r.double()))


def _attention(backend: str, dtype: torch.dtype, seed: int):
    """Output and gradients (q, k, v, gate logits) of one CDSF attention call on a 16x16 grid, fresh inputs."""
    g = torch.Generator().manual_seed(seed)
    seq = SIDE * SIDE
    q, k, v = (torch.randn(2, HEADS, seq, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(3))
    logits = torch.randn(2, seq, HEADS, generator=g, dtype=torch.float64) * 2
    cotangent = torch.randn(2, HEADS, seq, HEAD_DIM, generator=g, dtype=torch.float64).cuda()

    def run(name: str, dt: torch.dtype, gate_dt: torch.dtype):
        leaves = [t.cuda().to(dt).requires_grad_() for t in (q, k, v)] + [logits.cuda().to(gate_dt).requires_grad_()]
        decay = DecayInputs("cdsf", SIDE, SIDE, 0.1, gates=eq.context_aware_gates(leaves[3]))
        out = ATTENTION_BACKENDS[name](*leaves[:3], decay)
        grads = torch.autograd.grad((out.double() * cotangent).sum(), leaves)
        return out, grads

    ref_out, ref_grads = run("math", torch.float64, torch.float64)
    out, grads = run(backend, dtype, torch.float32)  # gates stay float32, as in the model
    return out, grads, ref_out, ref_grads


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("backend", ["augmented", "dense", "flex", "math"])
def test_cuda_backend_forward_backward_against_float64(backend, dtype):
    out, grads, ref_out, ref_grads = _attention(backend, dtype, seed=sum(map(ord, backend + str(dtype))))
    assert out.dtype == dtype
    errors = {"out": _rel_err(out, ref_out)} | {n: _rel_err(g, r) for n, g, r in zip("qkvG", grads, ref_grads)}
    assert all(e < REL_ERR[dtype] for e in errors.values()), errors


@cuda_only
def test_cuda_gradient_checkpointing_gives_the_same_gradients():
    model = make_tiny_transformer(seed=3).cuda().train()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 4, 8, 8, generator=g).cuda()
    t, y = torch.randint(0, 1000, (4,), generator=g).cuda(), torch.randint(0, 10, (4,), generator=g).cuda()
    out, grads = forward_backward(model, x, t, y)
    out, grads = out.detach().clone(), {n: v.clone() for n, v in grads.items()}
    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing()
    out_ckpt, grads_ckpt = forward_backward(model, x, t, y)
    torch.testing.assert_close(out_ckpt, out, rtol=1e-6, atol=1e-7)
    _assert_grads_close(grads_ckpt, grads, 1e-5)


@cuda_only
def test_cuda_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    eager, fast = make_tiny_transformer(seed=5).cuda().train(), make_tiny_transformer(seed=5).cuda().train()
    compiled = torch.compile(fast, fullgraph=True)  # inductor: Triton kernels on the GPU, no graph break
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 4, 8, 8, generator=g).cuda()
    t, y = torch.randint(0, 1000, (4,), generator=g).cuda(), torch.randint(0, 10, (4,), generator=g).cuda()
    out_ref, grads_ref = forward_backward(eager, x, t, y)
    out = compiled(x, t, y).sample
    out.square().mean().backward()
    assert _rel_err(out, out_ref.double()) < 1e-4
    _assert_grads_close({n: p.grad for n, p in fast.named_parameters()}, grads_ref, 1e-3)
