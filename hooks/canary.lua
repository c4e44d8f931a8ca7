-- Example canary analysis (named by `canary = { count = 1, soak = 120, analysis =
-- "hooks/canary.lua" }` in a group of services.lua). An example to adapt, not a supported
-- integration.
--
-- It compares the canaries' error rate with the other members': each member serves its
-- counters in Prometheus' text format on its metrics endpoint (the origin of its health URL,
-- path /metrics), `http_requests_total` (every answer) and `http_responses_5xx_total` (the 5xx
-- ones); samples with labels are summed (`http_requests_total{code="500"} 3` counts). The
-- canaries were just restarted, so their counters hold the new release's answers only; the
-- other members' hold the old release's since they started: the baseline.
--
-- Verdict, at every call of the soak: while the canaries together answered fewer than
-- `min_requests`, there is nothing to judge yet (true: the unit signals and probes still watch
-- them). Then the canaries fail when their error rate is more than `max_excess` above the
-- others' (0.02: two percentage points), with the numbers in the reason. A canary whose metrics
-- cannot be read fails (a release that breaks its metrics is not one to promote); another
-- member whose metrics cannot be read is left out of the baseline (with none left, the baseline
-- is 0 errors).
--
-- Edit SETTINGS below, or set RR_CANARY_METRICS_PATH, RR_CANARY_REQUESTS_METRIC,
-- RR_CANARY_ERRORS_METRIC, RR_CANARY_MAX_EXCESS, RR_CANARY_MIN_REQUESTS.
local rr = require("rr")
local http = require("rr.http")

local SETTINGS = {
  metrics_path = "/metrics",
  requests = "http_requests_total",
  errors = "http_responses_5xx_total",
  max_excess = 0.02,
  min_requests = 50,
  timeout = 2,
}

do
  local s = SETTINGS
  s.metrics_path = os.getenv("RR_CANARY_METRICS_PATH") or s.metrics_path
  s.requests = os.getenv("RR_CANARY_REQUESTS_METRIC") or s.requests
  s.errors = os.getenv("RR_CANARY_ERRORS_METRIC") or s.errors
  s.max_excess = tonumber(os.getenv("RR_CANARY_MAX_EXCESS") or "") or s.max_excess
  s.min_requests = tonumber(os.getenv("RR_CANARY_MIN_REQUESTS") or "") or s.min_requests
end

-- The sum of a counter's samples (`name value` or `name{labels} value`) in a text exposition.
local function counter(text, name)
  local total, seen = 0, false
  for line in text:gmatch("[^\n]+") do
    local metric, rest = line:match("^([%w_:]+)(.*)$")
    if metric == name then
      local value = tonumber(rest:gsub("^{.-}", ""):match("^%s*(%S+)"))
      if value then
        total, seen = total + value, true
      end
    end
  end
  return seen and total or nil
end

-- A member's { requests, errors } | nil, why.
local function read(member)
  local origin = member.url and member.url:match("^(https?://[^/]+)")
  if not origin then return nil, ("%s has no health URL to find its metrics at"):format(member.name) end
  local url = origin .. SETTINGS.metrics_path
  local res, err = http.get(url, { timeout = SETTINGS.timeout })
  if not res then return nil, ("cannot read %s's metrics at %s: %s"):format(member.name, url, err) end
  if res.status ~= 200 then
    return nil, ("cannot read %s's metrics at %s: HTTP %d"):format(member.name, url, res.status)
  end
  local requests, errors = counter(res.body, SETTINGS.requests), counter(res.body, SETTINGS.errors)
  if not requests then
    return nil, ("%s's metrics at %s have no %s"):format(member.name, url, SETTINGS.requests)
  end
  return { requests = requests, errors = errors or 0 }
end

-- Every member's counters at once (one slow endpoint does not delay the others').
local function read_all(members)
  local tasks = {}
  for i, m in ipairs(members) do tasks[i] = rr.spawn(read, m) end
  local out = {}
  for i, r in ipairs(rr.wait(tasks)) do
    if not r[1] then error(r[2]) end
    out[i] = { counts = r[2], why = r[3] }
  end
  return out
end

local function rate(errors, requests)
  return requests > 0 and errors / requests or 0
end

return function(info)
  local c_req, c_err = 0, 0
  for i, r in ipairs(read_all(info.canaries)) do
    if not r.counts then return false, ("canary %s: %s"):format(info.canaries[i].name, r.why) end
    c_req, c_err = c_req + r.counts.requests, c_err + r.counts.errors
  end
  if c_req < SETTINGS.min_requests then return true end
  local o_req, o_err = 0, 0
  for _, r in ipairs(read_all(info.others)) do
    if r.counts then o_req, o_err = o_req + r.counts.requests, o_err + r.counts.errors end
  end
  local canary_rate, baseline = rate(c_err, c_req), rate(o_err, o_req)
  if canary_rate > baseline + SETTINGS.max_excess then
    return false, ("error rate %.1f%% on the canaries (%d of %d answers 5xx) against %.1f%% on the other "
      .. "members (%d of %d): more than %g points above"):format(canary_rate * 100, c_err, c_req, baseline * 100,
      o_err, o_req, SETTINGS.max_excess * 100)
  end
  return true
end
