"""Request workloads for the simulator and the benchmarks.

Two independent pieces describe a workload:

* **lengths** -- ``sample_lengths(spec, n, rng)`` gives ``n`` (prompt_len, output_len) pairs, either
  replayed from the packaged ShareGPT lengths file or drawn from a synthetic distribution;
* **arrivals** -- ``arrival_times(spec, rate, n, rng)`` gives ``n`` sorted arrival times in seconds
  (Poisson, gamma with a chosen burstiness, or one burst at t = 0).

Length specs (``LENGTH_FORMS``)::

    sharegpt                    replay the ShareGPT rows (a random permutation, cycled if n > rows)
    sharegpt:train|sharegpt:test    the same, restricted to one side of the fixed split
    fixed:L                     every output has L tokens
    exp:MEAN                    exponential output lengths with mean MEAN
    lognormal:MEAN:SIGMA        log-normal output lengths with mean MEAN; SIGMA is the sigma of the
                                underlying normal (mu = ln(MEAN) - SIGMA**2 / 2)
    uniform:LO:HI               integers uniform on [LO, HI], both inclusive
    bimodal:SHORT:LONG:P_LONG   SHORT with probability 1 - P_LONG, LONG with probability P_LONG

Any length spec takes the suffix ``,max=N`` to clip output lengths at N (e.g. ``exp:200,max=2048``).
Synthetic specs give every prompt the same ``prompt_len``; continuous draws are rounded to the
nearest integer and raised to at least 1.

Arrival specs (``ARRIVAL_FORMS``)::

    poisson     exponential gaps with mean 1/rate (vLLM's default, burstiness 1)
    gamma:CV    gamma gaps with mean 1/rate and coefficient of variation CV; the gamma shape is
                1/CV**2, which is what vLLM calls ``burstiness`` (CV = 1 is Poisson, CV > 1 burstier)
    burst       every request at t = 0 (rate ignored); ``rate=inf`` does the same for any spec,
                like vLLM's ``--request-rate inf``

The ShareGPT lengths and their train/test split come from ``rankserve.learn.sharegpt``.
"""

from __future__ import annotations

import math

import numpy as np

from rankserve.learn.sharegpt import SPLITS, sharegpt_rows, sharegpt_table

__all__ = [
    "ARRIVAL_FORMS",
    "LENGTH_FORMS",
    "WorkloadSpecError",
    "arrival_times",
    "sample_lengths",
]

LENGTH_FORMS = (
    "sharegpt, sharegpt:train, sharegpt:test, fixed:L, exp:MEAN, lognormal:MEAN:SIGMA, "
    "uniform:LO:HI, bimodal:SHORT:LONG:P_LONG; optional suffix ,max=N"
)
ARRIVAL_FORMS = "poisson, gamma:CV, burst"



class WorkloadSpecError(ValueError):
    """A length or arrival spec (or the rate that goes with it) that cannot be used.

    The message names the spec and lists the valid forms.
    """


def _length_error(spec: object, reason: str) -> WorkloadSpecError:
    return WorkloadSpecError(f"invalid workload {spec!r}: {reason} (forms: {LENGTH_FORMS})")


def _arrival_error(spec: object, reason: str) -> WorkloadSpecError:
    return WorkloadSpecError(f"invalid arrival process {spec!r}: {reason} (forms: {ARRIVAL_FORMS})")


# --------------------------------------------------------------------------------------------
# Length specs
# --------------------------------------------------------------------------------------------


def _parse_number(spec: str, name: str, text: str, *, integer: bool) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise _length_error(spec, f"{name} must be {kind}, got {text!r}") from None
    if not math.isfinite(value):
        raise _length_error(spec, f"{name} must be finite, got {text!r}")
    return value


def _parse_length_spec(spec: str) -> tuple[str, tuple, int | None]:
    """(kind, params, cap) for a length spec, or WorkloadSpecError."""
    if not isinstance(spec, str) or not spec.strip():
        raise _length_error(spec, "expected a non-empty string")
    base, *options = [part.strip() for part in spec.strip().split(",")]
    cap: int | None = None
    for option in options:
        key, sep, value = option.partition("=")
        if key.strip() != "max" or not sep:
            raise _length_error(spec, f"unknown option {option!r}; the only option is max=N")
        if cap is not None:
            raise _length_error(spec, "max=N given twice")
        cap = int(_parse_number(spec, "max", value.strip(), integer=True))
        if cap < 1:
            raise _length_error(spec, "max must be >= 1")

    name, *args = base.split(":")
    arity = {"fixed": 1, "exp": 1, "lognormal": 2, "uniform": 2, "bimodal": 3}
    if name == "sharegpt":
        if len(args) > 1 or (args and args[0] not in SPLITS):
            raise _length_error(spec, "sharegpt takes no argument, or :train / :test")
        return name, (args[0] if args else None,), cap
    if name not in arity:
        raise _length_error(spec, f"unknown distribution {name!r}")
    if len(args) != arity[name]:
        raise _length_error(spec, f"{name} takes {arity[name]} argument(s), got {len(args)}")

    if name == "fixed":
        length = int(_parse_number(spec, "L", args[0], integer=True))
        if length < 1:
            raise _length_error(spec, "L must be >= 1")
        return name, (length,), cap
    if name == "exp":
        mean = _parse_number(spec, "MEAN", args[0], integer=False)
        if mean <= 0:
            raise _length_error(spec, "MEAN must be > 0")
        return name, (mean,), cap
    if name == "lognormal":
        mean = _parse_number(spec, "MEAN", args[0], integer=False)
        sigma = _parse_number(spec, "SIGMA", args[1], integer=False)
        if mean <= 0:
            raise _length_error(spec, "MEAN must be > 0")
        if sigma < 0:
            raise _length_error(spec, "SIGMA must be >= 0")
        return name, (mean, sigma), cap
    if name == "uniform":
        low = int(_parse_number(spec, "LO", args[0], integer=True))
        high = int(_parse_number(spec, "HI", args[1], integer=True))
        if low < 1:
            raise _length_error(spec, "LO must be >= 1")
        if high < low:
            raise _length_error(spec, "HI must be >= LO")
        return name, (low, high), cap
    # bimodal
    short = int(_parse_number(spec, "SHORT", args[0], integer=True))
    long_ = int(_parse_number(spec, "LONG", args[1], integer=True))
    p_long = _parse_number(spec, "P_LONG", args[2], integer=False)
    if short < 1 or long_ < 1:
        raise _length_error(spec, "SHORT and LONG must be >= 1")
    if not 0.0 <= p_long <= 1.0:
        raise _length_error(spec, "P_LONG must be in [0, 1]")
    return name, (short, long_, p_long), cap


def _check_count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return int(n)


def _round_lengths(values: np.ndarray) -> np.ndarray:
    return np.maximum(np.rint(values), 1).astype(np.int64)


def sample_lengths(spec: str, n: int, rng: np.random.Generator, prompt_len: int = 32) -> np.ndarray:
    """``n`` (prompt_len, output_len) pairs for the length ``spec``: int64, shape ``(n, 2)``, all >= 1.

    ``"sharegpt"`` (or ``"sharegpt:train"`` / ``"sharegpt:test"``) replays rows of the packaged
    file in the order of one random permutation, cycled when ``n`` exceeds the number of rows; it
    ignores ``prompt_len``. The synthetic forms (see the module docstring) draw output lengths and
    give every prompt ``prompt_len`` tokens. A ``,max=N`` suffix clips output lengths at N.
    Raises ``WorkloadSpecError`` for a spec it cannot use.
    """
    return sample_workload(spec, n, rng, prompt_len)[0]


def sample_workload(
    spec: str, n: int, rng: np.random.Generator, prompt_len: int = 32
) -> tuple[np.ndarray, np.ndarray | None]:
    """``sample_lengths`` plus, for ShareGPT specs, the row of each request (so that predictors
    that read prompt text can be handed the text); rows are None for synthetic specs."""
    kind, params, cap = _parse_length_spec(spec)
    n = _check_count(n)
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, (int, np.integer)) or prompt_len < 1:
        raise ValueError(f"prompt_len must be an integer >= 1, got {prompt_len!r}")

    rows = None
    if kind == "sharegpt":
        split_rows = sharegpt_rows(params[0])
        if len(split_rows) == 0:
            raise _length_error(spec, "the ShareGPT table is empty")
        rows = split_rows[np.resize(rng.permutation(len(split_rows)), n)]
        out = sharegpt_table()[1][rows].astype(np.int64, copy=True)
    else:
        if kind == "fixed":
            outputs = np.full(n, params[0], dtype=np.int64)
        elif kind == "exp":
            outputs = _round_lengths(rng.exponential(params[0], size=n))
        elif kind == "lognormal":
            mean, sigma = params
            outputs = _round_lengths(rng.lognormal(math.log(mean) - sigma**2 / 2.0, sigma, size=n))
        elif kind == "uniform":
            low, high = params
            outputs = rng.integers(low, high + 1, size=n, dtype=np.int64)
        else:  # bimodal
            short, long_, p_long = params
            outputs = np.where(rng.random(n) < p_long, long_, short).astype(np.int64)
        out = np.empty((n, 2), dtype=np.int64)
        out[:, 0] = int(prompt_len)
        out[:, 1] = outputs

    if cap is not None:
        np.minimum(out[:, 1], cap, out=out[:, 1])
    return out, rows


# --------------------------------------------------------------------------------------------
# Arrival specs
# --------------------------------------------------------------------------------------------


def _parse_arrival_spec(spec: str) -> tuple[str, float | None]:
    if not isinstance(spec, str) or not spec.strip():
        raise _arrival_error(spec, "expected a non-empty string")
    name, *args = spec.strip().split(":")
    if name in ("poisson", "burst"):
        if args:
            raise _arrival_error(spec, f"{name} takes no argument")
        return name, None
    if name != "gamma":
        raise _arrival_error(spec, f"unknown arrival process {name!r}")
    if len(args) != 1:
        raise _arrival_error(spec, f"gamma takes 1 argument (CV), got {len(args)}")
    try:
        cv = float(args[0])
    except ValueError:
        raise _arrival_error(spec, f"CV must be a number, got {args[0]!r}") from None
    if not math.isfinite(cv) or cv <= 0:
        raise _arrival_error(spec, "CV must be > 0 and finite")
    return name, cv


def arrival_times(spec: str, rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` sorted arrival times in seconds (float64) for the arrival ``spec`` at ``rate`` req/s.

    The first request arrives after the first inter-arrival gap (not at 0), except for bursts,
    where every time is 0. ``rate`` must be > 0; ``rate=inf`` (or the spec ``"burst"``, which
    ignores ``rate``) gives a burst. Raises ``WorkloadSpecError`` for a bad spec or rate.
    """
    kind, cv = _parse_arrival_spec(spec)
    n = _check_count(n)
    if kind == "burst":
        return np.zeros(n, dtype=np.float64)
    try:
        rate_f = float(rate)
    except (TypeError, ValueError):
        raise _arrival_error(spec, f"rate must be a number > 0 (or inf for a burst), got {rate!r}") from None
    if math.isinf(rate_f) and rate_f > 0:
        return np.zeros(n, dtype=np.float64)
    if not rate_f > 0:  # also catches nan
        raise _arrival_error(spec, f"rate must be > 0 (or inf for a burst), got {rate!r}")

    if kind == "poisson":
        gaps = rng.exponential(1.0 / rate_f, size=n)
    else:
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate_f * shape), size=n)
    return np.cumsum(gaps)
