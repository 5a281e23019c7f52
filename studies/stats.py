"""The beyond-noise test: a rows x seeds additive model fitted by least squares, its gains tested together at a
family-wise 5% (a Dunnett-type many-to-one max-|t| test), and the test's calibration on simulated studies with no
real effect."""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats

from .rows import series_of

ALPHA = 0.05  # family-wise: the chance that a study with no real effect calls any of its rows beyond noise
TEST_NAME = "Dunnett-type many-to-one test (single-step max-|t|, family-wise 5%) on a rows x seeds additive model"

# Runs of one seed share their initial weights and batch order, and every row of a study is compared with the
# same reference runs: the gains of a study's rows are correlated, not independent tests. The model is
#   accuracy(row r, seed s) = row effect r + seed effect s + noise (independent, one variance),
# fitted by least squares over the runs a study has (any seeds missing). A row's gain is the difference of two
# row effects; its standard error comes from the fit's residual variance (df = runs - row effects - seed effects
# + 1), and the gains of one family are tested together: |t| beyond the 95% quantile of max |T| over the family,
# T multivariate t with the gains' own correlations (Dunnett's many-to-one test when every row has the same
# reference and all seeds). With no real effect, the chance that any row of the family is called is 5%.


def additive_fit(cells, n_series: int, n_seeds: int, contrasts, values) -> dict:
    """Least squares of values = series effect + seed effect + noise, and the contrasts' t statistics.

    cells: (N, 2) ints, each observation's (series, seed); contrasts: (R, 2) ints, (series, reference series);
    values: (B, N), B data sets of the same layout (one study; or many, for the simulation).
    Returns est, se, t: (B, R) (NaN where a contrast cannot be estimated or there is no residual df); df;
    sigma: (B,); estimable: (R,) bools; corr: the estimable contrasts' correlation matrix."""
    cells, contrasts = np.asarray(cells, dtype=int), np.asarray(contrasts, dtype=int).reshape(-1, 2)
    values = np.atleast_2d(np.asarray(values, dtype=float))
    n = len(cells)
    x = np.zeros((n, n_series + n_seeds - 1))
    x[np.arange(n), cells[:, 0]] = 1.0
    later = cells[:, 1] > 0  # seed 0's effect is folded into the series effects
    x[np.flatnonzero(later), n_series + cells[later, 1] - 1] = 1.0
    gram_inv = np.linalg.pinv(x.T @ x)
    rank = int(np.linalg.matrix_rank(x))
    df = n - rank
    lmat = np.zeros((len(contrasts), x.shape[1]))
    lmat[np.arange(len(contrasts)), contrasts[:, 0]] += 1.0
    lmat[np.arange(len(contrasts)), contrasts[:, 1]] -= 1.0
    # A contrast is estimable when it lies in the row space of x (e.g. not a row whose only seed the reference lacks
    # while no other row links the two seeds).
    cov = lmat @ gram_inv @ lmat.T  # the contrasts' covariance, in units of sigma^2
    estimable = np.all(np.abs(lmat @ gram_inv @ (x.T @ x) - lmat) < 1e-8, axis=1) & (np.diag(cov) > 1e-12)
    beta = values @ x @ gram_inv  # (B, p): pinv(x) applied to each data set
    resid = values - beta @ x.T
    sigma2 = (resid**2).sum(axis=1) / df if df > 0 else np.full(len(values), np.nan)
    var = np.where(estimable, np.diag(cov), np.nan)
    est = np.where(estimable, beta @ lmat.T, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(sigma2[:, None] * var[None, :])
        t = est / se
        sub = cov[np.ix_(estimable, estimable)]
        corr = sub / np.sqrt(np.outer(np.diag(sub), np.diag(sub)))
    return {
        "est": est,
        "se": se,
        "t": t,
        "df": df,
        "sigma": np.sqrt(sigma2),
        "estimable": estimable,
        "corr": corr,
        "runs": n,
    }


def max_abs_t_cdf(c: float, corr, df: int) -> float:
    """P(max_i |T_i| <= c) for T multivariate t with correlation `corr` and df degrees of freedom (scipy's
    randomised quasi-Monte Carlo integration, as scipy.stats.dunnett uses, with a fixed seed: the same answer
    every time)."""
    corr = np.atleast_2d(corr)
    k = len(corr)
    if k == 1:
        return float(2 * stats.t.cdf(c, df) - 1)
    upper = np.full(k, float(c))
    dist = stats.multivariate_t(shape=corr, df=df, allow_singular=True, seed=np.random.default_rng(0))
    return float(dist.cdf(upper, lower_limit=-upper))  # scipy's default: 1,000 points a dimension, error ~1e-4


def max_abs_t_quantile(corr, df: int, alpha: float = ALPHA) -> float:
    """c with P(max |T| > c) = alpha: the family-wise critical value of |t|."""
    k = len(np.atleast_2d(corr))
    low, high = stats.t.ppf(1 - alpha / 2, df), stats.t.ppf(1 - alpha / (2 * k), df)  # one test; Bonferroni
    if k == 1 or high - low < 1e-9:
        return float(low)
    f = lambda c: max_abs_t_cdf(c, corr, df) - (1 - alpha)
    if f(low) >= 0:
        return float(low)
    if f(high) <= 0:
        return float(high)
    return float(optimize.brentq(f, low, high, xtol=1e-4))


def family_test(contrasts: dict, series_values: dict, alpha: float = ALPHA):
    """Test one family of rows. contrasts: {row key: (series, reference series)}; series_values: {series:
    {seed: accuracy}}. Returns (family summary or None, {row key: verdict dict}) where a verdict holds t, se,
    the |gain| threshold, the adjusted p-value and beyond_noise (None where it cannot be judged)."""
    usable = {k: c for k, c in contrasts.items() if series_values.get(c[0]) and series_values.get(c[1])}
    if not usable:
        return None, {}
    series = list(dict.fromkeys(s for c in usable.values() for s in c))
    seeds = sorted({seed for s in series for seed in series_values[s]})
    cells = [(i, seeds.index(seed)) for i, s in enumerate(series) for seed in sorted(series_values[s])]
    values = [series_values[s][seed] for s in series for seed in sorted(series_values[s])]
    pairs = [(series.index(a), series.index(b)) for a, b in usable.values()]
    fit = additive_fit(cells, len(series), len(seeds), pairs, [values])
    family = {
        "rows": int(fit["estimable"].sum()),
        "runs": fit["runs"],
        "series": len(series),
        "seeds": seeds,
        "df": fit["df"],
        "sigma": None,
        "critical_t": None,
        "alpha": alpha,
    }
    verdicts = {
        k: {"beyond_noise": None, "t": None, "gain_se": None, "threshold": None, "p_adjusted": None} for k in usable
    }
    if fit["df"] <= 0 or not fit["estimable"].any():  # one seed each: nothing measures the noise yet
        return family, verdicts
    corr, df = fit["corr"], fit["df"]
    crit = max_abs_t_quantile(corr, df, alpha)
    family.update(sigma=float(fit["sigma"][0]), critical_t=crit)
    for j, key in enumerate(usable):
        if not fit["estimable"][j]:
            continue
        t, se = float(fit["t"][0, j]), float(fit["se"][0, j])
        p = None if math.isnan(t) else min(1.0, max(0.0, 1 - max_abs_t_cdf(abs(t), corr, df)))
        verdicts[key] = {
            "beyond_noise": bool(abs(t) > crit),
            "t": t if math.isfinite(t) else None,  # JSON
            "gain_se": se,
            "threshold": crit * se,
            "p_adjusted": p,
        }
    return family, verdicts


def study_layout(configs):
    """(number of series, contrasts as (series, reference) index pairs) of a study's training rows."""
    by_key = {c.key: c for c in configs}
    pairs = [series_of(c, by_key) for c in configs if c.script and c.reference]
    series = list(dict.fromkeys(s for pair in pairs for s in pair))
    return len(series), [(series.index(a), series.index(b)) for a, b in pairs]


def simulate(
    n_series: int, contrasts, n_seeds: int, studies: int, seed: int = 0, effects=None, alpha: float = ALPHA
) -> dict:
    """Draw `studies` complete studies (every series, every seed) of accuracy = effect + seed effect + noise,
    noise and seed effect both standard normal (the tests do not depend on either scale: the seed effect cancels
    in every gain), and count how often each rule calls each contrast beyond noise:
      per-row t (paired)   the rule this test replaced: each row's paired gains' variance, pooled over the rows
                           into one sigma (df = rows x (seeds - 1)), |mean gain| > t(1 - alpha/2, df) sigma /
                           sqrt(seeds), each row on its own
      per-row t (additive) the additive model's residual sigma, each row on its own at alpha
      max-|t| (additive)   the additive model, family-wise: the test the reports use
    `effects`: the series' true effects (default 0: no real effect). Returns rates per rule: per contrast, their
    mean (per-row) and the fraction of studies calling any contrast (any-row)."""
    rng = np.random.default_rng(seed)
    contrasts = np.asarray(contrasts, dtype=int).reshape(-1, 2)
    effects = np.zeros(n_series) if effects is None else np.asarray(effects, dtype=float)
    y = (
        effects[None, :, None]
        + rng.standard_normal((studies, 1, n_seeds))
        + rng.standard_normal((studies, n_series, n_seeds))
    )
    cells = [(i, s) for i in range(n_series) for s in range(n_seeds)]
    fit = additive_fit(cells, n_series, n_seeds, contrasts, y.reshape(studies, -1))
    df, crit = fit["df"], max_abs_t_quantile(fit["corr"], fit["df"], alpha)
    gains = y[:, contrasts[:, 0], :] - y[:, contrasts[:, 1], :]  # (studies, rows, seeds), paired by seed
    old_df = len(contrasts) * (n_seeds - 1)
    old_sigma = np.sqrt(gains.var(axis=2, ddof=1).mean(axis=1))
    old_threshold = stats.t.ppf(1 - alpha / 2, old_df) * old_sigma / math.sqrt(n_seeds)
    calls = {
        "per-row t (paired)": np.abs(gains.mean(axis=2)) > old_threshold[:, None],
        "per-row t (additive)": np.abs(fit["t"]) > stats.t.ppf(1 - alpha / 2, df),
        "max-|t| (additive)": np.abs(fit["t"]) > crit,
    }
    return {
        "studies": studies,
        "seed": seed,
        "rows": len(contrasts),
        "seeds": n_seeds,
        "df": df,
        "critical_t": crit,
        "alpha": alpha,
        "rules": {
            name: {
                "per_contrast": c.mean(axis=0).tolist(),
                "per_row": float(c.mean()),
                "any_row": float(c.any(axis=1).mean()),
            }
            for name, c in calls.items()
        },
    }


def print_simulation(study: str, sim: dict):
    n = sim["studies"]
    print(
        f"{n} simulated {study} studies with no real effect (simulation seed {sim['seed']}): {sim['rows']} "
        f"training rows against their references, {sim['seeds']} seeds, seed effect shared by every row; "
        f"additive model df {sim['df']}, family-wise critical |t| {sim['critical_t']:.3f}"
    )
    print(f"{'rule':<24} {'per-row rate':>14} {'any-row rate':>14}   (nominal {sim['alpha']:.0%})")
    for name, r in sim["rules"].items():
        err = math.sqrt(r["any_row"] * (1 - r["any_row"]) / n)  # binomial standard error of a fraction
        print(f"{name:<24} {r['per_row']:>14.4f} {r['any_row']:>8.4f} ± {err:.4f}")
