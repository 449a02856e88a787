"""The watchdog policy, one rule at a time, on an injected clock."""
import signal

import pytest

from fluxgymd.watchdog import (Budget, Ending, Limits, Stall, Watch, after_exit, backoff)

L = Limits(stall_floor_s=10, stall_factor=5, loading_limit_s=100, caching_limit_s=100,
           saving_limit_s=50, sampling_limit_s=50, publishing_limit_s=70, output_silence_s=30,
           gpu_idle_percent=5,
           gpu_idle_window_s=20, dstate_limit_s=40, backoff_s=2, backoff_max_s=10,
           max_restarts=3, no_progress_restarts=2)


def training(t0=0.0, contract=True, gpu=False):
    w = Watch(L, started=t0, contract=contract, gpu_available=gpu)
    w.on_phase(t0, "training")
    return w


# --- progress ------------------------------------------------------------------------
def test_no_step_within_the_floor_is_fine_and_past_it_is_a_stall():
    w = training()
    w.on_step(1, 1)
    assert w.check(10.9) is None
    s = w.check(11.1)
    assert s.rule == "progress" and "no step for 10s since step 1 (limit 10s)" in s.reason


def test_the_limit_adapts_to_slow_steps():
    w = training()
    for i, t in enumerate([0, 4, 8, 12], start=1):  # 4 s steps: limit 5 x 4 = 20 s
        w.on_step(t, i)
    assert w.step_limit() == 20
    assert w.check(12 + 19) is None
    assert w.check(12 + 21).rule == "progress"


def test_a_repeated_step_number_is_not_progress():
    w = training()
    w.on_step(0, 5)
    w.on_step(8, 5)  # the same step reported again (a tqdm redraw)
    assert w.check(10.5).rule == "progress"


def test_training_without_any_step_is_limited_from_its_start():
    w = training(t0=100)
    assert w.check(109) is None
    assert "since training began" in w.check(111).reason


# --- phases ----------------------------------------------------------------------------
@pytest.mark.parametrize("phase,limit", [("loading", 100), ("caching", 100), ("saving", 50),
                                         ("sampling", 50), ("publishing", 70)])
def test_long_phases_get_their_own_generous_limit(phase, limit):
    w = training()
    w.on_step(0, 1)
    w.on_phase(1, phase)
    assert w.check(1 + limit - 1) is None  # far past the 10 s step limit: not a stall
    s = w.check(1 + limit + 1)
    assert s.rule == "phase" and phase in s.reason


def test_time_spent_saving_does_not_count_against_the_next_step():
    w = training()
    w.on_step(0, 10)
    w.on_phase(1, "saving")
    w.on_phase(40, "training")
    assert w.check(49) is None  # 49 s since the step, but only 9 s since training resumed
    assert w.check(51).rule == "progress"


def test_a_step_event_implies_training():
    w = Watch(L, started=0, contract=True)
    w.on_phase(0, "loading")
    w.on_step(5, 1)
    assert w.phase == "training"
    assert w.check(16).rule == "progress"


# --- output silence ------------------------------------------------------------------
def test_silence_for_jobs_without_progress():
    w = Watch(L, started=0, contract=False)
    w.on_output(10)
    assert w.check(39) is None
    assert w.check(41).rule == "silence"


def test_silence_does_not_apply_to_contract_jobs_before_training():
    w = Watch(L, started=0, contract=True)
    assert w.check(1000) is None  # no phase yet: nothing to judge by (phases have limits)


# --- GPU ---------------------------------------------------------------------------------
def test_gpu_idle_for_the_window_while_training_is_a_stall():
    w = training(gpu=True)
    w.on_step(0, 1)
    for t in range(0, 9):
        w.on_gpu(t, 0.0)
        w.on_step(t, t + 1)  # steps still coming: progress is fine, the GPU is not
    assert w.check(8) is None
    for t in range(9, 25):
        w.on_step(t, t + 1)
        w.on_gpu(t, 1.0)
    s = w.check(24)
    assert s.rule == "gpu" and "below 5%" in s.reason


def test_gpu_rule_is_off_without_a_probe():
    w = training(gpu=False)
    for t in range(0, 60):
        w.on_step(t, t + 1)
        w.on_gpu(t, 0.0)
    assert w.check(59) is None


def test_idle_gpu_while_loading_or_saving_is_not_a_stall():
    w = training(gpu=True)
    w.on_phase(0, "loading")
    for t in range(0, 90):
        w.on_gpu(t, 0.0)
    assert w.check(90) is None
    w.on_phase(90, "training")  # the idle time before does not carry over
    w.on_step(91, 1)
    w.on_gpu(92, 0.0)
    assert w.check(100) is None


def test_a_busy_reading_resets_the_idle_window():
    w = training(gpu=True)
    w.on_gpu(0, 0.0)
    w.on_gpu(15, 90.0)
    w.on_gpu(16, 0.0)
    for t in range(16, 30):
        w.on_step(t, t)
    assert w.check(30) is None


# --- process ---------------------------------------------------------------------------
def test_long_uninterruptible_sleep():
    w = training()
    w.on_process(0, "disk-sleep", 100)
    w.on_step(0, 1)
    w.on_step(5, 2)
    w.on_process(5, "disk-sleep", 100)
    w.on_process(6, "running", 100)  # it came back: the clock restarts
    w.on_process(7, "disk-sleep", 100)
    assert w.check(8) is None
    w2 = training()
    w2.on_process(0, "disk-sleep", 100)
    for t in range(0, 45):
        w2.on_step(t, t + 1)
    assert w2.check(45).rule == "dstate"


def test_memory_limit_is_fatal():
    w = Watch(Limits(max_rss_mb=1000), started=0)
    w.on_process(1, "running", 999)
    assert w.check(1) is None
    w.on_process(2, "running", 1500)
    s = w.check(2)
    assert s.rule == "memory" and s.fatal


# --- after an attempt ends -------------------------------------------------------------
def end(code=1, sig=None, **kw):
    desc = f"killed by {signal.Signals(sig).name}" if sig else f"exited with code {code}"
    return Ending(code=None if sig else code, signal=sig, description=desc, **kw)


def test_success_and_cancel_are_final():
    assert after_exit(end(0), Budget(), L).action == "succeeded"
    assert after_exit(end(0, cancelled=True), Budget(), L).action == "cancelled"


def test_a_crash_restarts_with_doubling_backoff_until_the_budget_is_spent():
    b = Budget()
    delays = []
    for i in range(3):
        o = after_exit(end(1, progress=10 * (i + 1)), replace_start(b, 10 * i), L)
        assert o.action == "restart", o
        delays.append(o.delay_s)
        b = o.budget
    assert delays == [2, 4, 8] and b.restarts == 3
    o = after_exit(end(1, progress=40), replace_start(b, 30), L)
    assert o.action == "failed" and "gave up after 3 restarts" in o.reason
    assert backoff(L, 10) == 10  # capped


def replace_start(b, start):
    from dataclasses import replace
    return replace(b, progress_at_start=start)


def test_the_no_progress_breaker():
    b = Budget(progress_at_start=20)
    o = after_exit(end(1, progress=20), b, L)
    assert o.action == "restart" and o.budget.no_progress == 1
    o = after_exit(end(1, progress=20), replace_start(o.budget, 20), L)
    assert o.action == "failed"
    assert o.reason.startswith("no progress since step 20: 2 attempts in a row")


def test_progress_resets_the_breaker():
    o = after_exit(end(1, progress=20), Budget(no_progress=1, progress_at_start=10), L)
    assert o.action == "restart" and o.budget.no_progress == 0


def test_exit_75_resumes_without_spending_a_restart():
    o = after_exit(end(75, progress=30), Budget(restarts=3, progress_at_start=20), L)
    assert o.action == "resume" and o.budget.restarts == 3


def test_exit_75_in_a_loop_without_progress_still_trips_the_breaker():
    o = after_exit(end(75, progress=30), Budget(no_progress=1, progress_at_start=30), L)
    assert o.action == "failed" and "no progress" in o.reason


@pytest.mark.parametrize("tail", [
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate",
])
def test_out_of_memory_fails_with_advice_and_is_not_retried(tail):
    o = after_exit(end(1, output_tail=tail), Budget(), L)
    assert o.action == "failed"
    assert "train_batch_size" in o.reason and "gradient_checkpointing" in o.reason


def test_oom_kill_fails_with_advice():
    o = after_exit(end(sig=signal.SIGKILL, oom_killed=True), Budget(), L)
    assert o.action == "failed" and "OOM killer" in o.reason


def test_a_stall_restarts_with_its_reason():
    st = Stall("progress", "no step for 130s since step 812 (limit 120s)")
    o = after_exit(end(sig=signal.SIGKILL, stall=st, progress=800),
                   Budget(progress_at_start=700), L)
    assert o.action == "restart"
    assert o.reason == ("stalled: no step for 130s since step 812 (limit 120s); "
                        "restart 1/3 in 2s")


def test_exit_0_is_finished_even_while_a_stall_was_being_handled():
    st = Stall("gpu", "GPU idle")
    assert after_exit(end(0, stall=st, progress=5), Budget(), L).action == "succeeded"


def test_daemon_stop_interrupts():
    assert after_exit(end(75, daemon_stopping=True), Budget(), L).action == "interrupted"


def test_overrides_keep_types():
    lim = Limits().with_overrides({"max_restarts": 2, "stall_floor_s": 3})
    assert lim.max_restarts == 2 and isinstance(lim.stall_floor_s, float)
