"""Teacher-forcing ratio schedules and temperature annealing (SPEC section 2)."""
import math

import pytest

from fused_s2s import schedules as S

STEPS = [0, 1, 7, 100, 2500, 12345]


@pytest.mark.parametrize("i", STEPS)
def test_formulas(i):
    assert S.Constant(0.3)(i) == 0.3
    assert S.Linear(k=1.0, c=1e-4, eps=0.05)(i) == pytest.approx(max(0.05, 1.0 - 1e-4 * i), abs=1e-15)
    assert S.Exponential(k=0.999)(i) == pytest.approx(0.999**i, rel=1e-12)
    assert S.InverseSigmoid(k=500)(i) == pytest.approx(500 / (500 + math.exp(i / 500)), rel=1e-12)
    assert S.InverseSigmoid(k=1.0)(min(i, 700)) == pytest.approx(1 / (1 + math.exp(min(i, 700))), rel=1e-12)


def test_linear_reaches_floor_and_decreases():
    s = S.Linear(k=0.9, c=0.1, eps=0.2)
    vals = [s(i) for i in range(12)]
    assert vals[0] == 0.9 and vals[-1] == 0.2
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_huge_steps_are_finite():
    with pytest.raises(OverflowError):  # the naive formula would overflow here
        math.exp(1e9 / 10.0)
    for s in (S.InverseSigmoid(k=1.0), S.InverseSigmoid(k=10.0), S.Exponential(0.5), S.Linear(c=1.0)):
        v = s(1e9)
        assert math.isfinite(v) and 0.0 <= v < 1e-300, (s, v)
    # k=1e9 at i=1e9: exp(1) / ... still well inside range
    assert S.InverseSigmoid(k=1e9)(1e9) == pytest.approx(1e9 / (1e9 + math.e), rel=1e-12)
    assert S.TemperatureSchedule(tau0=2.0, r=1.0, tau_min=0.3)(1e9) == 0.3


@pytest.mark.parametrize("i", [0, 1, 9, 10, 11, 29, 30, 1000])
def test_temperature_piecewise_constant(i):
    s = S.TemperatureSchedule(tau0=1.5, r=0.01, tau_min=0.5, every=10)
    expect = max(0.5, 1.5 * math.exp(-0.01 * (i // 10) * 10))
    assert s(i) == pytest.approx(expect, rel=1e-12)
    assert s(i) == s((i // 10) * 10)  # held between updates


def test_counter_form_and_state_dict_resume():
    for make in (lambda: S.Linear(k=1.0, c=0.01, eps=0.1), lambda: S.Exponential(0.97),
                 lambda: S.InverseSigmoid(20.0), lambda: S.TemperatureSchedule(1.0, 0.05, 0.4, every=3),
                 lambda: S.Constant(0.7)):
        a = make()
        assert a.value == a(0)
        for _ in range(17):
            a.step()
        assert a.i == 17 and a.value == a(17)
        saved = a.state_dict()
        b = make()
        b.load_state_dict(saved)
        assert b.i == 17 and b.params() == a.params()
        assert [b.step() for _ in range(5)] == [a(i) for i in range(18, 23)]


def test_load_state_dict_restores_parameters():
    a = S.Linear(k=0.8, c=0.02, eps=0.1)
    a.step(5)
    b = S.Linear()  # default parameters: must be replaced by the saved ones
    b.load_state_dict(a.state_dict())
    assert b(10) == a(10) and b.i == 5
    with pytest.raises(ValueError, match="linear"):
        S.Exponential().load_state_dict(a.state_dict())


def test_factory():
    assert isinstance(S.make_ratio_schedule("linear", k=1.0, c=0.1), S.Linear)
    assert S.make_ratio_schedule("inverse_sigmoid", k=5)(3) == pytest.approx(5 / (5 + math.exp(0.6)))
    assert S.make_ratio_schedule("exponential", k=0.5)(2) == 0.25
    assert S.make_ratio_schedule("constant", value=0.5)(99) == 0.5
    with pytest.raises(ValueError, match="name"):
        S.make_ratio_schedule("cosine")
    with pytest.raises(ValueError, match="linear"):
        S.make_ratio_schedule("linear", slope=3)


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: S.Constant(1.5), "value"),
        (lambda: S.Linear(k=1.2), "k"),
        (lambda: S.Linear(c=-0.1), "c"),
        (lambda: S.Linear(eps=-0.1), "eps"),
        (lambda: S.Exponential(k=1.0), "k"),
        (lambda: S.Exponential(k=0.0), "k"),
        (lambda: S.InverseSigmoid(k=0.5), "k"),
        (lambda: S.InverseSigmoid(k=float("nan")), "k"),
        (lambda: S.TemperatureSchedule(tau0=0.0), "tau0"),
        (lambda: S.TemperatureSchedule(tau_min=-1.0), "tau_min"),
        (lambda: S.TemperatureSchedule(r=-1.0), "r"),
        (lambda: S.TemperatureSchedule(every=0), "every"),
        (lambda: S.Linear()(-1), "i"),
        (lambda: S.Linear().step(-2), "n"),
    ],
)
def test_bad_parameters(make, arg):
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        make()
