-- Health checks: one service's health, now, within a deadline.
--
-- Every HTTP probe answer is one of three kinds:
--   healthy    2xx (and the body matches expect_body, when set)
--   not_ready  connection refused, or 503: the service is still starting
--   unhealthy  any other status, a body mismatch, a timeout on an accepted connection
-- A check passes at the first healthy answer; fails at the deadline (timeout), early once
-- retries+1 answers in a row were unhealthy, and at once when the unit fails or exits (a
-- systemd signal, not a probe). Not-ready answers only count against the deadline.
local rr = require("rr")
local http = require("rr.http")

local health = {}

-- Probes start about every 10 ms for the first second, so a service that becomes healthy is
-- seen within milliseconds, then the delay grows with the time already waited (5% of it, up
-- to the configured interval): the lag stays within ~5% of the start-up time, where a
-- geometric back-off made a service healthy at 2.85 s wait 750 ms to be seen (make bench).
local FAST_PERIOD = 1.0
local FAST_DELAY = 0.01
local LAG_SHARE = 0.05

-- classify(res, err, code, expect_body) -> kind, detail
function health.classify(res, err, code, expect_body)
  if not res then
    if code == "refused" then
      return "not_ready", "connection refused"
    end
    if code == "connect_timeout" then
      return "not_ready", err
    end
    return "unhealthy", err or "probe failed"
  end
  local status = res.status
  if status == 503 then
    return "not_ready", "503 Service Unavailable"
  end
  if status < 200 or status > 299 then
    return "unhealthy", ("HTTP %d"):format(status)
  end
  if expect_body and not (res.body or ""):find(expect_body, 1, true) then
    return "unhealthy", ("HTTP %d but the body does not contain %q"):format(status, expect_body)
  end
  return "healthy", ("HTTP %d"):format(status)
end

-- One probe: kind, detail.
function health.probe(hc, timeout)
  local res, err, code = http.get(hc.url, { timeout = timeout, expect_body = hc.expect_body })
  return health.classify(res, err, code, hc.expect_body)
end

local function next_delay(elapsed, interval)
  if elapsed < FAST_PERIOD then
    return math.min(FAST_DELAY, interval)
  end
  return math.min(math.max(FAST_DELAY, elapsed * LAG_SHARE), interval)
end

-- Probe loop for an HTTP check; returns true, info | nil, reason.
local function http_check(hc, deadline, on_probe)
  local unhealthy_in_row, probes = 0, 0
  local started = rr.now()
  local last = "no answer"
  while true do
    local remaining = deadline - rr.now()
    if remaining <= 0 then
      return nil, ("not healthy after %gs (last answer: %s)"):format(hc.timeout, last)
    end
    -- A probe that hangs on an accepted connection is unhealthy: give it at most the interval
    -- (at least a second), never past the deadline.
    local kind, detail = health.probe(hc, math.min(math.max(hc.interval, 1), remaining))
    probes = probes + 1
    last = detail
    if on_probe then on_probe(kind, detail, probes) end
    if kind == "healthy" then
      return true, { probes = probes, detail = detail, duration = rr.now() - started }
    elseif kind == "unhealthy" then
      unhealthy_in_row = unhealthy_in_row + 1
      if unhealthy_in_row > hc.retries then
        return nil, ("%s (%d answers in a row)"):format(detail, unhealthy_in_row)
      end
    else
      unhealthy_in_row = 0
    end
    local delay = next_delay(rr.now() - started, hc.interval)
    local left = deadline - rr.now()
    if left <= 0 then
      return nil, ("not healthy after %gs (last answer: %s)"):format(hc.timeout, last)
    end
    rr.sleep(math.min(delay, left))
  end
end

-- A wait on the unit that failed for another reason than its timeout (the connection to the
-- manager closed or lost, a D-Bus error): the check cannot see the unit any more.
local function watch_failed(unit, err, code)
  return ("cannot watch %s: %s%s"):format(unit:name(), tostring(err), code and (" (%s)"):format(code) or "")
end

-- Runs fn() while watching the unit: returns fn's results, or nil, reason as soon as the unit
-- reaches a failed/inactive state (a PropertiesChanged signal, not a probe) or the watch
-- itself fails (without it a unit that dies would go unseen until the deadline).
local function while_unit_alive(unit, deadline, fn)
  -- The worker ends by the deadline; the watcher waits a little longer, so that at the deadline
  -- the worker's own answer ("not healthy after Ns") is the one reported. The first to end wins
  -- and the other is cancelled with the race.
  local i, a, b = rr.race({
    fn,
    function()
      -- true, state | nil, message, "ETIMEDOUT", state | nil, err, code
      local ok, x, y = unit:wait_state({ "failed", "inactive" }, math.max(deadline - rr.now(), 0.001) + 1)
      if ok then return nil, ("unit is %s"):format(x) end
      if y == "ETIMEDOUT" then return nil, "health check did not end by its deadline" end
      return nil, watch_failed(unit, x, y)
    end,
  })
  if i == nil then
    return nil, "health check failed: " .. tostring(a)
  end
  return a, b
end

-- health.check(unit, hc, opts) -> true, info | nil, reason
-- unit: an rr.systemd unit handle; hc: the service's normalized health table
-- ({kind="systemd"|"http"|"none", url, timeout, retries, interval, expect_body});
-- opts.on_probe(kind, detail, n) sees every probe; opts.timeout overrides hc.timeout.
function health.check(unit, hc, opts)
  opts = opts or {}
  local timeout = opts.timeout or hc.timeout
  local deadline = rr.now() + timeout
  if hc.kind == "none" then
    return true, { detail = "no health check configured" }
  end
  if hc.kind == "systemd" then
    -- true, state | nil, message, "ETIMEDOUT", state | nil, err, code (a D-Bus error)
    local ok, a, b, state = unit:wait_state({ "active", "failed", "inactive" }, timeout)
    if ok and a == "active" then
      return true, { detail = "unit is active" }
    elseif ok then
      return nil, ("unit is %s"):format(a)
    elseif b == "ETIMEDOUT" then
      return nil, ("unit still %s after %gs"):format(tostring(state), timeout)
    end
    return nil, watch_failed(unit, a, b)
  end
  -- one property, not the unit's ~250: this runs before and after every restart
  local active, perr, pcode = unit:get("ActiveState")
  if not active then
    return nil, ("cannot read %s: %s%s"):format(unit:name(), tostring(perr), pcode and (" (%s)"):format(pcode) or "")
  end
  local props = { ActiveState = active }
  if props.ActiveState == "failed" or props.ActiveState == "inactive" then
    return nil, ("unit is %s"):format(props.ActiveState)
  end
  return while_unit_alive(unit, deadline, function()
    return http_check({ url = hc.url, timeout = timeout, retries = hc.retries,
      interval = hc.interval, expect_body = hc.expect_body }, deadline, opts.on_probe)
  end)
end

-- health.snapshot(unit, hc) -> kind, detail: one look, no waiting (status and dry run).
function health.snapshot(unit, hc)
  local props, err = unit:properties()
  if not props then
    return "unknown", err
  end
  if props.ActiveState ~= "active" then
    return "unhealthy", "unit is " .. props.ActiveState
  end
  if hc.kind ~= "http" then
    return "healthy", "unit is active"
  end
  return health.probe(hc, math.min(hc.interval, 2))
end

return health
