"""An example adapterdeck plugin: the ``orpo`` training objective (TRL's experimental ``ORPOTrainer``).

ORPO (odds ratio preference optimization, Hong et al., 2024) trains on preference pairs in one stage and with
no reference model: its loss is the cross-entropy on the preferred sequence plus ``beta`` (the paper's
lambda) times an odds-ratio term, ``-log sigmoid(log odds(preferred) - log odds(non-preferred))``, the odds
taken on each answer's mean per-token likelihood. It takes the same data as ``dpo`` (any format of the
``preferences`` kind, such as the built-in ``preference``).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from adapterdeck.core import hookimpl
from adapterdeck.core.formats import PREFERENCES
from adapterdeck.core.objectives import ObjectiveParams, TrainerParts, TrainingObjective
from adapterdeck.core.plugins import ObjectiveRegister
from adapterdeck.plugins.objectives import preference_trainer
from pydantic import Field

if TYPE_CHECKING:
    from transformers import Trainer


class OrpoParams(ObjectiveParams):
    """The parameters of ``orpo`` (``objective:`` in run.yaml)."""

    beta: float = Field(
        0.1,
        gt=0,
        description="the weight of the odds-ratio term against the supervised loss (the paper's lambda)",
    )


class Orpo(TrainingObjective):
    """Odds ratio preference optimization with TRL's ``ORPOTrainer`` (``trl.experimental.orpo``).

    No reference model is kept: only the adapter being trained is in the model. TRL's supervised term is
    the cross-entropy on the whole preferred sequence, prompt tokens included; the odds-ratio term compares
    the answers only.
    """

    name = "orpo"
    description = "odds ratio preference optimization on preference pairs, no reference model (TRL)"
    data_kinds = (PREFERENCES,)
    params = OrpoParams
    # ORPOTrainer's rewards are beta times each answer's mean per-token log-likelihood (no reference);
    # log_odds_ratio is the mean log sigmoid of log_odds_chosen, the preferred answer's log odds over the
    # other's; nll_loss is the supervised term.
    metrics = (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "nll_loss",
        "log_odds_ratio",
        "log_odds_chosen",
    )
    evaluators = ("preference_accuracy",)

    def build_trainer(self, parts: TrainerParts, params: ObjectiveParams) -> Trainer:
        from trl.import_utils import TRLExperimentalWarning

        with warnings.catch_warnings():
            # TRL's notice that its experimental API may change: this plugin is written against it.
            warnings.simplefilter("ignore", TRLExperimentalWarning)
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        assert isinstance(params, OrpoParams)  # adapterdeck validated the objective's keys with OrpoParams
        return preference_trainer(parts, ORPOTrainer, ORPOConfig, beta=params.beta)


@hookimpl
def register_objectives(register: ObjectiveRegister) -> None:
    register.add_objective(Orpo())
