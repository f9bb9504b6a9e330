"""An ops agent outside the runtime: follows the Mozaiks ops agent's incidents, actions and
approvals on NATS (stream MZ_OPS) and prints them; with --approve-url it also lists the
proposals that wait for a superadmin and shows how to approve them.

    pip install -r requirements.txt
    NATS_URL=nats://127.0.0.1:4222 python subscriber.py            # new events only
    python subscriber.py --replay                                  # everything MZ_OPS keeps
    python subscriber.py --replay --once                           # print what is there, exit

Subjects (README, "Operating the fleet"; schemas/ops.*.schema.json):
    {ns.}mz.ops.incident.{rule}.{app_id}      mozaiks.ops.incident.firing / .resolved
    {ns.}mz.ops.action.{kind}.{app_id}        mozaiks.ops.action.applied / .reverted
    {ns.}mz.ops.approval.{app_id}.{id}        mozaiks.ops.approval.requested / .approved / ...
Every message is a CloudEvent 1.0 in structured JSON mode.
"""

import asyncio
import json
import os
import sys

import nats
from nats.js.api import DeliverPolicy


def describe(ev: dict) -> str:
    """One line for one CloudEvent of MZ_OPS."""
    kind, data = ev.get("type", ""), ev.get("data", {})
    if kind.startswith("mozaiks.ops.incident."):
        status = data.get("status")
        line = f"[{data.get('severity')}] {data.get('rule')} {status} for app {data.get('app_id')}: {data.get('annotations', {}).get('summary')}"
        taken = ", ".join(a["kind"] for a in data.get("actions", []))
        proposed = ", ".join(p["kind"] for p in data.get("proposed", []))
        if status == "firing" and taken:
            line += f" | actions: {taken}"
        if status == "firing" and proposed:
            line += f" | proposed (needs approval): {proposed}"
        return line
    if kind.startswith("mozaiks.ops.action."):
        what = data.get("kind")
        detail = {
            "throttle": f"max_concurrent_runs={data.get('max_concurrent_runs')}",
            "pause_runs": f"retry_after={data.get('retry_after_seconds')}s",
            "disable_pack": f"workflow={data.get('workflow')}",
        }.get(what, "")
        return f"action {what} {data.get('status')} on app {data.get('app_id')} {detail} until {data.get('expires_at')} ({data.get('reason')})"
    if kind.startswith("mozaiks.ops.approval."):
        line = f"approval {data.get('kind')} for app {data.get('app_id')}: {data.get('status')}"
        if data.get("status") == "approval_required":
            line += f" -> POST /api/ops/approvals/{data.get('approval_id')}/approve (superadmin)"
        return line
    return f"{kind} {ev.get('subject')}"


async def main() -> None:
    url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    ns = os.environ.get("MOZAIKS_NAMESPACE", "")
    subject_prefix = f"{ns}." if ns else ""
    stream = f"{ns}_MZ_OPS" if ns else "MZ_OPS"
    replay = "--replay" in sys.argv
    once = "--once" in sys.argv

    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.subscribe(
        f"{subject_prefix}mz.ops.>",
        stream=stream,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL if replay else DeliverPolicy.NEW,
    )
    print(f"Following {stream} on {url} ({'from the start' if replay else 'new events'}).", flush=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2 if once else 3600)
            except nats.errors.TimeoutError:
                if once:
                    break
                continue
            try:
                ev = json.loads(msg.data)
            except ValueError:
                continue
            print(f"{ev.get('time')} {describe(ev)}", flush=True)
    finally:
        await nc.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
