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


def test_a_rate_claim_is_not_supported_when_a_slope_interval_excludes_minus_one():
    slopes, spread, falls, runs, lm = tables()
    ledger = claims_ledger(slopes, spread, falls, runs, lm).set_index("claim")
    rate = ledger.loc[ledger.index.str.contains("O\\(1/n\\)")].iloc[0]
    heldout = falls[(falls["setting"] == "S3") & (falls["split"] == "heldout")].set_index("method")
    assert (heldout.loc["distillation", "slope_high"] < -0.5) and heldout.loc["PMLE", "slope_low"] < -1  # as committed
    assert rate["verdict"] == "partly" and rate["verdict reads"] == "LM exact"
    distill = heldout.loc["distillation"]
    expected = f"distillation {distill['slope']:+.2f} [{distill['slope_low']:+.2f}, {distill['slope_high']:+.2f}]"
    assert "O(1/n) shown for PMLE only" in rate["why"] and expected in rate["why"]  # computed from the table
    consistent = ledger.loc[ledger.index.str.startswith("PMLE, distillation and reverse KL are consistent")].iloc[0]
    assert consistent["verdict"] == "supported"  # consistency and rate are separate claims
    steep = falls.copy()
    steep.loc[steep["setting"] == "S3", "slope_low"] = -1.2
    assert claims_ledger(slopes, spread, steep, runs, lm).set_index("claim").loc[rate.name, "verdict"] == "supported"
    flat = falls.copy()
    flat.loc[flat["setting"] == "S3", "slope_low"] = -0.9
    assert claims_ledger(slopes, spread, flat, runs, lm).set_index("claim").loc[rate.name, "verdict"] == "contradicted"


def test_the_sampled_lm_column_carries_the_distance_to_the_target_and_which_way_each_separates():
    slopes, spread, falls, runs, lm = tables()
    ledger = claims_ledger(slopes, spread, falls, runs, lm).set_index("claim")
    baselines = ledger.loc[ledger.index.str.startswith("DPO and KTO"), "sampled LM (notebooks 04-05)"].iloc[0]
    kto = lm[lm["method"] == "kto"].iloc[0]
    assert f"kto: KL(p+ || pi) {kto['kl_to_target']:.2f}" in baselines
    assert f"against the reference's {kto['reference_kl_to_target']:.2f}" in baselines
    assert "further from p+ than the reference" in baselines and "above the reference" in baselines
    paper3 = ledger.loc[ledger.index.str.startswith("PMLE, distillation and reverse KL are consistent")].iloc[0]
    assert "below the reference" in paper3["sampled LM (notebooks 04-05)"]  # PMLE's win rate lies below 0.5
    assert " separates" not in " ".join(ledger["sampled LM (notebooks 04-05)"])  # every separation says which way
    closer = lm.assign(kl_to_target_gain_low=0.1, kl_to_target_gain_high=0.3, win_rate_low=0.45, win_rate_high=0.55)
    text = claims_ledger(slopes, spread, falls, runs, closer).set_index("claim").loc[paper3.name]
    assert "closer to p+ than the reference" in text["sampled LM (notebooks 04-05)"]
    assert "not told from a tie" in text["sampled LM (notebooks 04-05)"]


def test_each_verdict_says_what_it_reads_and_the_sampled_lm_never_votes_where_it_is_not_read():
    slopes, spread, falls, runs, lm = tables()
    ledger = claims_ledger(slopes, spread, falls, runs, lm)
    for _, row in ledger.iterrows():
        if "sampled LM" not in row["verdict reads"] and row["sampled LM (notebooks 04-05)"] not in ("not run", ""):
            assert "reported, not voted" in row["why"] or "cannot test" in row["sampled LM (notebooks 04-05)"]
    # the consistency verdicts do not move with the sampled LM: it is reported, not voted
    moved = lm.assign(kl_to_target_gain_low=0.1, kl_to_target_gain_high=0.3, win_rate_low=0.55, win_rate_high=0.6)
    assert list(claims_ledger(slopes, spread, falls, runs, moved)["verdict"]) == list(ledger["verdict"])
