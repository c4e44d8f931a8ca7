-- rrengine demo/watch.lua SOCKET BACKEND SERVER=UNIT...: how many replicas of a group are out of
-- service at once while a roll runs, seen from outside the engine (demo/run starts it in the
-- background and stops it with SIGTERM).
--
-- Every 20 ms it looks at each replica: out of service when HAProxy has it out of rotation
-- (drain, maint) or sees it stopped, or when its unit is not active. Each of these is part of
-- what the engine counts against the group's budget (max_unavailable), so a sample with more
-- replicas out than the budget is the engine's fault.
--
-- Output: "serving" once requests reach the backend (the load is on: the roll may start), then,
-- at SIGTERM, "max_down=N samples=N drained=N now_down=N" (drained: replicas seen drained at
-- least once; now_down: out in the last sample) and "worst: ..." (the first sample with max_down
-- replicas out, and why each was).
local rr = require("rr")
local haproxy = require("rr.haproxy")
local systemd = require("rr.systemd")

local args = { ... }
if #args < 3 then
  io.stderr:write("usage: rrengine demo/watch.lua SOCKET BACKEND SERVER=UNIT...\n")
  os.exit(2)
end
io.stdout:setvbuf("line") -- demo/run reads the file while this runs

local hp = assert(haproxy.new({ socket = args[1], backend = args[2] }))
local manager = assert(systemd.user())
local members = {}
for i = 3, #args do
  local server, unit = args[i]:match("^([^=]+)=(.+)$")
  if not server then error("SERVER=UNIT expected, not " .. args[i]) end
  members[#members + 1] = { server = server, unit = assert(manager:unit(unit)) }
end

local stop = false
rr.on_signal(function() stop = true end)

-- Requests the backend's servers have answered so far.
local function served()
  local n = 0
  for _, s in pairs(assert(hp:stats())) do n = n + s.total end
  return n
end

local before = served()
while not stop and served() < before + 10 do rr.sleep(0.02) end
print("serving")

local max, worst, samples, drained, now_down = 0, "no replica out of service", 0, {}, 0
while not stop do
  local t0 = rr.now()
  local servers = assert(hp:servers())
  local out = {}
  for _, m in ipairs(members) do
    local s = servers[m.server] or error(("HAProxy's backend %s has no server %s"):format(args[2], m.server))
    local why = {}
    if s.admin ~= "ready" then
      why[#why + 1] = "HAProxy: " .. s.admin
      if s.admin == "drain" then drained[m.server] = true end
    elseif s.operational == "stopped" then
      why[#why + 1] = "HAProxy: stopped"
    end
    local state = assert(m.unit:get("ActiveState"))
    if state ~= "active" then why[#why + 1] = "unit " .. state end
    if #why > 0 then out[#out + 1] = ("%s [%s]"):format(m.server, table.concat(why, ", ")) end
  end
  samples = samples + 1
  now_down = #out
  if #out > max then
    max = #out
    worst = table.concat(out, "; ")
  end
  rr.sleep(math.max(0, 0.02 - (rr.now() - t0)))
end

local n = 0
for _ in pairs(drained) do n = n + 1 end
print(("max_down=%d samples=%d drained=%d now_down=%d"):format(max, samples, n, now_down))
print("worst: " .. worst)
