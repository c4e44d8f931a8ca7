-- rr.soak: units watched while they serve, for a while: a canary's soak, a blue-green
-- release's. Each thing watched is a watcher task; the first failure ends the soak, and it
-- passes when the deadline came with none (and the analysis' last look agrees).
--
--   local s = soak.new(120)
--   assert(s:unit(unit, "canary api.1"))      -- active, same main process, not restarted
--   s:probe(svc.health, "canary api.1")       -- its HTTP check keeps answering healthy
--   s:analysis(fn, info)                      -- fn(info) -> true | false, reason
--   local ok, reason = s:run("the canaries")
local rr = require("rr")
local health = require("rr.health")

local soak = {}

local Soak = {}
Soak.__index = Soak

-- soak.new(seconds) -> s. Probes and the analysis look about every quarter of the soak, at
-- least every 5 s, at most every 50 ms.
function soak.new(seconds)
  return setmetatable({ seconds = seconds, deadline = rr.now() + seconds,
    interval = math.max(0.05, math.min(5, seconds / 4)), watchers = {} }, Soak)
end

-- s:unit(unit, label) -> true | nil, reason: the unit must stay active with the same main
-- process and restart count (PropertiesChanged signals, compared with what it was now, so
-- nothing between the read and the wait is missed). label names it in the reasons.
function Soak:unit(unit, label)
  local base, berr = unit:properties({ "ActiveState", "MainPID", "NRestarts" })
  if not base then return nil, ("cannot read %s: %s"):format(label, tostring(berr)) end
  if base.ActiveState ~= "active" then
    return nil, ("%s is %s at the start of the soak"):format(label, tostring(base.ActiveState))
  end
  local deadline = self.deadline
  self.watchers[#self.watchers + 1] = function()
    local p, err, code = unit:wait_change({ "ActiveState", "MainPID", "NRestarts" },
      math.max(deadline - rr.now(), 0.001), base)
    if not p then
      if code == "ETIMEDOUT" then return "pass" end
      return ("cannot watch %s: %s"):format(label, tostring(err))
    end
    if p.ActiveState ~= "active" then
      return ("%s left active (%s)"):format(label, tostring(p.ActiveState))
    elseif (p.NRestarts or 0) > (base.NRestarts or 0) then
      return ("%s was restarted by systemd (NRestarts %d -> %d)"):format(label, base.NRestarts or 0, p.NRestarts)
    elseif p.MainPID == 0 then
      return ("%s: its main process exited (MainPID %s -> 0)"):format(label, tostring(base.MainPID))
    end
    return ("%s changed its main process (MainPID %s -> %s)"):format(label, tostring(base.MainPID),
      tostring(p.MainPID))
  end
  return true
end

-- s:probe(hc, label): an HTTP health check (a service's normalized health) must keep answering
-- healthy. Other kinds add nothing (the unit watcher covers them).
function Soak:probe(hc, label)
  if not (hc and hc.kind == "http") then return end
  local deadline, interval = self.deadline, self.interval
  self.watchers[#self.watchers + 1] = function()
    while rr.now() < deadline do
      rr.sleep(math.min(interval, math.max(deadline - rr.now(), 0)))
      if rr.now() >= deadline then return "pass" end
      local kind, detail = health.probe(hc, math.min(math.max(hc.interval, 1), 5))
      if kind ~= "healthy" then return ("%s: probe failed during the soak: %s"):format(label, detail) end
    end
    return "pass"
  end
end

-- s:analysis(fn, info): fn(info) is called every interval and once more at the end, info.elapsed
-- set; it must return true (false, reason fails the soak). Each call is a task with a deadline:
-- an analysis stuck in a loop or on a hung metrics endpoint is a failure, not a hang.
function Soak:analysis(fn, info)
  local deadline, interval, t0 = self.deadline, self.interval, rr.now()
  local function analyze()
    info.elapsed = rr.now() - t0
    local task = rr.spawn(fn, info):deadline(math.max(interval * 2, 10))
    local ok, verdict, why = rr.join(task)
    if not ok then return ("analysis error: %s"):format(tostring(verdict)) end
    if verdict ~= true then
      return ("analysis: %s"):format(why and tostring(why) or ("returned " .. tostring(verdict)))
    end
  end
  self.watchers[#self.watchers + 1] = function()
    while rr.now() < deadline do
      rr.sleep(math.min(interval, math.max(deadline - rr.now(), 0)))
      if rr.now() >= deadline then break end
      local failure = analyze()
      if failure then return failure end
    end
    return "pass"
  end
  self.final_look = analyze
end

-- s:run(what) -> true | nil, reason: the watchers race; the first failure wins (the others are
-- cancelled with the race). what names the watched for a failure of the watching itself.
function Soak:run(what)
  local watchers = self.watchers
  while true do
    local i, result = rr.race(watchers)
    if i == nil then return nil, ("cannot watch %s: %s"):format(what, tostring(result)) end
    if result ~= "pass" then return nil, result end
    table.remove(watchers, i)
    if #watchers == 0 or rr.now() >= self.deadline then
      if self.final_look then
        local failure = self.final_look()
        if failure then return nil, failure end
      end
      return true
    end
  end
end

return soak
