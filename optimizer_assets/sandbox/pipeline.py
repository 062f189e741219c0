"""The HubSpot deal pipeline of the sandbox: stages and the paths deals take through them.

A deal's whole path (which stages it reaches, when, and whether it regresses once) is drawn
when the deal is created, as fixed-width arrays; what HubSpot shows at a moment is the last
step whose time has passed. That keeps the hourly simulation vectorized and makes chunked
``advance`` calls give the same history as one long one.
"""

from __future__ import annotations

import numpy as np

STAGE_LABELS = ("Lead", "Appointment scheduled", "Show up", "Closed won", "Closed lost")
STAGE_PROBABILITIES = ("0.1", "0.2", "0.6", "1.0", "0.0")
LEAD, APPOINTMENT, SHOW_UP, WON, LOST = range(5)
CLOSED = (WON, LOST)
SLOTS = 8  # fixed-width stage path per deal (see draw_deal_paths)
NO_STAGE = -1
HOUR_MS = 3_600_000

# Lags in hours as (gamma shape, scale): means 36 h to an appointment, 48 h to the visit,
# 40 h to the decision; with ~12 h from contact to deal a won deal closes ~6 days after the
# click. Stale leads are dropped after ~4 days, no-shows after ~3.
LAG_TO_APPOINTMENT = (2.0, 18.0)
LAG_STALE_LEAD = (3.0, 32.0)
LAG_TO_SHOW_UP = (3.0, 16.0)
LAG_NO_SHOW = (3.0, 24.0)
LAG_TO_CLOSE = (2.0, 20.0)
LAG_RECOVER = (2.0, 12.0)  # back to the stage a deal regressed from


def draw_deal_paths(
    rng: np.random.Generator, won_p: np.ndarray, t0_ms: np.ndarray, regress_share: float
) -> tuple[np.ndarray, np.ndarray]:
    """Whole stage paths of new deals: (stages int8, times int64 ms) of shape (m, SLOTS).

    Slots: 0 Lead | 1 Appointment scheduled (or Closed lost from Lead) | 2-3 optional regress
    to Lead and back | 4 Show up (or Closed lost: no-show) | 5-6 optional regress to
    Appointment scheduled and back | 7 Closed won / Closed lost. Unused slots hold NO_STAGE
    and the int64 maximum as time. Times strictly increase along the used slots.
    P(Closed won) = won_p: each of the three forward steps succeeds with cbrt(won_p).
    """
    m = len(won_p)
    step = np.cbrt(won_p)
    u = rng.random((m, 3))
    reach_appt = u[:, 0] < step
    reach_show = reach_appt & (u[:, 1] < step)
    won = reach_show & (u[:, 2] < step)
    reg = rng.random((m, 2)) < regress_share
    reg1 = reg[:, 0] & reach_appt  # Appointment -> Lead (rescheduling) -> Appointment
    reg2 = reg[:, 1] & reach_show & ~reg1  # Show up -> Appointment (mis-click) -> Show up
    hours = np.stack(
        [
            np.where(reach_appt, rng.gamma(*LAG_TO_APPOINTMENT, m), rng.gamma(*LAG_STALE_LEAD, m)),
            rng.uniform(6.0, 36.0, m),
            rng.gamma(*LAG_RECOVER, m),
            np.where(reach_show, rng.gamma(*LAG_TO_SHOW_UP, m), rng.gamma(*LAG_NO_SHOW, m)),
            rng.uniform(2.0, 24.0, m),
            rng.gamma(*LAG_RECOVER, m),
            rng.gamma(*LAG_TO_CLOSE, m),
        ],
        axis=1,
    )
    lag = (hours * HOUR_MS).astype(np.int64) + 1000  # at least a second between steps
    t1 = t0_ms + lag[:, 0]
    t1r = t1 + lag[:, 1]
    t1rr = t1r + lag[:, 2]
    t2 = np.where(reg1, t1rr, t1) + lag[:, 3]
    t2r = t2 + lag[:, 4]
    t2rr = t2r + lag[:, 5]
    t3 = np.where(reg2, t2rr, t2) + lag[:, 6]
    stages = np.full((m, SLOTS), NO_STAGE, dtype=np.int8)
    stages[:, 0] = LEAD
    stages[:, 1] = np.where(reach_appt, APPOINTMENT, LOST)
    stages[:, 2] = np.where(reg1, LEAD, NO_STAGE)
    stages[:, 3] = np.where(reg1, APPOINTMENT, NO_STAGE)
    stages[:, 4] = np.where(reach_show, SHOW_UP, np.where(reach_appt, LOST, NO_STAGE))
    stages[:, 5] = np.where(reg2, APPOINTMENT, NO_STAGE)
    stages[:, 6] = np.where(reg2, SHOW_UP, NO_STAGE)
    stages[:, 7] = np.where(reach_show, np.where(won, WON, LOST), NO_STAGE)
    times = np.stack([t0_ms, t1, t1r, t1rr, t2, t2r, t2rr, t3], axis=1)
    times = np.where(stages != NO_STAGE, times, np.iinfo(np.int64).max)
    return stages, times


def stage_at(stages: np.ndarray, times: np.ndarray, now_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """Slot index of each deal's current step at ``now_ms`` and of its final step."""
    slots = np.arange(stages.shape[1])
    used = stages != NO_STAGE
    current = np.where(used & (times <= now_ms), slots, -1).max(axis=1, initial=0)
    final = np.where(used, slots, -1).max(axis=1, initial=0)
    return current, final


def pipeline_objects(
    pipeline_ids: np.ndarray, stage_ids: np.ndarray, labels: np.ndarray, created: str
) -> list[dict]:
    """HubSpot pipeline objects as GET /crm/v3/pipelines/deals lists them (metadata strings)."""
    out = []
    for i, pipeline_id in enumerate(pipeline_ids):
        stages = [
            {
                "id": str(stage_ids[i, s]),
                "label": STAGE_LABELS[s],
                "displayOrder": s,
                "metadata": {
                    "probability": STAGE_PROBABILITIES[s],
                    "isClosed": "true" if s in CLOSED else "false",
                },
                "createdAt": created,
                "updatedAt": created,
                "archived": False,
            }
            for s in range(len(STAGE_LABELS))
        ]
        out.append(
            {
                "id": str(pipeline_id),
                "label": str(labels[i]),
                "displayOrder": i,
                "stages": stages,
                "createdAt": created,
                "updatedAt": created,
                "archived": False,
            }
        )
    return out
