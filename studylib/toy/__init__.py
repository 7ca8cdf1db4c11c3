"""Exact tabular experiments: density against relative density ratios (T1, T2), consistency as data grow (T3),
stability under minibatch training (T4). See STUDY.md section 3.

>>> from studylib.toy import make_problem, consistency_sweep, fit_slopes
>>> df = consistency_sweep(make_problem("S1"), sizes=[2**k for k in range(6, 17)], seeds=range(10))
>>> fit_slopes(df)          # log-log slope of KL(target || fit) against n, per method

Every loss comes from ``studylib.losses``; this package supplies the tables, the data and the exact solver.
"""

from studylib.toy.fit import (
    fit_distill,
    fit_kto,
    fit_on_policy,
    fit_paired,
    fit_reward_model,
    fit_unpaired,
    newton,
    table_kl,
)
from studylib.toy.problems import (
    TabularProblem,
    borda,
    count_cells,
    expected_counts,
    forward_kl,
    label_counts,
    make_problem,
    make_s1,
    make_s2,
    make_s3,
    on_reference,
    sample_counts,
    sample_rows,
    unpaired_view,
)
from studylib.toy.shapes import density_ratio, loss_curves, ratio_curves, relative_density_ratio
from studylib.toy.stability import (
    seed_spread,
    stability_methods,
    stability_over_seeds,
    stability_run,
    stability_summary,
)
from studylib.toy.sweeps import (
    BETA_GRID,
    Method,
    consistency_sweep,
    default_methods,
    fit_method,
    fit_slopes,
    population_limits,
    summarise,
)

__all__ = [
    "BETA_GRID",
    "Method",
    "TabularProblem",
    "borda",
    "consistency_sweep",
    "count_cells",
    "default_methods",
    "density_ratio",
    "expected_counts",
    "fit_distill",
    "fit_kto",
    "fit_method",
    "fit_on_policy",
    "fit_paired",
    "fit_reward_model",
    "fit_slopes",
    "fit_unpaired",
    "forward_kl",
    "label_counts",
    "loss_curves",
    "make_problem",
    "make_s1",
    "make_s2",
    "make_s3",
    "newton",
    "on_reference",
    "population_limits",
    "ratio_curves",
    "relative_density_ratio",
    "sample_counts",
    "sample_rows",
    "seed_spread",
    "stability_methods",
    "stability_over_seeds",
    "stability_run",
    "stability_summary",
    "summarise",
    "table_kl",
    "unpaired_view",
]
