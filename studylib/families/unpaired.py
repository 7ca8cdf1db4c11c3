"""The unpaired families: a row is (prompt, completion, label). DDRO, RDRO and BCO (``UnpairedFamily``); KTO, whose
``z0`` also reads prompts paired with other rows' completions (``UnpairedMismatchedFamily``).

- **Offline LM** (``studylib.lm.trainer``): a batch holds each row's sequence and label; reference log-probs
  precomputed or on the fly. KTO's rows are each given, once before training, another row's completion
  (``kl_completion_ids``: a seeded cycle through the rows, as TRL fixes its KL pairs), so the reference's log-probs
  of the mismatched pairs are precomputed with the rest; the policy's are taken without gradients.
- **On-policy LM**: none (the labels are the data set's).
- **Tables**: label counts; KTO's ``z0`` is the fixed point of fitting with it held (the toy), or the data set's
  mean mismatched log-probs passed as one row (the answer set).
"""

from __future__ import annotations

import torch
from torch import Tensor

from studylib.families.base import Family, Inputs, LogpsFn
from studylib.lm.batching import gather_rows, pad_sequences


class UnpairedFamily(Family):
    name = "unpaired"
    kind = "unpaired"
    row_keys = ("prompt_ids", "completion_ids", "label")
    policy_keys = ("policy_logps",)
    row_labels = (True, False)

    # --- the offline LM trainer ------------------------------------------------------------------------------------
    def data_size(self, data) -> int:
        return len(data.unpaired)

    def data_rows(self, data, tokenizer, data_config, pairs: list[dict] | None) -> tuple[list, dict]:
        from studylib.lm.data import tokenize_unpaired  # datasets: loaded only by the LM runs

        rows, counts = tokenize_unpaired(
            data.unpaired, tokenizer, data_config.max_length, data_config.max_prompt_length
        )
        return rows, {f"rows/{k}": v for k, v in counts.items()}

    def reference_completions(self, rows: list[dict]) -> dict[str, list]:
        return {"logps": [r["completion_ids"] for r in rows]}

    def attach_reference(self, rows: list[dict], scores: dict[str, Tensor]) -> list[dict]:
        return [{**r} | {f"ref_{name}": float(v[i]) for name, v in scores.items()} for i, r in enumerate(rows)]

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, Tensor]:
        batch = pad_sequences([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], pad_id)
        batch["labels_preferred"] = torch.tensor([bool(r["label"]) for r in rows])
        if "ref_logps" in rows[0]:
            batch["ref_logps"] = torch.tensor([r["ref_logps"] for r in rows])
        return batch

    def loss_inputs(self, loss, batch: dict, policy: LogpsFn, reference: LogpsFn) -> Inputs:
        logps = policy("")
        ref = reference("").to(logps) if loss.uses_reference else None
        logps, ref, labels = gather_rows(logps, ref, batch["labels_preferred"])
        return {"policy_logps": logps, "reference_logps": ref, "labels": labels}

    # --- the tables ------------------------------------------------------------------------------------------------
    def toy_fit(self, problem, counts, loss, ridge: float, rewards: Tensor | None) -> tuple:
        from studylib.toy import fit
        from studylib.toy.problems import label_counts

        return fit.fit_unpaired(problem, label_counts(problem, counts), loss, ridge)

    def table_inputs(self, policy: Tensor, reference: Tensor, labels: Tensor | None = None) -> Inputs:
        return {"policy_logps": policy, "reference_logps": reference, "labels": labels}

    def table_batch(self, policy: Tensor, reference: Tensor, x: Tensor, y: Tensor, labels: Tensor) -> Inputs:
        """The loss's inputs for a minibatch of rows ``(x, y, label)`` on (prompts x items) tables of log-probs."""
        return self.table_inputs(policy[x, y], reference[x, y], labels)

    def cell_rows(self, loss, data, log_ref: Tensor, rewards: Tensor | None) -> tuple:
        from studylib.lm_exact import cells

        rows = cells.unpaired_rows(data)
        extra = self._cell_extra(data, log_ref)

        def build(lp: Tensor, index: dict[str, Tensor]) -> Inputs:
            cell = index["cell"]
            return self.table_inputs(cells.take(lp, cell), cells.take(log_ref, cell), index["labels"]) | extra(lp)

        return rows, self.policy_keys, build

    def _cell_extra(self, data, log_ref: Tensor):
        return lambda lp: {}


class UnpairedMismatchedFamily(UnpairedFamily):
    name = "unpaired_mismatched"
    mismatched_pairs = True

    def prepare_rows(self, rows: list[dict], seed: int) -> list[dict]:
        """Copies of ``rows``, each with ``kl_completion_ids``: the completion of the next row in a seeded cycle
        (KTO's ``z0`` estimates ``KL(pi || pi_ref)`` on prompts paired with unrelated completions)."""
        if len(rows) < 2:
            raise ValueError("mismatched pairs (KTO's z0) need at least 2 training rows")
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        partner = {i: order[(k + 1) % len(order)] for k, i in enumerate(order)}
        return [{**r, "kl_completion_ids": rows[partner[i]]["completion_ids"]} for i, r in enumerate(rows)]

    def reference_completions(self, rows: list[dict]) -> dict[str, list]:
        return super().reference_completions(rows) | {"kl_logps": [r["kl_completion_ids"] for r in rows]}

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, Tensor]:
        batch = super().collate(rows, pad_id)
        kl = pad_sequences([r["prompt_ids"] for r in rows], [r["kl_completion_ids"] for r in rows], pad_id)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        if "ref_kl_logps" in rows[0]:
            batch["ref_kl_logps"] = torch.tensor([r["ref_kl_logps"] for r in rows])
        return batch

    def loss_inputs(self, loss, batch: dict, policy: LogpsFn, reference: LogpsFn) -> Inputs:
        logps = policy("")
        ref = reference("").to(logps)
        with torch.no_grad():
            kl_policy = policy("kl_")
        kl_reference = reference("kl_").to(logps)
        logps, ref, labels, kl_policy, kl_reference = gather_rows(
            logps, ref, batch["labels_preferred"], kl_policy, kl_reference
        )
        return {
            "policy_logps": logps,
            "reference_logps": ref,
            "labels": labels,
            "policy_kl_logps": kl_policy,
            "reference_kl_logps": kl_reference,
        }

    def table_batch(self, policy: Tensor, reference: Tensor, x: Tensor, y: Tensor, labels: Tensor) -> Inputs:
        """... plus the mismatched pairs: each prompt with the previous row's item (TRL's shift by one)."""
        shifted = torch.roll(y, 1)
        mismatched = {"policy_kl_logps": policy[x, shifted], "reference_kl_logps": reference[x, shifted]}
        return super().table_batch(policy, reference, x, y, labels) | mismatched

    def toy_fit(self, problem, counts, loss, ridge: float, rewards: Tensor | None) -> tuple:
        from studylib.toy import fit
        from studylib.toy.problems import label_counts

        return fit.fit_kto(problem, label_counts(problem, counts), loss, ridge)

    def _cell_extra(self, data, log_ref: Tensor):
        from studylib.lm_exact import cells

        return cells.mismatched_means(data, log_ref)
