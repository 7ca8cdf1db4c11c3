"""The claims ledger reads its verdicts off the tables: change a number and the verdict follows."""

from __future__ import annotations

import pandas as pd

from studylib.ledger import claims_ledger
from studylib.study import ROOT

RESULTS = ROOT / "results"


def tables() -> tuple[pd.DataFrame, ...]:
    return (
        pd.read_csv(RESULTS / "toy" / "t3_slopes.csv"),
        pd.read_csv(RESULTS / "toy" / "t4_seed_spread.csv"),
        pd.read_csv(RESULTS / "lm_exact" / "falls.csv"),
        pd.read_csv(RESULTS / "lm_exact" / "runs.csv"),
        pd.read_csv(RESULTS / "report" / "lm_methods.csv"),
    )


def test_the_committed_tables_give_the_committed_ledger():
    committed = pd.read_csv(RESULTS / "report" / "claims_ledger.csv")
    ledger = claims_ledger(*tables())
    assert list(ledger["verdict"]) == list(committed["verdict"])
    assert list(ledger["toy (notebooks 02-03)"]) == list(committed["toy (notebooks 02-03)"])


def test_a_verdict_follows_its_numbers():
    slopes, spread, falls, runs, lm = tables()
    base = claims_ledger(slopes, spread, falls, runs, lm).set_index("claim")["verdict"]
    rdro = base.index[base.index.str.startswith("RDRO (per-class")][0]
    assert base[rdro] == "supported"
    broken = falls.copy()
    per_class = broken["method"].str.startswith("RDRO per-class") & (broken["split"] == "heldout")
    broken.loc[per_class, "verdict"] = "fails"
    assert claims_ledger(slopes, spread, broken, runs, lm).set_index("claim")["verdict"][rdro] == "partly"
    flat_toy = slopes.copy()
    flat_toy.loc[flat_toy["method"] == "DDRO", ["slope", "kl_limit"]] = [0.1, 0.5]
    ddro = base.index[base.index.str.startswith("DDRO")][0]
    assert base[ddro] == "supported"  # the toy converges, the exact LM falls at DDRO's own rate

    def ddro_verdict(toy: pd.DataFrame, verdict: str) -> tuple[str, str]:
        changed = falls.copy()
        changed.loc[(changed["method"] == "DDRO") & (changed["setting"] == "S1"), "verdict"] = verdict
        row = claims_ledger(toy, spread, changed, runs, lm).set_index("claim").loc[ddro]
        return row["verdict"], row["why"]

    verdict, why = ddro_verdict(slopes, "fails")
    assert verdict == "partly" and "S1 DDRO falls with n" in why  # names the reading of the row that disagrees
    assert ddro_verdict(slopes, "undecided")[0] == "partly" and "straddles 3x" in ddro_verdict(slopes, "undecided")[1]
    assert ddro_verdict(flat_toy, "fails")[0] == "contradicted"


def test_the_sampled_lm_is_called_untested_only_when_no_interval_excludes_one_half():
    slopes, spread, falls, runs, lm = tables()
    straddling = lm.assign(win_rate_low=0.45, win_rate_high=0.55)  # every interval holds 0.5
    why = claims_ledger(slopes, spread, falls, runs, straddling)["why"]
    assert why.str.contains("the sampled LM cannot test it").any()
    separated = lm.assign(win_rate_low=0.55, win_rate_high=0.6)
    assert not claims_ledger(slopes, spread, falls, runs, separated)["why"].str.contains("cannot test").any()
