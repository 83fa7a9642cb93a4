-- wrk script: POST valid events to the relay (or a baseline) the way the SDK sends them:
-- text/plain JSON (no CORS preflight) with an allowed Origin, each with a unique transaction_id
-- and event_uuid so that nothing is collapsed or replayed.
--   wrk -s post_event.lua URL -- RUN_PREFIX PATH ORIGIN [RATE] [CONVERSION]
-- CONVERSION, when given: post that conversion event with an amount instead of quote_viewed.
-- done() prints one line "WRK_JSON {...}" with throughput inputs and latency percentiles (us).
-- RATE (requests per second, for each wrk thread) makes the load open-loop, as wrk2 would: the
-- thread's requests are given start times RATE apart on a clock, and a connection that comes free
-- waits for the next start time; when the server is slow, more connections are busy but the
-- offered rate stays (as long as there are connections: give rate x worst latency of them).
-- Latency is each request's own (write to answer), not counting a start time already missed.

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } pt_timespec;
int clock_gettime(int clk, pt_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("pt_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local next_thread = 0

function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end

local counter = 0
local prefix, path, headers
local event = '"event_id":"quote_viewed"'

function init(args)
  prefix = (args[1] or "run") .. "x" .. tostring(tid)
  path = args[2] or "/api/event/cmp_bench"
  headers = { ["Content-Type"] = "text/plain;charset=UTF-8", ["Origin"] = args[3] or "https://www.example.com" }
  if args[5] and args[5] ~= "" then event = '"event_id":"' .. args[5] .. '","amount":45' end
  local rate = tonumber(args[4] or "")
  if rate and rate > 0 then
    local interval = 1000 / rate
    local next_start = nil
    -- Defined here, not at the top: wrk looks for delay() after init() and paces only if it exists.
    -- wrk calls it before every request (the first of each connection too), in this thread.
    delay = function()
      local now = now_ms()
      next_start = next_start or now
      local wait = next_start - now
      next_start = next_start + interval
      if wait < 0 then return 0 end
      return math.floor(wait)
    end
  end
end

function request()
  counter = counter + 1
  local id = prefix .. "n" .. counter
  local body = '{' .. event .. ',"transaction_id":"t' .. id .. '","event_uuid":"u' .. id ..
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
