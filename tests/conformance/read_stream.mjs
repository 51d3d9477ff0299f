// Read a Durable Stream with the official TypeScript client (@durable-streams/client), catch-up
// only: `node read_stream.mjs URL OFFSET` prints one JSON line, {"items": [...], "offset": "..."}
// or, when the read fails, {"error": "...", "status": N}.
import { stream } from "@durable-streams/client"

const [url, offset] = process.argv.slice(2)
try {
  const res = await stream({ url, offset, live: false })
  const items = await res.json()
  console.log(JSON.stringify({ items, offset: res.offset, upToDate: res.upToDate }))
} catch (error) {
  console.log(JSON.stringify({ error: String(error?.message ?? error), status: error?.status ?? null }))
}
