"""The Cox partial likelihood: the loss of a prognosis head that predicts a risk instead of a class.

The paper evaluates prognosis (LUAD, HCC) as classes of outcome, which the classification heads cover. With
survival times and events (a datalist's ``time`` and ``event``), the standard deep-survival alternative
(DeepSurv, Katzman et al., 2018; the MIL survival models after it) is a scalar risk ``r_i`` per slide, the
log hazard ratio of a proportional-hazards model, trained by Cox's (1972) negative log partial likelihood

``L = -1/E sum_{i: event_i = 1} ( r_i - log sum_{j: t_j >= t_i} exp(r_j) )``

over the slides of a batch, ``E`` the number of observed events in it (Breslow's handling of tied times:
every slide whose time equals ``t_i`` is in ``i``'s risk set).
"""

from __future__ import annotations

import torch


def cox_partial_likelihood(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """The negative log Cox partial likelihood of ``risk`` ``(N,)`` for survival ``time`` ``(N,)`` and
    ``event`` ``(N,)`` (1 observed, 0 censored), averaged over the observed events; 0 (still part of the
    graph) when the batch holds no observed event, which carries no information on the ordering.
    """
    risk = risk.reshape(-1).float()
    time = time.reshape(-1).to(risk.device, torch.float32)
    observed = event.reshape(-1).to(risk.device) > 0
    if not observed.any():
        return risk.sum() * 0.0
    at_risk = time[None, :] >= time[:, None]  # row i: the slides still at risk at t_i
    log_risk_set = torch.logsumexp(risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
    return -(risk - log_risk_set)[observed].mean()
