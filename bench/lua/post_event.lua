-- wrk script: POST valid events to the relay (or the baseline) the way the SDK sends them:
-- text/plain JSON (no CORS preflight) with an allowed Origin, each with a unique transaction_id
-- and event_uuid so that nothing is collapsed or replayed.
--   wrk -s post_event.lua URL -- RUN_PREFIX PATH ORIGIN
-- done() prints one line "WRK_JSON {...}" with throughput inputs and latency percentiles (us).
-- A 4th argument PAUSE_MS paces each connection: after each answer it waits PAUSE_MS before the
-- next request, so C connections offer about C * 1000 / PAUSE_MS requests per second.

local next_thread = 0

function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end

local counter = 0
local prefix, path, headers

function init(args)
  prefix = (args[1] or "run") .. "x" .. tostring(tid)
  path = args[2] or "/api/event/cmp_bench"
  headers = { ["Content-Type"] = "text/plain;charset=UTF-8", ["Origin"] = args[3] or "https://www.example.com" }
  local pause = tonumber(args[4] or "")
  if pause and pause > 0 then
    -- Defined here, not at the top: wrk looks for delay() after init() and paces only if it exists.
    delay = function() return pause end
  end
end

function request()
  counter = counter + 1
  local id = prefix .. "n" .. counter
  local body = '{"event_id":"quote_viewed","transaction_id":"t' .. id .. '","event_uuid":"u' .. id ..
    '","pid":"src_bench","sub1":"ad42","utm_source":"google","utm_campaign":"spring"}'
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"mean":%.1f,"p50":%.0f,"p90":%.0f,"p95":%.0f,"p99":%.0f,"max":%.0f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency.max))
end
