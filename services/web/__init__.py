"""The HTTP layer both services share.

- `security`: roles, tokens and the `require(...)` route dependency;
- `guard`: the request guard that checks them, the body limits and the concurrency limit before
  anything is parsed;
- `settings`: the security settings every service reads (role tokens, running open);
- `access_log`: one log record per request in its trace context, the traceparent answered;
- `logs`: the process's log lines (JSON or text) for `dapdee serve`;
- `otel`: opt-in OpenTelemetry spans joined to the trace context;
- `prometheus`: the runtime collectors and the multi-process merge behind `GET /metrics`;
- `scrape`: reading a /metrics exposition (the benchmarks' and tests' counters);
- `server_thread`: an app under uvicorn in a thread on a pre-bound free socket (`dapdee up`'s
  planner and edge worker; the tests' and benchmarks' servers, through `dapdee.testing`).

The W3C trace context itself (`traceparent` read, made, made current and passed on) is
`dapdee.tracecontext`, in the core: the SDK carries it too.
"""
