"""Keep a gateway in step with operators, through Prefect (``serving/bus.py``): re-read the cluster and model
blocks (maintenance, drains, edits), adopt what lifecycle runs observed, and publish this gateway's load for
scale-down-idle and drain-cluster."""

from __future__ import annotations

import asyncio
import logging
import time

from blocks.registry import Registry
from serving import bus
from serving.request import Services

log = logging.getLogger("first.api")


async def follow_fleet(svc: Services, gateway: str) -> None:
    """Runs for the gateway's lifetime (started at startup when it reads its registry from Prefect)."""
    settings = svc.settings
    last_registry, last_report, last_doc, failing = 0.0, 0.0, None, False
    while True:
        await asyncio.sleep(settings.state_sync_s)
        now = time.monotonic()
        try:
            if now - last_registry >= settings.registry_refresh_s:
                last_registry = now
                reg = await Registry.load_blocks()
                if reg.models and reg.model_dump() != svc.registry.model_dump():
                    log.info("clusters or models changed in Prefect; routing with the new registry")
                    svc.registry = reg
            for obs in await bus.observations():
                if svc.live.adopt(obs, svc.registry.clusters, svc.registry.models):
                    log.info("%s on %s is %s (seen by %s)", obs.model, obs.cluster, obs.state, obs.source or "a flow")
            maintenance = sorted(c.name for c in svc.registry.clusters.values() if c.maintenance)
            report = svc.live.report(gateway, maintenance)
            doc = report.model_dump(exclude={"ts"})
            if doc != last_doc or now - last_report >= 10:  # on change, and a heartbeat
                await bus.publish_gateway(report)
                last_doc, last_report = doc, now
            if failing:
                log.info("exchanging live state with Prefect again")
            failing = False
        except Exception as exc:
            if not failing:
                log.warning("could not exchange live state with Prefect (%s); routing on what this gateway knows", exc)
            failing = True
