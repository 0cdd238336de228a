"""Flower's FedTrimmedAvg (Yin et al. 2018, arxiv.org/abs/1803.01498), warning when it trims nothing.

``beta`` is the fraction cut off each tail, per coordinate; ``int(beta * n)``
replies are cut, so with few replies a small ``beta`` cuts none and the round is
a plain unweighted mean with no robustness at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import FedTrimmedAvg


class TrimmedAvg(FedTrimmedAvg):
    """FedTrimmedAvg that logs a warning in every round where ``beta`` trims nothing.

    Args:
        beta: Fraction cut off each tail, in ``[0, 0.5)``; default 0.2 (Flower's).
    """

    def __init__(self, beta: float = 0.2) -> None:
        super().__init__(beta=beta)
        if beta == 0.0:
            log(WARNING, "FedTrimmedAvg with beta=0 trims nothing: every round is an unweighted mean")

    def warn_if_trims_nothing(self, server_round: int, n_replies: int) -> None:
        """Log a warning when ``int(beta * n_replies)`` is 0: the round is a plain mean."""
        if self.beta > 0 and n_replies and int(self.beta * n_replies) == 0:
            log(WARNING, "Round %d: FedTrimmedAvg beta=%g trims nothing from %d replies (it needs %d): "
                "this round is an unweighted mean", server_round, self.beta, n_replies,
                math.ceil(1 / self.beta))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's trimmed mean, after a warning when ``int(beta * len(replies))`` is 0."""
        replies = list(replies)
        self.warn_if_trims_nothing(server_round, len(replies))
        return super().aggregate_train(server_round, replies)
