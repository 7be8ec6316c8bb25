"""Teacher-forcing ratio schedules and temperature annealing (SPEC section 2).

Scheduled sampling (Bengio et al. 2015) lowers the teacher-forcing ratio as training step i grows:
    Constant        ratio = value
    Linear          ratio = max(eps, k - c * i)
    Exponential     ratio = k ** i                     (0 < k < 1)
    InverseSigmoid  ratio = k / (k + exp(i / k))       (k >= 1)
The Gumbel-softmax temperature is annealed piecewise-constantly, updated every N steps:
    TemperatureSchedule   tau = max(tau_min, tau0 * exp(-r * floor(i / N) * N))

Each schedule is a plain object: ``sched(i)`` gives the value at step i (a Python float), and the
counter form ``sched.step()`` / ``sched.value`` / ``sched.i`` tracks the step itself.
``state_dict()`` / ``load_state_dict()`` save and restore parameters and counter, so a resumed run
continues the schedule where it stopped. ``make_ratio_schedule(name, **params)`` builds one by name.
"""
from __future__ import annotations

import math
import numbers

__all__ = [
    "Schedule",
    "Constant",
    "Linear",
    "Exponential",
    "InverseSigmoid",
    "TemperatureSchedule",
    "RATIO_SCHEDULES",
    "make_ratio_schedule",
]


def _real(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def _step_index(i) -> float:
    if isinstance(i, bool) or not isinstance(i, numbers.Real) or not (float(i) >= 0) or math.isinf(float(i)):
        raise ValueError(f"i (the training step) must be a finite number >= 0, got {i!r}")
    return i


class Schedule:
    """Base class: subclasses set ``name``, ``_params`` (constructor arguments) and ``_value(i)``."""

    name = "schedule"

    def __init__(self):
        self.i = 0  # the counter of the step()/value form

    def _value(self, i) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, i) -> float:
        return float(self._value(_step_index(i)))

    @property
    def value(self) -> float:
        """The value at the current counter ``self.i``."""
        return self(self.i)

    def step(self, n: int = 1) -> float:
        """Advance the counter by ``n`` steps and return the new value."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        self.i += int(n)
        return self.value

    def params(self) -> dict:
        return dict(self._params)

    def state_dict(self) -> dict:
        return {"name": self.name, "params": self.params(), "i": self.i}

    def load_state_dict(self, state: dict) -> None:
        """Restore parameters and counter saved by ``state_dict`` (same schedule kind)."""
        if state.get("name") != self.name:
            raise ValueError(f"state is for schedule {state.get('name')!r}, not {self.name!r}")
        fresh = type(self)(**state["params"])  # validates the parameters
        self.__dict__.update(fresh.__dict__)
        self.i = int(_step_index(state["i"]))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"{type(self).__name__}({args}; i={self.i})"


class Constant(Schedule):
    """ratio = value (pure teacher forcing with value = 1)."""

    name = "constant"

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.value_ = _real("value", value, 0.0, 1.0)
        self._params = {"value": self.value_}

    def _value(self, i):
        return self.value_


class Linear(Schedule):
    """ratio = max(eps, k - c * i)."""

    name = "linear"

    def __init__(self, k: float = 1.0, c: float = 1e-4, eps: float = 0.0):
        super().__init__()
        self.k = _real("k", k, 0.0, 1.0)
        self.c = _real("c", c, 0.0)
        self.eps = _real("eps", eps, 0.0, 1.0)
        self._params = {"k": self.k, "c": self.c, "eps": self.eps}

    def _value(self, i):
        return max(self.eps, self.k - self.c * i)


class Exponential(Schedule):
    """ratio = k ** i, 0 < k < 1 (underflows gracefully to 0 for huge i)."""

    name = "exponential"

    def __init__(self, k: float = 0.9999):
        super().__init__()
        self.k = _real("k", k, 0.0, 1.0, lo_open=True, hi_open=True)
        self._params = {"k": self.k}

    def _value(self, i):
        return self.k ** i


class InverseSigmoid(Schedule):
    """ratio = k / (k + exp(i / k)), k >= 1.

    Written as sigmoid(-z) with z = i / k - log k, evaluated on the side where exp cannot overflow.
    """

    name = "inverse_sigmoid"

    def __init__(self, k: float = 1000.0):
        super().__init__()
        self.k = _real("k", k, 1.0)
        self._params = {"k": self.k}

    def _value(self, i):
        z = i / self.k - math.log(self.k)  # k / (k + e^{i/k}) = 1 / (1 + e^z)
        if z > 0:
            e = math.exp(-z)  # in (0, 1): no overflow
            return e / (1.0 + e)
        return 1.0 / (1.0 + math.exp(z))


class TemperatureSchedule(Schedule):
    """tau = max(tau_min, tau0 * exp(-r * floor(i / every) * every)): updated every ``every`` steps."""

    name = "temperature"

    def __init__(self, tau0: float = 1.0, r: float = 1e-4, tau_min: float = 0.5, every: int = 1):
        super().__init__()
        self.tau0 = _real("tau0", tau0, 0.0, lo_open=True)
        self.r = _real("r", r, 0.0)
        self.tau_min = _real("tau_min", tau_min, 0.0, lo_open=True)
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.every = int(every)
        self._params = {"tau0": self.tau0, "r": self.r, "tau_min": self.tau_min, "every": self.every}

    def _value(self, i):
        i_held = math.floor(i / self.every) * self.every  # piecewise constant between updates
        return max(self.tau_min, self.tau0 * math.exp(-self.r * i_held))  # exp(-x) underflows to 0: safe


RATIO_SCHEDULES = {
    "constant": Constant,
    "linear": Linear,
    "exponential": Exponential,
    "inverse_sigmoid": InverseSigmoid,
}


def make_ratio_schedule(name: str, **params) -> Schedule:
    """Build a teacher-forcing ratio schedule by name: "constant" | "linear" | "exponential" | "inverse_sigmoid"."""
    if name not in RATIO_SCHEDULES:
        raise ValueError(f"name must be one of {sorted(RATIO_SCHEDULES)}, got {name!r}")
    cls = RATIO_SCHEDULES[name]
    try:
        return cls(**params)
    except TypeError as e:  # an unknown keyword: say which ones are accepted
        import inspect

        accepted = [p for p in inspect.signature(cls).parameters]
        raise ValueError(f"{name} schedule accepts parameters {accepted}, got {sorted(params)} ({e})") from None
