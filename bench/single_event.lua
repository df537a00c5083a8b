-- wrk script for bench/single_event.py: POST one click per request, unique click_id.
-- usage: wrk ... -s bench/single_event.lua URL -- <run-id> [<fields file>]
-- With a fields file (one JSON object tail per line, '"ad_id":...}', written by
-- bench/single_event.py for --shape production) each request is a click_id, the current
-- time and the next line's fields; without it, the legacy 50-ad body below.
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  run = args[1] or "r"
  counter = 0
  fields = nil
  if args[2] then
    fields = {}
    for line in io.lines(args[2]) do
      fields[#fields + 1] = line
    end
  end
  wrk.headers["Content-Type"] = "application/json"
end

local UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 " ..
  "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"

function request()
  counter = counter + 1
  if fields then
    local body = string.format('{"click_id":"%s-%d-%d","timestamp":%d,', run, tid, counter,
      os.time()) .. fields[(counter + tid * 7919) % #fields + 1]
    return wrk.format("POST", wrk.path, nil, body)
  end
  local body = string.format(
    '{"click_id":"%s-%d-%d","ad_id":"ad-%04d","advertiser_id":"adv-%d","user_id":"u-%d",' ..
    '"timestamp":%d,"ip":"203.0.113.%d","user_agent":"%s"}',
    run, tid, counter, counter % 50, counter % 7, counter % 5000, os.time(), counter % 256, UA)
  return wrk.format("POST", wrk.path, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
