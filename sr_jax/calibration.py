"""Post-hoc calibration per domain: a monotone map of each domain's logit, fitted on validation data, so that
probabilities can be used as probabilities (bids on pCTR x value, thresholds, blends of models).

    fitted = fit(logits, labels, domain, domain_names, method="platt")   # -> JSON-able dict (calibration.json)
    table = arrays(fitted, model_domains)                                # -> {"x", "y", "slope"} float32
    calibrated_logit = apply(table, logit, domain)                       # jnp: inside the model's predict

Every map is piecewise linear in the logit: knots `x` -> calibrated logits `y` per domain (linear between
knots), extended beyond the first and last knot with a slope of its own. Platt scaling (a temperature and a
bias, `y = a z + b`) is one knot at 0 (twice: every map has at least two) with slope a at both ends, so it and
the identity share one shape (no recompilation); isotonic regression (pool adjacent violators on up
to `BINS` equal-count bins of the sorted logits) is one knot per pooled block, flat beyond the ends. One form
means one `apply` for the trainer, batch scoring, the serving artifact and the torch conversion. A map is
non-decreasing per domain, so each domain's AUC and ranking metrics do not change (isotonic ties can only
merge scores).

A map that does not pay for its parameters on the rows it was fitted to (BIC) is replaced by the identity: a
model already calibrated keeps its probabilities rather than a fit's noise.

A domain with fewer than `min_clicks` clicks or non-clicks in the validation data uses the map fitted on all
domains' rows together (`pooled`, from POOLED_MIN_CLICKS of each); with fewer there as well, the identity.
Platt's bias is left all but free, so a fit matches the click rate of the rows it saw (`_platt`).

`rate` targets another click rate than the validation data's (negatives sampled at k per click, traffic at K),
one for every domain or one per domain (`click_rates` of the traffic: a surface's click rate moves with the
period, and the validation period's is not the served one's). Told only a rate, each domain's map is shifted by
logit(rate) - logit(its validation click rate), the prior correction p / (p + (1 - p) / w) with w the odds ratio
of the two rates. Given the traffic's rows as well (`traffic`: their raw logits and domains, no label), each
domain's map is shifted so that its mean calibrated probability over them is the rate: a period whose scores
moved (new queries scored lower) is matched in the mean too, where the prior correction assumes they did not.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sr_jax import metrics
from sr_jax.config import CALIBRATIONS
from sr_jax.io import atomic_file

FILE = "calibration.json"
POOLED_MIN_CLICKS = 5  # the pooled map is fitted from this many clicks and non-clicks (Platt's L2 pull holds it)
BINS, MIN_BIN = 200, 20  # isotonic: at most this many knots per domain, bins of at least this many rows
_EPS = 1e-4  # isotonic block rates are kept inside [eps, 1 - eps] (finite logits)
PULL = (1.0, 1e-3)  # Platt: the L2 weights pulling the slope toward 1 and the bias toward the rate-matching shift


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return np.log(p) - np.log1p(-p)


def _platt(z: np.ndarray, y: np.ndarray, steps: int = 100) -> dict:
    """Newton's method with backtracking on the log loss of sigmoid(a z + b), with an L2 pull of the slope
    toward 1 (weight PULL[0]: a domain with separable or few labels stays finite) and a faint one of the bias
    toward `_rate_shift` (PULL[1], for a Hessian that stays invertible). The fit then matches the click rate of
    the rows it saw whatever their number (the bias's equation, sum(p - y) = 0, all but holds): with a few clicks
    it moves the model's base rate (what a change of sampling or traffic moves most) and keeps its ranking and
    scale, where a pull of the bias toward 0 held a model trained at 1:4 near 1:4 on a 1:99 list."""
    centre, pull = np.array([1.0, _rate_shift(z, y.mean()) if 0 < y.sum() < len(y) else 0.0]), np.array(PULL)

    def loss(t: np.ndarray) -> float:
        s = t[0] * z + t[1]
        return float(np.sum(np.logaddexp(0.0, s) - y * s) + 0.5 * np.sum(pull * (t - centre) ** 2))

    theta = centre.copy()
    current = loss(theta)
    for _ in range(steps):
        p = metrics.probabilities(theta[0] * z + theta[1])
        w = p * (1 - p)
        g = np.array([np.sum((p - y) * z), np.sum(p - y)]) + pull * (theta - centre)
        h = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]]) + np.diag(pull)
        delta, t = np.linalg.solve(h, g), 1.0
        while t > 1e-8 and (trial := loss(theta - t * delta)) > current:
            t /= 2  # a full Newton step can overshoot where the logits are large
        if t <= 1e-8:
            break
        theta, current = theta - t * delta, trial
        if np.max(np.abs(t * delta)) < 1e-10:
            break
    a, b = float(theta[0]), float(theta[1])
    return {"x": [0.0, 0.0], "y": [b, b], "slope": [a, a]}  # one knot at 0: b + a z on either side, exactly


def _rate_shift(z: np.ndarray, rate: float) -> float:
    """The b for which the mean of sigmoid(z + b) over the logits `z` is `rate` in (0, 1) (bisection: the mean
    rises with b)."""
    low, high = -50.0, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if metrics.probabilities(z + mid).mean() < rate else (low, mid)
    return (low + high) / 2


def _isotonic(z: np.ndarray, y: np.ndarray) -> dict:
    """Pool adjacent violators over up to BINS equal-count bins (of at least MIN_BIN rows) of the sorted logits:
    knots at each pooled block's mean logit, its click rate (smoothed toward the domain's) as a logit; flat
    beyond the ends."""
    order = np.argsort(z, kind="stable")
    bins = np.array_split(order, max(1, min(BINS, len(z) // MIN_BIN)))
    # blocks: [sum of logits, clicks, examples]; merged while a block's rate is below its left neighbour's
    blocks: list[list[float]] = []
    for idx in bins:
        blocks.append([float(z[idx].sum()), float(y[idx].sum()), float(len(idx))])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] >= blocks[-1][1] / blocks[-1][2]:
            last = blocks.pop()
            blocks[-1] = [u + v for u, v in zip(blocks[-1], last)]
    block = np.array(blocks)
    prior = y.mean()  # each block's rate pulled toward the domain's by one example's weight: never exactly 0 or 1
    rate = np.maximum.accumulate(np.clip((block[:, 1] + prior) / (block[:, 2] + 1), _EPS, 1 - _EPS))
    return {"x": (block[:, 0] / block[:, 2]).tolist(), "y": _logit(rate).tolist(), "slope": [0.0, 0.0]}


IDENTITY = {"x": [0.0, 0.0], "y": [0.0, 0.0], "slope": [1.0, 1.0]}  # z exactly; the shape of a Platt map


def _fit_one(z: np.ndarray, y: np.ndarray, method: str) -> dict:
    """The method's map, or the identity where the map does not pay for its parameters on these rows (BIC:
    n times the gain in mean log loss must exceed half its parameter count times log n). A model whose
    probabilities are already calibrated keeps them, rather than take on a fit's noise."""
    fitted = _platt(z, y) if method == "platt" else _isotonic(z, y)
    params = 2 if method == "platt" else len(fitted["x"])  # isotonic: one level per pooled block
    gain = _loss(z, y, IDENTITY) - _loss(z, y, fitted)
    if len(z) * gain <= 0.5 * params * np.log(max(len(z), 2)):
        return {
            **IDENTITY,
            "kept_identity": f"the {method} fit gained {gain:.5f} log loss a row: less than its BIC cost",
        }
    return fitted


def _loss(z: np.ndarray, y: np.ndarray, m: dict) -> float:
    """Mean log loss of the map `m` on (z, y)."""
    return metrics.log_loss_from_logits(y, _mapped(z, m))


def _mapped(z: np.ndarray, m: dict) -> np.ndarray:
    """The map `m`'s calibrated logits of `z`, computed as `apply` computes them, in float64."""
    x, v = np.asarray(m["x"]), np.asarray(m["y"])
    return _piecewise(np, z, np.interp(z, x, v), x, v, m["slope"])


def fit(
    logits: np.ndarray,
    labels: np.ndarray,
    domain: np.ndarray,
    domain_names: list[str],
    method: str = "platt",
    min_clicks: int = 30,
    rate: float | dict[str, float] = 0.0,
    fitted_on: str = "",
    sampled: dict[str, int] | None = None,
    target: str = "",
    traffic: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """The calibration of `logits` [N] to `labels` [N] per domain (`domain` [N] indexes `domain_names`), as
    written to calibration.json: per domain its map, where it came from ("own", "pooled" or "identity") and the
    validation rows, clicks and click rate it saw, and (`sampled`: the dataset's record) how many negatives per
    click were sampled for it. `rate` > 0, or {domain: rate} (a domain not named keeps its validation rate):
    shifted to that click rate (module doc); `target` says where the rates came from. `traffic`: (raw logits [M],
    domain [M]) of the rows the rates are of; each domain with rows there is shifted to match its rate in the
    mean over them, the others by the prior correction."""
    if method not in CALIBRATIONS or method == "none":
        raise ValueError(f"calibration method {method!r}: expected 'platt' or 'isotonic'")
    rates = dict(rate) if isinstance(rate, dict) else {name: rate for name in domain_names}
    for name, r in rates.items():
        if not 0.0 <= r < 1.0:
            raise ValueError(f"calibration rate {r} ({name}): 0 (the validation data's own) or a rate in (0, 1)")
    z, y, d = np.asarray(logits, np.float64), np.asarray(labels, np.float64), np.asarray(domain)
    metrics.check_finite(z, "calibration: the validation logits")

    def enough(mask: np.ndarray, least: int) -> bool:
        clicks = y[mask].sum()
        return clicks >= least and mask.sum() - clicks >= least

    pooled_ok = enough(np.ones(len(y), bool), min(min_clicks, POOLED_MIN_CLICKS))
    pooled = {**_fit_one(z, y, method), "source": "own"} if pooled_ok else {**IDENTITY, "source": "identity"}
    pooled.update(examples=int(len(y)), clicks=int(y.sum()), ctr=float(y.mean()) if len(y) else None)
    domains = {}
    for k, name in enumerate(domain_names):
        mask = d == k
        own = enough(mask, min_clicks)
        entry = {**(_fit_one(z[mask], y[mask], method) if own else pooled), "source": "own" if own else "pooled"}
        if not own and pooled["source"] == "identity":
            entry["source"] = "identity"
        entry.update(examples=int(mask.sum()), clicks=int(y[mask].sum()))
        entry["ctr"] = float(y[mask].mean()) if own else pooled["ctr"]  # the click rate its map was fitted to
        if sampled and name in sampled:
            entry["sampled_negatives_per_click"] = sampled[name]
        if (r := rates.get(name, 0.0)) and entry["source"] != "identity":
            rows = None if traffic is None else np.asarray(traffic[0], np.float64)[np.asarray(traffic[1]) == k]
            if rows is not None and len(rows):
                entry["shift"] = _rate_shift(_mapped(rows, entry), r)
                entry["shifted_by"] = f"the mean over the traffic's {len(rows)} rows"
            else:
                entry["shift"] = float(_logit(r) - _logit(entry["ctr"]))
                entry["shifted_by"] = "the prior correction"
            entry["y"] = [v + entry["shift"] for v in entry["y"]]
        domains[name] = entry
    return {
        "method": method,
        "fitted_on": fitted_on,
        "min_clicks": min_clicks,
        "rate": rate or None,
        "target": target or (f"click rate {rate}" if rate else "the validation data's click rate per domain"),
        "domains": domains,
        "pooled": pooled,
    }


def click_rates(labels: np.ndarray, domain: np.ndarray, domain_names: list[str]) -> dict[str, float]:
    """{domain: click rate} of `labels` [N] in `domain` [N] (indexing `domain_names`): the rates a calibration can
    target. Only their means are read, never a row's label against its score. A domain with no rows, or with
    only clicks or only non-clicks, is left out (its map keeps its validation rate)."""
    y, d = np.asarray(labels, np.float64), np.asarray(domain)
    rates = {name: float(y[d == k].mean()) for k, name in enumerate(domain_names) if (d == k).any()}
    return {name: r for name, r in rates.items() if 0.0 < r < 1.0}


def arrays(fitted: dict | None, domain_names: list[str]) -> dict[str, np.ndarray]:
    """{"x", "y": [D, K], "slope": [D, 2]} float32 in the model's domain order (`domain_names`), knots padded
    to the longest map by repeating the last; a domain the fit never saw uses the pooled map; None: identity."""
    maps = [IDENTITY if fitted is None else fitted["domains"].get(n, fitted["pooled"]) for n in domain_names]
    k = max(len(m["x"]) for m in maps)
    pad = lambda v: list(v) + [v[-1]] * (k - len(v))  # noqa: E731
    return {
        "x": np.array([pad(m["x"]) for m in maps], np.float32),
        "y": np.array([pad(m["y"]) for m in maps], np.float32),
        "slope": np.array([m["slope"] for m in maps], np.float32),
    }


def apply(table: dict[str, jax.Array], logit: jax.Array, domain: jax.Array) -> jax.Array:
    """[B] calibrated logits of `logit` [B] float32 in domains `domain` [B] (`arrays`' table)."""
    x, y, slope = table["x"][domain], table["y"][domain], table["slope"][domain]  # [B, K], [B, K], [B, 2]
    return _piecewise(jnp, logit, jax.vmap(jnp.interp)(logit, x, y), x.T, y.T, slope.T)


def _piecewise(xp, z, inside, x, y, slope):  # noqa: ANN001 (numpy or jax.numpy alike)
    """The map at `z`: `inside` (the interpolation between the knots `x` -> `y`, along the first axis) within
    [x[0], x[-1]], else the end knot's value extended with that end's slope (`slope[0]` below, `slope[1]` above)."""
    below = y[0] + slope[0] * (z - x[0])
    above = y[-1] + slope[1] * (z - x[-1])
    return xp.where(z < x[0], below, xp.where(z > x[-1], above, inside))


def write(workdir: Path, fitted: dict) -> None:
    with atomic_file(Path(workdir) / FILE) as tmp:
        tmp.write_text(json.dumps(fitted, indent=2) + "\n")


def read(workdir: Path) -> dict | None:
    """A run's calibration.json; None where the run has none (not calibrated, or from before calibration)."""
    path = Path(workdir) / FILE
    if not path.exists():
        return None
    try:
        fitted = json.loads(path.read_text())
        arrays(fitted, list(fitted["domains"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: damaged calibration ({type(e).__name__}: {e})") from None
    return fitted


def summary(fitted: dict | None) -> str:
    """One line: what the probabilities are calibrated by and to."""
    if fitted is None:
        return "not calibrated: probabilities are sigmoid(logit)"
    own = sum(d["source"] == "own" for d in fitted["domains"].values())
    kept = sum("kept_identity" in d for d in fitted["domains"].values())
    return (
        f"{fitted['method']} per domain ({own} of {len(fitted['domains'])} domains their own, the others pooled; "
        f"{kept} kept as they were, the fit not paying for itself), "
        f"fitted on {fitted['fitted_on'] or 'validation data'}, to {fitted['target']}"
    )
