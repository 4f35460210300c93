-- wrk script: POST pre-signed Customer.io webhook bodies, each body at most once across all threads.
--
-- Environment (set by harness.wrk):
--   BENCH_BODIES   file of lines "X-CIO-Timestamp<TAB>X-CIO-Signature<TAB>body" (harness.write_signed_bodies)
--   BENCH_THREADS  wrk's -t: thread k of n sends lines k, k+n, k+2n... so no two threads share a body
--   BENCH_PACE_MS  optional: each connection waits this long before each request (an open, paced load)
--
-- done() prints one machine-readable line, "BENCH key=value ...", with the latency percentiles
-- (microseconds), the error counts and how many bodies were used; bodies_wrapped > 0 means the
-- file ran out and bodies were sent twice (the extension then answers "duplicate"): make it longer.

local bodies_file = assert(os.getenv("BENCH_BODIES"), "BENCH_BODIES is not set")
local thread_count = tonumber(os.getenv("BENCH_THREADS") or "1")
local pace_ms = tonumber(os.getenv("BENCH_PACE_MS") or "0")

local threads = {}
local next_thread_id = 0

function setup(thread)
   thread:set("thread_id", next_thread_id)
   next_thread_id = next_thread_id + 1
   table.insert(threads, thread)
end

local requests = {}
local position = 0
used = 0
wrapped = 0

function init(args)
   local line_number = 0
   for line in io.lines(bodies_file) do
      if line_number % thread_count == thread_id then
         local timestamp, signature, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
         local headers = {
            ["Content-Type"] = "application/json",
            ["X-CIO-Timestamp"] = timestamp,
            ["X-CIO-Signature"] = signature,
         }
         requests[#requests + 1] = wrk.format("POST", wrk.path, headers, body)
      end
      line_number = line_number + 1
   end
   assert(#requests > 0, "no bodies for thread " .. thread_id .. " in " .. bodies_file)
end

function request()
   position = position + 1
   if position > #requests then
      position = 1
      wrapped = wrapped + 1
   end
   used = used + 1
   return requests[position]
end

if pace_ms > 0 then
   function delay()
      return pace_ms
   end
end

function done(summary, latency, _)
   local bodies_used, bodies_wrapped = 0, 0
   for _, thread in ipairs(threads) do
      bodies_used = bodies_used + thread:get("used")
      bodies_wrapped = bodies_wrapped + thread:get("wrapped")
   end
   local errors = summary.errors
   io.write(string.format(
      "BENCH requests=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d mean_us=%.1f "
         .. "errors_connect=%d errors_read=%d errors_write=%d errors_status=%d errors_timeout=%d "
         .. "bodies_used=%d bodies_wrapped=%d\n",
      summary.requests, summary.duration,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
      latency.max, latency.mean,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout,
      bodies_used, bodies_wrapped))
end
