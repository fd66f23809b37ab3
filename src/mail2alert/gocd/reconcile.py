"""Reconciliation: the alert of a stage run whose mail never came, made from GoCD's API.

GoCD makes one attempt to send each stage mail: a refused connection, a ``4xx`` or a timeout
and the alert is gone (and GoCD 25.4 sent none at all). So each poll the keeper reads the
latest completed run of every stage from cctray.xml; a run that completed after the
*baseline* (the first time this GoCD was read, kept in the outbox's notes so that a restart
knows what happened while mail2alert was down), at most ``reconcile-window`` ago and at
least ``reconcile-after`` ago, and for which no mail came (the ``gocd_runs`` note a stage
mail leaves, see :mod:`mail2alert.gocd.memory`), is looked up in its stage history and
made into the mail GoCD would have sent. The core routes that mail as one that arrived:
same rules, same event correction, same de-duplication claim (so a real mail that arrives
late is delivered once, either way), same threads.

Everything here is pure; :class:`~mail2alert.gocd.poller.GroupPoller` does the I/O.
"""

from __future__ import annotations

import email.utils
import quopri
from collections.abc import Callable, Iterable

from mail2alert.gocd.memory import HISTORY, RUNS
from mail2alert.gocd.model import CCTRAY_SOURCE, StageRun
from mail2alert.managers.memory import RECOVERED_HEADER, Key

#: Where the baseline is kept: by GoCD's URL, the time it was first read (seconds).
BASELINE = "gocd_reconcile"
#: The value of :data:`~mail2alert.managers.memory.RECOVERED_HEADER`: where the facts came
#: from.
SOURCE = "gocd-api"

Recall = Callable[[str, Key], str | None]


def _counters(value: str | None) -> tuple[int, int] | None:
    """``"6/1"`` as (6, 1); None for anything else."""
    if value is None:
        return None
    pc, _, sc = value.partition("/")
    if not (pc.isdigit() and sc.isdigit()):
        return None
    return int(pc), int(sc)


def mailed(run: StageRun, recall: Recall) -> bool:
    """Whether a mail came for ``run`` (or for a later run of its stage)."""
    last = _counters(recall(RUNS, (run.pipeline.lower(), run.stage.lower())))
    return last is not None and last >= (run.pipeline_counter, run.stage_counter)


def due(
    runs: Iterable[StageRun],
    recall: Recall,
    *,
    baseline: float,
    now: float,
    after: float,
    window: float,
) -> list[StageRun]:
    """The runs whose alert is to be made now: completed since ``baseline``, at least
    ``after`` and at most ``window`` seconds before ``now``, and no mail came for them."""
    return [
        run
        for run in runs
        if run.completed_at >= baseline
        and after <= now - run.completed_at <= window
        and not mailed(run, recall)
    ]


#: The verb of GoCD's subject for a result, given the last result mail2alert knows (as
#: GoCD chooses it, had it known that result).
def verb_of(result: str, last: str | None) -> str:
    """``is broken`` / ``is fixed`` where the last known result says so, else ``failed``,
    ``passed`` or ``is cancelled``."""
    if result == "cancelled":
        return "is cancelled"
    if result == "failed":
        return "is broken" if last == "passed" else "failed"
    return "is fixed" if last == "failed" else "passed"


def recovered_mail(
    run: StageRun,
    result: str,
    recall: Recall,
    *,
    now: float,
    cancelled_by: str = "",
    changes: str = "",
    known: bool = True,
) -> bytes:
    """The stage mail GoCD would have sent for ``run`` (``result``: passed, failed or
    cancelled), marked with :data:`~mail2alert.managers.memory.RECOVERED_HEADER`; without
    ``From:`` and ``To:``, which the core writes with the envelope it gives it.

    ``known`` False: the result is cctray.xml's alone, where a cancelled run shows as
    failed. The mail then says ``failed`` (never ``is broken``), says that it may have been
    a cancel, and is marked :data:`~mail2alert.gocd.model.CCTRAY_SOURCE`, so that it
    teaches the history nothing.
    """
    last = recall(HISTORY, (run.pipeline.lower(), run.stage.lower())) if known else None
    subject = f"Stage [{run.locator}] {verb_of(result, last)}"
    lines = []
    if result == "cancelled" and cancelled_by:
        lines.append(f"The stage was cancelled by {cancelled_by}.")
    lines.append(f"See details: {run.url}")
    lines.append("(mail2alert made this alert from GoCD's API: GoCD's own mail never came.)")
    if not known:
        lines.append(
            "(This GoCD has no stage history to read the result from, and its cctray.xml"
            " shows a cancelled run as failed: this run may have been cancelled.)"
        )
    lines += ["", "-- CHANGES --", ""]
    lines += (changes.strip() or "(not read from GoCD: see its page above)").splitlines()
    message_id = f"<{run.locator.replace('/', '.')}.{int(now)}.recovered@mail2alert>"
    body = ("\r\n".join(lines) + "\r\n").encode()
    # As GoCD's JavaMail does: 7 bit when it can, else quoted-printable UTF-8 (author names),
    # so that no hop needs 8BITMIME.
    charset, encoding = "us-ascii", "7bit"
    if not body.isascii():
        charset, encoding = "UTF-8", "quoted-printable"
        body = quopri.encodestring(body)
    headers = [
        f"Date: {email.utils.formatdate(now)}",
        f"Message-ID: {message_id}",
        f"Subject: {subject}",
        f"{RECOVERED_HEADER}: {SOURCE if known else CCTRAY_SOURCE}",
        "MIME-Version: 1.0",
        f"Content-Type: text/plain; charset={charset}",
        f"Content-Transfer-Encoding: {encoding}",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body
