// Plans through a client generated from the planner's /openapi.json: the types come from
// openapi-typescript (generated/planner.d.ts), the calls from openapi-fetch. Run by
// tests/test_generated_client.py against a live planner; prints one JSON document.
import { readFileSync } from "node:fs";

import createClient from "openapi-fetch";

import type { components, paths } from "../generated/planner.js";

type CostGraph = components["schemas"]["CostGraphBody"];
type PlanBody = paths["/plan"]["post"]["requestBody"]["content"]["application/json"];
type Plan = components["schemas"]["PlanAnswer"];
type Problem = components["schemas"]["Problem"];

function setting(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

const baseUrl = setting("PLANNER_URL");
const bearer = (token: string) => ({ Authorization: `Bearer ${token}` });
const admin = createClient<paths>({ baseUrl, headers: bearer(setting("ADMIN_TOKEN")) });
const device = createClient<paths>({ baseUrl, headers: bearer(setting("DEVICE_TOKEN")) });
const graph: CostGraph = JSON.parse(readFileSync(setting("GRAPH_FILE"), "utf8"));

const put = await admin.PUT("/models/{model}", { params: { path: { model: graph.model } }, body: graph });
if (put.data === undefined) throw new Error(`PUT /models/${graph.model}: HTTP ${put.response.status}`);

const request: PlanBody = { model: graph.model, bandwidth_mbps: 5.85, rtt_ms: 10, device_load: 0.2, mode: "latency" };
const planned = await device.POST("/plan", { body: request });
if (planned.data === undefined) throw new Error(`POST /plan: HTTP ${planned.response.status}`);
const plan: Plan = planned.data;

// The generated types are exact: a misspelt field does not compile (the directive below fails
// the build if it would), and the planner refuses it at run time with a 422 naming the field.
// @ts-expect-error min_acc is not a field of the plan request
const misspelt: PlanBody = { model: graph.model, bandwidth_mbps: 1, min_acc: 0.9 };
const refused = await device.POST("/plan", { body: misspelt });
const unknown = await device.GET("/models/{model}", { params: { path: { model: "ts-nope" } } });
const problems: Record<string, Problem | undefined> = { refused: refused.error, unknown: unknown.error };

console.log(
  JSON.stringify({
    written: { created: put.data.created, version: put.data.version, status: put.response.status },
    plan,
    refused: { status: refused.response.status, problem: problems.refused },
    unknown: { status: unknown.response.status, problem: problems.unknown },
  }),
);
