import json

from fluxgymd.progress import parse_child_event, parse_tqdm


def test_kohya_style_tqdm_line():
    ev = parse_tqdm("steps:  25%|██▌       | 240/960 [01:00<03:00,  4.00it/s, avr_loss=0.123]")
    assert ev == {"event": "step", "step": 240, "total": 960, "seconds_per_step": 0.25,
                  "loss": 0.123}


def test_seconds_per_iteration_and_no_loss():
    ev = parse_tqdm(" 10%|#         | 1/10 [00:02<00:18,  2.50s/it]")
    assert ev == {"event": "step", "step": 1, "total": 10, "seconds_per_step": 2.5}


def test_lines_that_are_not_bars():
    for line in ["loading 3/4 shards", "epoch 1/10", "", "100/0 [", "5/3 [00:01]"]:
        assert parse_tqdm(line) is None, line


def ev(**kw):
    return json.dumps(kw).encode()


def test_contract_events_are_normalized():
    assert parse_child_event(ev(event="step", job="4", attempt=2, step=10, total=100,
                                loss=0.5, lr=1e-4)) == {
        "event": "step", "job": 4, "attempt": 2, "step": 10, "total": 100, "loss": 0.5,
        "lr": 1e-4}
    assert parse_child_event(ev(event="phase", job=4, phase="caching"))["phase"] == "caching"
    assert parse_child_event(ev(event="checkpoint", job=4, path="/x/ckpt-10", step=10))[
        "path"] == "/x/ckpt-10"


def test_malformed_contract_events_are_dropped():
    for bad in [b"\xff", b"[]", ev(event="nope", job=1), ev(event="step", job="x", step=1),
                ev(event="step", job=1), ev(event="step", job=1, step=-1),
                ev(event="phase", job=1, phase="dancing"), ev(event="checkpoint", job=1)]:
        assert parse_child_event(bad) is None, bad
    # non-finite numbers are dropped from the event, not stored
    assert "loss" not in parse_child_event(b'{"event":"step","job":1,"step":1,"loss":NaN}')


def test_a_plan_event_is_bounded_and_normalized():
    import json

    from fluxgymd.progress import parse_child_event

    def ev(**fields):
        return parse_child_event(json.dumps(dict(fields, event="plan", job="3")).encode())

    good = ev(tier="12G", why="fits", peak_bytes=8 << 30, free_bytes=None,
              parts={"base_weights": 6 << 30, "odd": "x"}, levers={"fp8_base": False,
                                                                   "bad": [1]})
    assert good["plan"] == {"tier": "12G", "why": "fits", "peak_bytes": 8 << 30,
                            "free_bytes": None, "parts": {"base_weights": 6 << 30},
                            "levers": {"fp8_base": False}}
    assert ev(tier=12) is None and ev(tier="x" * 17) is None
    assert ev(tier="8G", parts={str(i): i for i in range(17)}) is None
    assert ev(tier="8G", peak_bytes=-1)["plan"]["peak_bytes"] is None
