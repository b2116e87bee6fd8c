"""`ptg prefect-setup`: what a Prefect server needs before ptg's deployments run on it, made idempotently (run it
again at any time; it creates what is missing and updates the automation):

- the work pool (default ``ptg-process``, a process pool; ``--pool ptg-gpu --type docker`` for the GPU one);
- the automation ``ptg-crash-zombie-flow-runs``: a deployment run of the ``ptg-pipeline`` flow that sends no
  heartbeat for ``CRASH_AFTER_S`` seconds is set to Crashed. Without it, a run whose worker died (``kill -9``, a
  lost machine or container) stays Running in Prefect forever: nothing is left to report its end. This is
  Prefect's own "zombie flow run" detection (docs: "How to detect and respond to zombie flows"): the flow run's
  process sends a ``prefect.flow-run.heartbeat`` event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds, set
  to ``HEARTBEAT_S`` for every deployment by prefect.yaml (``job_variables.env``), and a proactive event trigger
  fires when, after a heartbeat, neither another heartbeat nor a final state arrives within the window.

Only deployment runs of ``ptg-pipeline`` are watched: they are the ones prefect.yaml gives the 30 s heartbeat. A
run of ``python flows/ptg_flow.py`` against a server keeps Prefect's default heartbeat (180 s in 3.9), which a
90 s window would wrongly crash, and other flows on the same server are none of ptg's business.
"""

from __future__ import annotations

from datetime import timedelta

FLOW = "ptg-pipeline"  # the flow's name (flows/ptg_flow.py)
PROCESS_POOL = "ptg-process"  # prefect.yaml's ptg-local deployment runs there
AUTOMATION = "ptg-crash-zombie-flow-runs"
# Seconds between a flow run's heartbeats (PREFECT_FLOWS_HEARTBEAT_FREQUENCY in prefect.yaml, every deployment):
# 30 s is Prefect's minimum (the setting has ge=30; its default is 180 s), so a dead run is noticed soonest; one
# event per 30 s per run costs nothing. tests/test_flows.py checks that prefect.yaml sets this value.
HEARTBEAT_S = 30
# A run is set to Crashed after this long without a heartbeat: 3 heartbeats missed (Prefect's documented choice),
# so one late or lost heartbeat (a loaded machine, a server restart) never crashes a live run, and a dead one is
# marked within 90 s of its last heartbeat (30-90 s after it died, plus the server's 5 s evaluation period).
CRASH_AFTER_S = 90
# Final states end a run's heartbeats; their events close the window, so a finished run is never set to Crashed.
FINAL_EVENTS = ("prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed")


def zombie_automation(crash_after_s: int = CRASH_AFTER_S):
    """The automation that sets a ``ptg-pipeline`` deployment run to Crashed after ``crash_after_s`` seconds without
    a heartbeat (the trigger of Prefect's zombie-flow recipe, restricted to this flow's deployment runs)."""
    from prefect.automations import AutomationCore, ChangeFlowRunState, EventTrigger, Posture
    from prefect.client.schemas.objects import StateType

    if crash_after_s <= HEARTBEAT_S:
        raise ValueError(f"the crash window ({crash_after_s} s) must be longer than the heartbeat period "
                         f"({HEARTBEAT_S} s), or every live run is crashed between two heartbeats")
    return AutomationCore(
        name=AUTOMATION,
        description=f"Set a {FLOW} deployment run to Crashed when it sends no heartbeat for {crash_after_s} s "
                    f"(its worker or machine died); created by `ptg prefect-setup`.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            # both hold: the run's flow is ptg-pipeline, and it belongs to a deployment
            match_related=[{"prefect.resource.role": "flow", "prefect.resource.name": FLOW},
                           {"prefect.resource.role": "deployment"}],
            for_each={"prefect.resource.id"},  # one window per flow run
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=crash_after_s),
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat for {crash_after_s} s: the flow run's process is gone (worker killed or machine "
                    f"lost). Run the deployment again: it resumes at the stage that did not finish."),
        ],
    )


async def ensure_work_pool(name: str = PROCESS_POOL, pool_type: str = "process") -> str:
    """Create the work pool ``name`` of ``pool_type`` (Prefect's default job template) unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    async with get_client() as client:
        try:
            pool = await client.read_work_pool(name)
            return f"work pool {name!r}: exists ({pool.type})"
        except ObjectNotFound:
            pass
        template = await get_default_base_job_template_for_infrastructure_type(pool_type)
        if template is None:
            raise RuntimeError(f"unknown work pool type {pool_type!r} (for docker: pip install prefect-docker)")
        await client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
        return f"work pool {name!r}: created ({pool_type})"


async def ensure_zombie_automation(crash_after_s: int = CRASH_AFTER_S) -> str:
    """Create the automation ``AUTOMATION``, or update it to ``crash_after_s`` (one left if there were several)."""
    from prefect.client.orchestration import get_client

    wanted = zombie_automation(crash_after_s)
    async with get_client() as client:
        existing = await client.read_automations_by_name(AUTOMATION)
        for extra in existing[1:]:
            await client.delete_automation(extra.id)
        if existing:
            await client.update_automation(existing[0].id, wanted)
            return f"automation {AUTOMATION!r}: updated (Crashed after {crash_after_s} s without a heartbeat)"
        await client.create_automation(wanted)
        return f"automation {AUTOMATION!r}: created (Crashed after {crash_after_s} s without a heartbeat)"


def api_url() -> str:
    """The configured Prefect API; an error when none is (the client would set up a throw-away local one)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise SystemExit("PREFECT_API_URL is not set: start a server (`prefect server start --host 127.0.0.1` or "
                         "`ptg ui --prefect`) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


async def setup(pool: str = PROCESS_POOL, pool_type: str = "process", crash_after_s: int = CRASH_AFTER_S
                ) -> list[str]:
    return [await ensure_work_pool(pool, pool_type), await ensure_zombie_automation(crash_after_s)]
