"""The HTTP layer both services share.

- `security`: roles, tokens and the `require(...)` route dependency;
- `guard`: the request guard that checks them, the body limits and the concurrency limit before
  anything is parsed;
- `settings`: the security settings every service reads (role tokens, running open);
- `tracecontext`: the W3C `traceparent` read, made, made current and passed on;
- `access_log`: one log record per request in its trace context, the traceparent answered;
- `logs`: the process's log lines (JSON or text) for `dapdee serve`;
- `otel`: opt-in OpenTelemetry spans joined to the trace context;
- `prometheus`: the runtime collectors and the multi-process merge behind `GET /metrics`.
"""
