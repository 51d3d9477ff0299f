// Runs the official Durable Streams conformance suite against the server at
// CONFORMANCE_TEST_URL (started by tests/conformance/run.py). The opt-in "Reserved subscription
// APIs" group is on (our server implements __ds/subscriptions); CONFORMANCE_SUBSCRIPTIONS=0
// turns it off (then the suite has 332 tests instead of 338).
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

runConformanceTests({
  baseUrl: process.env.CONFORMANCE_TEST_URL ?? "http://127.0.0.1:4437",
  longPollTimeoutMs: Number(process.env.CONFORMANCE_LONG_POLL_MS ?? "20000"),
  subscriptions: process.env.CONFORMANCE_SUBSCRIPTIONS !== "0",
})
