"""experiments/benchmark/timing.py: the one take-turns timing loop."""


def test_take_turns_times_every_step_each_round_after_one_warm_up():
    from experiments.benchmark.timing import take_turns

    calls = []
    seconds = take_turns({"a": lambda k: calls.append(("a", k)), "b": lambda k: calls.append(("b", k))}, rounds=2)
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert [len(t) for t in seconds.values()] == [2, 2] and all(s >= 0 for t in seconds.values() for s in t)
