"""What a loss family is: the rows its losses train on, how they are batched, which forward passes a step runs and
which inputs reach the loss, in each place the study trains a loss.

A loss declares its family (``Loss.kind``, and ``mismatched_pairs`` for KTO's ``z0``); ``studylib.families.family_of``
finds the family object, and every trainer asks that object instead of testing the declaration:

- the run (``studylib.lm.experiment``): ``data_rows`` (the offline trainer's rows from a run's data set) and
  ``data_size`` (``lm.preferences.check_batches_fit``);
- the offline LM trainer (``studylib.lm.trainer``): ``check_rows``, ``prepare_rows``, ``reference_completions`` /
  ``attach_reference`` (reference log-probs computed once), ``collate`` and ``loss_inputs`` (the step's forward passes,
  gathered over processes);
- the on-policy LM trainer (``studylib.lm.online``): ``check_rows`` (for data-set pairs), ``sampled_inputs`` (a step
  on completions sampled from the policy) and ``pair_inputs`` (a step on the data set's pairs, with a KL term);
- the run's routing and checks (``studylib.lm.experiment.plan_training``, ``studylib.lm.config``,
  ``Loss.samples_policy``): the class attributes below;
- the tables (the toy's exact fits and stability runs, ``studylib.toy``; the answer-set study,
  ``studylib.lm_exact``): ``toy_fit``, ``needs_reward_table``, ``table_inputs``, ``table_batch`` and ``cell_rows``.

Adding a family is one subclass here and one entry in ``studylib.families.FAMILIES`` (docs/DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from studylib.lm.online import OnlineTrainer
    from studylib.losses import Loss

LogpsFn = Callable[[str], Tensor]
"""``logps(prefix)``: one log-prob per sequence of the batch's ``<prefix>input_ids`` ... columns."""
Inputs = dict[str, Tensor]


class Family:
    """Base of the loss families. A subclass says what its losses need; a method it does not override raises,
    naming the family and what it cannot do."""

    name: ClassVar[str]
    kind: ClassVar[str]  # the losses' ``Loss.kind`` this family serves
    mismatched_pairs: ClassVar[bool] = False  # ... and their ``Loss.mismatched_pairs``
    row_keys: ClassVar[tuple[str, ...]] = ()  # what an offline training row carries (empty: no offline rows)
    policy_keys: ClassVar[tuple[str, ...]] = ()  # the loss inputs that are the policy's log-probs
    row_labels: ClassVar[tuple[bool | None, ...]] = ()  # the labels a row carries (None: a pair, no label)
    samples_prompts: ClassVar[bool] = False  # a step samples completions of prompts from the policy
    min_samples_per_prompt: ClassVar[int] = 1  # samples of each prompt a sampled step needs
    uses_pairs: ClassVar[bool] = False  # trains on the data set's pairs (a reward model needs them in any family)

    @classmethod
    def serves(cls, loss: Loss) -> bool:
        """Whether ``loss`` belongs to this family (its declarations match)."""
        return loss.kind == cls.kind and bool(loss.mismatched_pairs) == cls.mismatched_pairs

    def _cannot(self, what: str) -> NotImplementedError:
        return NotImplementedError(f"the {self.name} family has no {what}")

    # --- the offline LM trainer ------------------------------------------------------------------------------------
    def data_size(self, data: Any) -> int:
        """How many training rows of this family a run's data set (``lm.preferences.PreferenceData``) holds."""
        raise self._cannot("offline rows")

    def data_rows(self, data: Any, tokenizer: Any, data_config: Any, pairs: list[dict] | None) -> tuple[list, dict]:
        """The offline trainer's rows from a run's data set, and what tokenising them dropped (for the record);
        ``pairs``: the data set's pairs, tokenised (with reward margins where the loss needs them), or None."""
        raise self._cannot("offline rows")

    def check_rows(self, rows: list[dict], loss: Loss) -> None:
        """Raise, naming what is missing, unless ``rows`` are what this family's offline step needs for ``loss``."""
        if not self.row_keys:
            raise ValueError(f"{loss!r} samples from the policy: train it with studylib.lm.online")
        if not rows:
            raise ValueError("no training rows")
        missing = [k for k in self.row_keys if k not in rows[0]]
        if missing:
            raise ValueError(f"loss {loss.name!r} needs {self.kind} rows; the rows lack {missing}")

    def prepare_rows(self, rows: list[dict], seed: int) -> list[dict]:
        """The rows as training uses them (KTO: each given another row's completion, once, before training)."""
        return rows

    def reference_completions(self, rows: list[dict]) -> dict[str, list]:
        """The completions whose reference log-probs are computed once before training, by name."""
        raise self._cannot("offline rows")

    def attach_reference(self, rows: list[dict], scores: dict[str, Tensor]) -> list[dict]:
        """Copies of ``rows`` carrying ``scores`` (named as ``reference_completions``) where ``collate`` reads them."""
        raise self._cannot("offline rows")

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, Tensor]:
        """One padded batch of rows: the sequences of every forward pass, and any precomputed values."""
        raise self._cannot("offline rows")

    def loss_inputs(self, loss: Loss, batch: dict, policy: LogpsFn, reference: LogpsFn) -> Inputs:
        """The loss's keyword inputs for ``batch``: the policy's log-probs (with gradients) and the reference's, from
        ``policy(prefix)`` and ``reference(prefix)``, gathered over processes (``batching.gather_rows``)."""
        raise self._cannot("offline rows")

    # --- the on-policy LM trainer ----------------------------------------------------------------------------------
    def sampled_inputs(self, trainer: OnlineTrainer, seed: int) -> tuple[Inputs, dict[str, Tensor], list]:
        """A step on completions sampled from the current policy: the loss's inputs, extra metrics, the samples."""
        raise self._cannot("step on samples of the policy")

    def pair_inputs(self, trainer: OnlineTrainer, seed: int) -> tuple[Inputs, dict[str, Tensor], list]:
        """A step on the data set's pairs, with policy samples for a KL term: the loss's inputs, metrics, samples."""
        raise self._cannot("step on data-set pairs")

    # --- the tables (toy, answer set) ------------------------------------------------------------------------------
    def toy_fit(self, problem: Any, counts: Any, loss: Loss, ridge: float, rewards: Tensor | None) -> tuple:
        """The toy's exact fit of ``loss`` on stacked data sets ``counts``: ``(log pi, solver info)``."""
        raise self._cannot("toy fit")

    def needs_reward_table(self, loss: Loss) -> bool:
        """Whether a tabular fit of ``loss`` reads the reward model's table."""
        return loss.needs_reward_model

    def table_inputs(self, policy: Tensor, reference: Tensor, labels: Tensor | None = None) -> Inputs:
        """The loss's inputs for rows whose policy log-prob (paired: margin) is ``policy`` and reference's is
        ``reference`` (``labels``: unpaired rows' labels): how the tables put a row to a loss."""
        raise self._cannot("table rows")

    def table_batch(self, policy: Tensor, reference: Tensor, x: Tensor, y: Tensor, labels: Tensor) -> Inputs:
        """The loss's inputs for a minibatch of labelled rows ``(x, y, label)`` on tables of log-probs (the toy's
        stability runs)."""
        raise self._cannot("labelled table rows")

    def cell_rows(self, loss: Loss, data: Any, log_ref: Tensor, rewards: Tensor | None) -> tuple:
        """The answer-set study's rows of ``data`` (``lm_exact.cells``): ``(rows, policy keys, build)``, ``build(log
        pi, index)`` giving the loss's inputs; or ``None`` where the loss has its own exact objective."""
        raise self._cannot("answer-set rows")
