"""The pilot that chooses the study's training length and learning rate (``studies/pilot.yaml``), read from its runs.

Each pilot run trains at a constant rate and is measured every epoch on fixed validation and training prompts
(``studylib.lm.curves``); ``pilot_table`` turns those points into one row per (learning rate, method, epochs),
``chosen_training`` applies the rule the profile states, and ``pilot_verdict`` says whether any setting moved a
method beyond its interval, and on which prompts.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

PREFIX = "curve/"
TIE_NATS = 0.01
"""Settings whose mean validation KL to the target lies within this of the lowest count as tied (fewer epochs win)."""


def pilot_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (learning rate, method, epochs) from each run's curve points (``curves.csv``): validation
    approval and its gain over the reference's samples, ``KL(p+ || pi)`` and its gain over the reference's (positive:
    closer), each with its 95% interval over the prompts, and the same on training prompts."""
    rows = []
    for _, run in runs.iterrows():
        curves = pd.read_csv(Path(run["run_dir"]) / "curves.csv", comment="#")
        points = curves.dropna(subset=[f"{PREFIX}approval"]) if f"{PREFIX}approval" in curves else curves.iloc[:0]
        if points.empty:
            raise ValueError(f"{run['run_dir']}/curves.csv has no curve points: the pilot runs need curve_every > 0")
        training = run["training"]
        for _, point in points.iterrows():
            measured = {k.removeprefix(PREFIX): v for k, v in point.items() if k.startswith(PREFIX)}
            epochs = point["step"] * training["rows_per_step"] / training["training_rows"]
            rows.append(
                {"learning_rate": run["learning_rate"], "method": run["loss"], "epochs": round(epochs, 3),
                 "step": int(point["step"]), **measured, "seed": run["seed"]}
            )  # fmt: skip
    return pd.DataFrame(rows).sort_values(["learning_rate", "method", "epochs"]).reset_index(drop=True)


def chosen_training(table: pd.DataFrame, tie: float = TIE_NATS) -> tuple[float, float, str]:
    """The pilot's rule: the (learning rate, epochs) with the lowest validation ``KL(p+ || pi)`` averaged over the
    pilot's methods, among the settings every method ran; within ``tie`` nats of it, the fewest epochs. Returns the
    rate, the epochs and the sentence that says why, with every setting's numbers."""
    by_setting = table.groupby(["learning_rate", "epochs"])[["kl_to_target", "approval", "train_approval"]].mean()
    methods = table.groupby(["learning_rate", "epochs"])["method"].nunique()
    complete = by_setting[methods == table["method"].nunique()]  # a mean over fewer methods is not comparable
    if complete.empty:
        raise ValueError("no pilot setting has a run of every method")
    best = complete["kl_to_target"].min()
    tied = complete[complete["kl_to_target"] <= best + tie].reset_index()
    chosen = tied.sort_values(["epochs", "kl_to_target"]).iloc[0]
    shown = "; ".join(
        f"lr {rate:g}, {epochs:g} epoch(s): KL to target {row.kl_to_target:.3f}, approval {row.approval:.3f} "
        f"(training prompts {row.train_approval:.3f})"
        + ("" if (rate, epochs) in complete.index else " (not every method)")
        for (rate, epochs), row in by_setting.iterrows()
    )
    reference = table["reference_kl_to_target"].mean()
    why = (
        f"Mean over the pilot's methods, per setting: {shown}. The reference's KL to the target on these prompts: "
        f"{reference:.3f}. Chosen: lr {chosen.learning_rate:g}, {chosen.epochs:g} epoch(s)."
    )
    return float(chosen.learning_rate), float(chosen.epochs), why


def _moved(row, prefix: str = "") -> list[str]:
    """What a row's intervals show on these prompts: approval up or down, closer to or further from ``p+``."""
    said = []
    approval, kl = f"{prefix}approval_gain", f"{prefix}kl_to_target_gain"
    if row[f"{approval}_low"] > 0 or row[f"{approval}_high"] < 0:
        said.append("approval " + ("up" if row[f"{approval}_low"] > 0 else "down"))
    if row[f"{kl}_low"] > 0 or row[f"{kl}_high"] < 0:
        said.append(("closer to" if row[f"{kl}_low"] > 0 else "further from") + " the target")
    return said


def pilot_verdict(table: pd.DataFrame) -> str:
    """Which settings moved a method beyond its interval (approval gain, or ``KL(p+ || pi)`` gain, excluding zero),
    and which way, on the validation prompts and on the training prompts: the reading the pilot's rule asks for."""
    lines = []
    for prefix, where in (("", "validation"), ("train_", "training")):
        moved = [
            f"{row.method} at lr {row.learning_rate:g}, {row.epochs:g} epoch(s): {', '.join(said)}"
            for row in table.itertuples()
            if (said := _moved(row._asdict(), prefix))
        ]
        lines.append(f"On the {where} prompts, moved beyond the 95% interval: {'; '.join(moved) or 'nothing'}.")
    return " ".join(lines)


def pilot_memorisation(runs: pd.DataFrame) -> pd.DataFrame | None:
    """The pilot runs' seen/fresh log-ratio tables (``memorisation.csv`` in each run folder), gathered; None if none."""
    found = [Path(d) / "memorisation.csv" for d in runs["run_dir"] if (Path(d) / "memorisation.csv").is_file()]
    return pd.concat([pd.read_csv(f) for f in found], ignore_index=True) if found else None


CONTROL = {"lora_r": 16, "completions_per_prompt": 4}
"""The memorisation study's control (``studies/memorisation.yaml``): the pilot's adapter and data."""


def _gap(memorisation: pd.DataFrame, kind: str, name: str) -> dict[str, float]:
    """``<name>_gap`` with its interval ends: the approved-minus-rejected row of ``kind`` in a seen/fresh table."""
    from studylib.lm.memorisation import gap_label

    row = memorisation[memorisation["completions"] == gap_label(kind)]
    if row.empty:
        return {f"{name}_gap{k}": float("nan") for k in ("", "_low", "_high")}
    row = row.iloc[0]
    return {f"{name}_gap": row["log_ratio"], f"{name}_gap_low": row["log_ratio_low"],
            f"{name}_gap_high": row["log_ratio_high"]}  # fmt: skip


def memorisation_table(runs: pd.DataFrame, control: dict = CONTROL, seed: int = 0) -> pd.DataFrame:
    """One row per run of the memorisation study: its adapter rank and completions per prompt, the rows it trained
    on and its epochs; on the validation prompts, ``KL(p+ || pi)``, its gain over the reference's (positive: closer
    to the target, paired by prompt, from the run's record) and the approval gain with their intervals, and
    the KL's difference from the control's, paired prompt by prompt (negative: closer to the target than the
    control); on training prompts, the approved-minus-rejected log-ratio gap of the completions it saw and of fresh
    reference samples (``memorisation.csv``, ``python -m studylib.lm.memorisation``)."""
    from studylib.lm.memorisation import FRESH, SEEN
    from studylib.lm.stats import paired_difference_interval
    from studylib.report import per_prompt_values

    is_control = (runs["lora_r"] == control["lora_r"]) & (
        runs["completions_per_prompt"] == control["completions_per_prompt"]
    )
    if is_control.sum() != 1:
        raise ValueError(f"the memorisation study needs exactly one control run ({control}), found {is_control.sum()}")
    kl = per_prompt_values(runs, "kl_to_target")
    control_kl = kl[runs.loc[is_control, "run"].iloc[0]]
    rows = []
    for index, run in runs.iterrows():
        both = pd.concat([kl[run["run"]], control_kl], axis=1).dropna()
        difference, low, high = paired_difference_interval(both.iloc[:, 0], both.iloc[:, 1], seed=seed)
        table = Path(run["run_dir"]) / "memorisation.csv"
        memorisation = pd.read_csv(table) if table.is_file() else pd.DataFrame({"completions": []})
        rows.append(
            {"lora_r": run["lora_r"], "completions_per_prompt": run["completions_per_prompt"],
             "training_rows": run["training"]["training_rows"], "steps": run["steps"], "epochs": run["epochs"],
             **{k: run[k] for k in ("kl_to_target", "kl_to_target_low", "kl_to_target_high",
                                    "reference_kl_to_target", "kl_to_target_gain", "kl_to_target_gain_low",
                                    "kl_to_target_gain_high", "approval_gain", "approval_gain_low",
                                    "approval_gain_high")},
             "kl_minus_control": difference, "kl_minus_control_low": low, "kl_minus_control_high": high,
             **_gap(memorisation, SEEN, "seen"), **_gap(memorisation, FRESH, "fresh"),
             "control": bool(is_control[index]),
             "seed": run["seed"], "run": run["run"]}
        )  # fmt: skip
    return pd.DataFrame(rows).sort_values(["control", "lora_r", "completions_per_prompt"], ascending=False)


def memorisation_verdict(table: pd.DataFrame) -> str:
    """The memorisation study's rule (``studies/memorisation.yaml``): a change cures the memorisation when its
    validation ``KL(p+ || pi)`` lies below the control's beyond the paired interval and its fresh approved
    completions' log-ratio lies above its fresh rejected ones' beyond the interval."""
    said = []
    for row in table[~table["control"]].itertuples():
        closer = row.kl_minus_control_high < 0
        separates = row.fresh_gap_low > 0
        what = f"r {row.lora_r:g}, {row.completions_per_prompt:g} completions a prompt"
        said.append(
            f"{what}: KL(p+ ‖ π) minus the control's {row.kl_minus_control:+.3f} [{row.kl_minus_control_low:+.3f}, "
            f"{row.kl_minus_control_high:+.3f}] ({'closer' if closer else 'not closer'}), fresh approved minus "
            f"rejected {row.fresh_gap:+.3f} [{row.fresh_gap_low:+.3f}, {row.fresh_gap_high:+.3f}] "
            f"({'separates' if separates else 'does not separate'}): {'a cure' if closer and separates else 'no cure'}"
        )
    return "; ".join(said) + (". " if said else "") + cure_count(table)


def cure_count(table: pd.DataFrame) -> str:
    """The memorisation study's verdict in one sentence: how many of its changes cure by its rule."""
    changes = table[~table["control"]]
    cured = int(((changes["kl_minus_control_high"] < 0) & (changes["fresh_gap_low"] > 0)).sum())
    return f"Cured by {cured} of {len(changes)} changes." if cured else "No change cures the memorisation."


def memorisation_against_reference(table: pd.DataFrame) -> str:
    """Per run of the memorisation study (``memorisation_table``), control included: whether it ended closer to
    ``p+`` than the reference, by the 95% interval of its ``KL(p+ || pi)`` gain over the reference's (paired by
    prompt): above 0 closer, below 0 further, else not told apart. Markdown lines."""
    lines = []
    for row in table.itertuples():
        low, high = row.kl_to_target_gain_low, row.kl_to_target_gain_high
        where = "closer to p+ than the reference" if low > 0 else "further from p+ than the reference" if high < 0 \
            else "not told from the reference"  # fmt: skip
        what = f"r {row.lora_r:g}, {row.completions_per_prompt:g} completions a prompt" + (
            " (the control)" if row.control else ""
        )
        lines.append(
            f"- {what}: KL(p+ ‖ π) {row.kl_to_target:.3f} against the reference's {row.reference_kl_to_target:.3f}, "
            f"gain {row.kl_to_target_gain:+.3f} [{low:+.3f}, {high:+.3f}]: {where}"
        )
    return "\n".join(lines)


def memorisation_conclusion(cures: pd.DataFrame) -> str:
    """The memorisation study's part of notebook 05's conclusion (``report.conclusion``): its verdict by its rule
    and where each run ended against the reference, from ``memorisation_table``."""
    return (
        f"**The memorisation study**, by its rule (above): {cure_count(cures)} Where each run ended against the "
        "reference:\n\n" + memorisation_against_reference(cures)
    )
