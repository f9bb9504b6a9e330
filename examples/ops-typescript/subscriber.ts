// An ops agent outside the runtime, in TypeScript on nats.js: follows the Mozaiks ops agent's
// incidents, actions and approvals on NATS (stream MZ_OPS) and prints them.
//
//   npm install
//   NATS_URL=nats://127.0.0.1:4222 npm start                 # new events only
//   npm start -- --replay                                     # everything MZ_OPS keeps
//   npm start -- --replay --once                              # print what is there, exit
//
// Subjects (README, "Operating the fleet"; schemas/ops.*.schema.json):
//   {ns.}mz.ops.incident.{rule}.{app_id}   mozaiks.ops.incident.firing / .resolved
//   {ns.}mz.ops.action.{kind}.{app_id}     mozaiks.ops.action.applied / .reverted
//   {ns.}mz.ops.approval.{app_id}.{id}     mozaiks.ops.approval.requested / .approved / ...
// Every message is a CloudEvent 1.0 in structured JSON mode.

import { connect, consumerOpts, type JsMsg } from "nats";

interface CloudEvent<T> {
  specversion: "1.0";
  id: string;
  source: string;
  type: string;
  subject: string;
  time: string;
  data: T;
}

interface OpsAction {
  action_id: string;
  kind: "throttle" | "pause_runs" | "disable_pack" | "notify";
  app_id: string;
  incident_id?: string;
  by: string;
  reason: string;
  created_at: string;
  expires_at?: string;
  max_concurrent_runs?: number;
  retry_after_seconds?: number;
  workflow?: string;
  status?: "applied" | "reverted" | "expired";
}

interface Incident {
  incident_id: string;
  rule: string;
  status: "firing" | "resolved";
  severity: "info" | "warning" | "critical";
  app_id: string;
  labels: Record<string, string>;
  annotations: { summary: string; description: string };
  starts_at: string;
  ends_at?: string | null;
  fingerprint: string;
  values: Record<string, number>;
  actions: OpsAction[];
  proposed: { kind: string; app_id: string; reason: string }[];
}

interface Approval {
  approval_id: string;
  kind: "suspend_app" | "raise_limits" | "move_storage" | "scale";
  app_id: string;
  status: "approval_required" | "approved" | "rejected" | "expired";
  reason: string;
  expires_at: string;
}

export function describe(ev: CloudEvent<unknown>): string {
  if (ev.type.startsWith("mozaiks.ops.incident.")) {
    const d = ev.data as Incident;
    let line = `[${d.severity}] ${d.rule} ${d.status} for app ${d.app_id}: ${d.annotations.summary}`;
    if (d.status === "firing" && d.actions.length > 0) {
      line += ` | actions: ${d.actions.map((a) => a.kind).join(", ")}`;
    }
    if (d.status === "firing" && d.proposed.length > 0) {
      line += ` | proposed (needs approval): ${d.proposed.map((p) => p.kind).join(", ")}`;
    }
    return line;
  }
  if (ev.type.startsWith("mozaiks.ops.action.")) {
    const d = ev.data as OpsAction;
    return `action ${d.kind} ${d.status} on app ${d.app_id} until ${d.expires_at ?? "-"} (${d.reason})`;
  }
  if (ev.type.startsWith("mozaiks.ops.approval.")) {
    const d = ev.data as Approval;
    let line = `approval ${d.kind} for app ${d.app_id}: ${d.status}`;
    if (d.status === "approval_required") {
      line += ` -> POST /api/ops/approvals/${d.approval_id}/approve (superadmin)`;
    }
    return line;
  }
  return `${ev.type} ${ev.subject}`;
}

async function main(): Promise<void> {
  const url = process.env.NATS_URL ?? "nats://127.0.0.1:4222";
  const ns = process.env.MOZAIKS_NAMESPACE ?? "";
  const replay = process.argv.includes("--replay");
  const once = process.argv.includes("--once");
  const stream = ns ? `${ns}_MZ_OPS` : "MZ_OPS";
  const nc = await connect({ servers: url.split(",") });
  const js = nc.jetstream();
  const opts = consumerOpts();
  opts.orderedConsumer();
  opts.bindStream(stream);
  if (replay) opts.deliverAll();
  else opts.deliverNew();
  const sub = await js.subscribe(`${ns ? `${ns}.` : ""}mz.ops.>`, opts);
  console.log(`Following ${stream} on ${url} (${replay ? "from the start" : "new events"}).`);
  let idle: ReturnType<typeof setTimeout> | undefined;
  const arm = () => {
    if (!once) return;
    clearTimeout(idle);
    idle = setTimeout(() => sub.unsubscribe(), 2000);
  };
  arm();
  for await (const m of sub as AsyncIterable<JsMsg>) {
    try {
      const ev = JSON.parse(new TextDecoder().decode(m.data)) as CloudEvent<unknown>;
      console.log(`${ev.time} ${describe(ev)}`);
    } catch {
      // Not JSON: not a CloudEvent of the ops agent.
    }
    arm();
  }
  clearTimeout(idle);
  await nc.close();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
