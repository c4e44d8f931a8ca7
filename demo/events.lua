-- rrengine demo/events.lua FILE [RUN]: the events of one run of an event log (default: the
-- last run in FILE), one short line each: time, event, service, and what it says.
-- An example of reading the JSONL event log from a script (no jq needed: cjson ships with
-- the engine's dependencies).
local cjson = require("cjson")

local file, want = ...
if not file then
  io.stderr:write("usage: rrengine demo/events.lua FILE [RUN]\n")
  os.exit(2)
end

local all = {}
local f, err = io.open(file, "r")
if not f then
  io.stderr:write("events.lua: ", err, "\n")
  os.exit(1)
end
for line in f:lines() do
  local ok, ev = pcall(cjson.decode, line)
  if ok and type(ev) == "table" then all[#all + 1] = ev end
end
f:close()

if not want then
  for _, ev in ipairs(all) do
    if ev.event == "PLAN_START" then want = ev.run end
  end
end

-- A value as text: 3 (not 3.0: cjson decodes every number as a float), a list joined.
local function s(v)
  if type(v) == "number" and v == math.floor(v) then return ("%d"):format(v) end
  if type(v) == "table" then
    local parts = {}
    for i, x in ipairs(v) do
      x = tostring(x)
      parts[i] = x:find("[%s\"]") and ("'" .. x .. "'") or x
    end
    return table.concat(parts, " ")
  end
  return tostring(v)
end

local function present(v) return v ~= nil and v ~= cjson.null end

-- The one thing worth reading in an event, in order of interest.
local function detail(ev)
  local e = ev.event
  if e == "PLAN_START" then return "order: " .. table.concat(ev.order, ", ") end
  if e == "PLAN_END" then return ("%s, exit code %s"):format(s(ev.result), s(ev.exit_code)) end
  if e == "DEFINITION_CHANGED" then return table.concat(ev.changes, "; ") end
  if e == "DEFINITION_RESTORED" then
    local what = {}
    for _, p in ipairs(ev.restored or {}) do what[#what + 1] = "put back " .. p end
    for _, p in ipairs(ev.removed or {}) do what[#what + 1] = "removed " .. p end
    return #what > 0 and table.concat(what, "; ") or "nothing differed"
  end
  if e == "DEPLOY_START" then return s(ev.source) .. " -> " .. s(ev.target) end
  if e == "DEPLOY_END" then return ("%s new, %s replaced file(s)"):format(s(ev.created or 0), s(ev.replaced or 0)) end
  if e == "MIGRATION_END" then return "exit code " .. s(ev.exit_code) end
  if e == "HEALTH_CHECK_PASSED" then return ev.phase .. ": " .. s(ev.detail) end
  if e == "HEALTH_CHECK_FAILED" then return ev.phase .. ": " .. s(ev.error) end
  if e == "STABILIZE_START" or e == "STABILIZE_END" then return s(ev.seconds) .. " s" end
  for _, k in ipairs({ "error", "reason", "note", "warning", "line", "method", "command" }) do
    if present(ev[k]) then return s(ev[k]) end
  end
  return ""
end

local n = 0
for _, ev in ipairs(all) do
  if ev.run == want then
    n = n + 1
    local time = tostring(ev.ts or ""):sub(12, 23)
    local text = ("  %s  %-22s %-14s %s"):format(time, ev.event, ev.service or "", detail(ev))
    if present(ev.duration_ms) and ev.event ~= "PLAN_END" then text = text .. (" (%s ms)"):format(s(ev.duration_ms)) end
    io.write(text:gsub("%s+$", ""), "\n")
  end
end
if n == 0 then
  io.stderr:write("events.lua: no events for run ", tostring(want), " in ", file, "\n")
  os.exit(1)
end
